"""Issue 35: configs as Axolotl's, LLaMA-Factory's and Unsloth's docs write them train, or are
refused for reasons that matter; keys that change nothing are listed once as ignored; no hint
names an unrelated key; --dry-run shows how each other tool's key was read."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.core.aliases import _did_you_mean
from peftko.core.config import FIELDS, load_config
from peftko.core.errors import UserError

PEERS = Path(__file__).parent / "fixtures" / "peer_configs"


def config(name: str, tmp_path: Path, base: Path, corpus: Path) -> Path:
    text = (PEERS / name).read_text(encoding="utf-8")
    path = tmp_path / name
    path.write_text(text.replace("BASE", str(base)).replace("CORPUS", str(corpus))
                    .replace("OUTPUT", str(tmp_path / "out")), encoding="utf-8")
    return path


def test_axolotl_qlora_as_documented_is_refused_only_for_what_matters(tiny_bases, small_corpus, tmp_path, capsys):
    path = config("axolotl_qlora_docs.yaml", tmp_path, tiny_bases["llama-untied"], small_corpus)
    with pytest.raises(UserError) as refused:
        load_config(path, required_by="lora-train")
    problems = [line for line in str(refused.value).splitlines()[1:]]
    keys = [line.split(": ")[1] for line in problems]
    # only the Hub dataset: peftko downloads nothing (its optimizer and cadences are read or ignored)
    assert keys == ["datasets"], problems
    assert problems[0].endswith("datasets: 'aaditya/alpaca_subset_1' is a Hugging Face Hub dataset: "
                                "peftko reads local files; download it first"), problems
    assert "did you mean" not in str(refused.value) and "needs --data" not in str(refused.value)
    note = [line for line in capsys.readouterr().out.splitlines() if "ignored, as they change nothing" in line]
    assert len(note) == 1
    for key in ("strict", "tf32", "train_on_inputs", "group_by_length", "pad_to_sequence_len", "special_tokens",
                "model_type", "tokenizer_type", "sample_packing", "lora_model_dir", "warmup_steps",
                "evals_per_epoch", "saves_per_epoch"):
        assert f"{key} (" in note[0] or f" {key}," in note[0] or note[0].endswith(key), key


@pytest.mark.parametrize("written, read", [("paged_adamw_32bit", "adamw"), ("adamw_torch", "adamw"),
                                           ("paged_adamw_8bit", "paged_adamw_8bit"),
                                           ("adamw_bnb_8bit", "paged_adamw_8bit")])
def test_axolotl_optimizer_names_are_read_as_peftkos_and_the_dry_run_says_how(written, read, tiny_bases,
                                                                               small_corpus, tmp_path):
    path = config("axolotl_qlora.yaml", tmp_path, tiny_bases["llama-untied"], small_corpus)
    path.write_text(path.read_text() + f"optimizer: {written}\n")
    assert load_config(path).optimizer == read
    if read == "adamw":  # the 8-bit optimizer needs CUDA: a CPU dry run refuses it
        r = CliRunner().invoke(main, ["lora-train", "--config", str(path), "--dry-run", "--device", "cpu"])
        assert r.exit_code == 0, r.output
        assert f"{written} -> optimizer: adamw" in r.output.replace("  ", " "), r.output


def test_axolotl_docs_config_with_a_local_corpus_reads(tiny_bases, small_corpus, tmp_path):
    """The same docs config with its Hub dataset replaced by a local one: nothing else refused."""
    path = config("axolotl_qlora_docs.yaml", tmp_path, tiny_bases["llama-untied"], small_corpus)
    path.write_text(path.read_text().replace("aaditya/alpaca_subset_1", str(small_corpus))
                    .replace("type: alpaca", "type: completion"))
    cfg = load_config(path, required_by="lora-train")
    assert (cfg.optimizer, cfg.markers, cfg.quant, cfg.warmup_ratio) == ("adamw", ["|SOUND|>"], "4bit", 0.05)


def test_axolotl_lora_model_dir_given_is_refused(tiny_bases, small_corpus, tmp_path):
    path = config("axolotl_qlora.yaml", tmp_path, tiny_bases["llama-untied"], small_corpus)
    path.write_text(path.read_text().replace("lora_model_dir:", "lora_model_dir: ./previous-adapter"))
    with pytest.raises(UserError, match="lora_model_dir: loads an existing adapter.*--resume"):
        load_config(path, required_by="lora-train")


def test_axolotl_tokens_become_the_markers(tiny_bases, small_corpus, tmp_path):
    path = config("axolotl_qlora.yaml", tmp_path, tiny_bases["llama-untied"], small_corpus)
    cfg = load_config(path, required_by="lora-train")
    assert cfg.markers == ["|SOUND|>"] and cfg.quant == "4bit" and cfg.target_modules == "all-linear"
    assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.seq_len) == (0.0002, 2, 4, 64)


@pytest.mark.slow
def test_axolotl_qlora_trains(tiny_bases, small_corpus, tmp_path):
    path = config("axolotl_qlora.yaml", tmp_path, tiny_bases["llama-untied"], small_corpus)
    r = CliRunner().invoke(main, ["lora-train", "--config", str(path), "--max-steps", "2", "--device", "cpu",
                                  "--val-fraction", "0.25"])
    assert r.exit_code == 0, r.output
    assert r.output.count("ignored, as they change nothing") == 1
    assert "markers registered" in r.output and "|SOUND|>" in r.output


@pytest.mark.parametrize("name", ["axolotl_qlora.yaml", "llama_factory_pretrain.yaml", "unsloth.yaml"])
def test_dry_run_shows_how_each_peer_key_was_read(name, tiny_bases, small_corpus, tmp_path):
    path = config(name, tmp_path, tiny_bases["llama-untied"], small_corpus)
    cpu = ["--optimizer", "adamw"] if name == "unsloth.yaml" else []  # the 8-bit optimizer needs CUDA
    r = CliRunner().invoke(main, ["lora-train", "--config", str(path), "--dry-run", "--device", "cpu", *cpu])
    assert r.exit_code == 0, r.output
    assert "other tools' keys, as peftko reads them:" in r.output
    shown = {"axolotl_qlora.yaml": ["  load_in_4bit:", "-> quant: 4bit", "tokens:", "-> markers: |SOUND|>"],
             "llama_factory_pretrain.yaml": ["  lora_target:", "all -> target_modules: all-linear",
                                             "4 -> quant: 4bit"],
             "unsloth.yaml": ["  use_gradient_checkpointing:", "unsloth -> gradient_checkpointing: true",
                              "adamw_8bit -> optimizer: paged_adamw_8bit", "random_state:"]}[name]
    for piece in shown:
        assert piece in r.output, (piece, r.output)


def test_llama_factory_and_unsloth_configs_read(tiny_bases, small_corpus, tmp_path):
    lf = load_config(config("llama_factory_pretrain.yaml", tmp_path, tiny_bases["llama-untied"], small_corpus))
    assert (lf.lora_r, lf.quant, lf.seq_len, lf.epochs, lf.warmup_ratio) == (8, "4bit", 64, 3.0, 0.1)
    sft = config("llama_factory_pretrain.yaml", tmp_path, tiny_bases["llama-untied"], small_corpus)
    sft.write_text(sft.read_text().replace("stage: pt", "stage: sft"))
    with pytest.raises(UserError, match="stage: 'sft' is refused: peftko continues pre-training on raw text; only 'pt' is accepted"):
        load_config(sft)
    un = load_config(config("unsloth.yaml", tmp_path, tiny_bases["llama-untied"], small_corpus))
    assert (un.lora_r, un.seed, un.optimizer, un.scheduler, un.gradient_checkpointing) == (
        16, 3407, "paged_adamw_8bit", "linear", True)


@pytest.mark.parametrize("name,unrelated", [("tokens", "sample_tokens"), ("special_tokens", "sample_tokens"),
                                             ("model_type", "model_name"), ("lora_model_dir", "lora_r"),
                                             ("pad_to_sequence_len", "sequence_len")])
def test_no_hint_names_an_unrelated_key(name, unrelated):
    assert repr(unrelated) not in _did_you_mean(name, FIELDS)


@pytest.mark.parametrize("typo,hint", [("learning_rte", "learning_rate"), ("lora_alhpa", "lora_alpha"),
                                       ("max_step", "max_steps")])
def test_a_typo_still_gets_its_hint(typo, hint):
    assert repr(hint) in _did_you_mean(typo, FIELDS)

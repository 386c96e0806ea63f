"""Bad input ends with one message naming the culprit, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.core.config import load_config
from peftko.core.errors import UserError
from tests.conftest import train_args


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def files_under(path):
    return sorted(p.relative_to(path) for p in path.rglob("*")) if path.exists() else []


def assert_refused(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "error:" in result.output
    for w in words:
        assert w in result.output, (w, result.output)


@pytest.fixture(scope="module")
def trained(tiny_bases, small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("refusals") / "run"
    result = invoke(*train_args(tiny_bases["llama-tied"], small_corpus, out, "--quant", "none"))
    assert result.exit_code == 0, result.output
    return out


# --- config


def test_every_config_problem_is_listed_at_once(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_rr: 8\nseq_len: many\nquant: 3bit\nlr: -1\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_config(cfg, {"batch_size": "0"}, ["nope=1", "warmup_ratio=2"])
    text = str(e.value)
    for piece in ("lora_rr", "did you mean 'lora_r'", "seq_len", "3bit", "lr: must be positive",
                  "--set nope: unknown key", "warmup_ratio", "batch_size: must be positive"):
        assert piece in text, piece


def test_flags_override_file_and_set_covers_the_rest(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1.0e-3\nseq_len: 128\nmarkers: ['|A|>', '|B|>']\n", encoding="utf-8")
    c = load_config(cfg, {"lr": "5e-4"}, ["lora_dropout=0.1", "target_modules=q_proj,v_proj"])
    assert (c.lr, c.seq_len, c.lora_dropout) == (5e-4, 128, 0.1)
    assert c.markers == ["|A|>", "|B|>"] and c.target_modules == ["q_proj", "v_proj"]


def test_unknown_config_key_through_the_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rat: 1\n", encoding="utf-8")  # learning_rate itself is read, as peftko's lr
    assert_refused(invoke("lora-train", "--config", str(cfg)), "learning_rat: unknown key", str(cfg))


def test_missing_config_file(tmp_path):
    assert_refused(invoke("lora-train", "--config", str(tmp_path / "none.yaml")), "none.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: !!python/object/apply:os.system ['echo pwned']\n", encoding="utf-8")
    assert_refused(invoke("lora-train", "--config", str(cfg)), "not valid YAML")


# --- lora-train


def test_missing_data_path(tiny_bases, tmp_path):
    out = tmp_path / "out"
    r = invoke(*train_args(tiny_bases["llama-tied"], tmp_path / "nowhere", out))
    assert_refused(r, "nowhere")
    assert not out.exists()


def test_missing_model_path(small_corpus, tmp_path):
    out = tmp_path / "out"
    assert_refused(invoke(*train_args(tmp_path / "no-model", small_corpus, out)), "no-model")
    assert not out.exists()


def test_binary_corpus_file_is_named_with_the_flag_to_use(tiny_bases, small_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    (corpus / "cover.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    out = tmp_path / "out"
    assert_refused(invoke(*train_args(tiny_bases["llama-tied"], corpus, out)), "cover.txt", "--skip-bad-files")
    assert not out.exists()


def test_existing_output_is_never_overwritten(trained, tiny_bases, small_corpus):
    before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    r = invoke(*train_args(tiny_bases["llama-tied"], small_corpus, trained))
    assert_refused(r, str(trained), "--resume", "--force")
    assert {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()} == before


# --- merge


def test_merge_refuses_a_different_base(trained, tiny_bases, tmp_path):
    out = tmp_path / "merged"
    assert_refused(invoke("merge", str(trained), "--output", str(out), "--base", str(tiny_bases["llama-untied"])),
                   "does not match")
    assert not out.exists()


def test_merge_refuses_a_base_whose_weights_changed(trained, tiny_bases, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_bases["llama-tied"], base)
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # same shapes, same header, one weight byte differs
    weights.write_bytes(bytes(data))
    assert_refused(invoke("merge", str(trained), "--output", str(tmp_path / "m"), "--base", str(base)),
                   "does not match")
    assert not (tmp_path / "m").exists()


def test_merge_refuses_a_non_empty_output(trained, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    assert_refused(invoke("merge", str(trained), "--output", str(out)), str(out), "--force")
    assert files_under(out) == [out.joinpath("keep.txt").relative_to(out)]


@pytest.mark.parametrize("missing", ["peftko.json", "adapter_model.safetensors", "tokenizer_config.json"])
def test_merge_refuses_an_incomplete_adapter_dir(trained, tmp_path, missing):
    partial = tmp_path / "partial"
    shutil.copytree(trained, partial)
    (partial / missing).unlink()
    out = tmp_path / "merged"
    # Without peftko.json (written last) the run did not finish; with it, a file was removed since.
    words = "incomplete" if missing == "peftko.json" else "is missing"
    assert_refused(invoke("merge", str(partial), "--output", str(out)), missing, words)
    assert not out.exists()


def test_merge_refuses_a_missing_adapter_dir(tmp_path):
    assert_refused(invoke("merge", str(tmp_path / "nope"), "--output", str(tmp_path / "m")), "nope")


def test_merge_with_force_replaces_an_earlier_merge_whole(trained, tmp_path):
    out = tmp_path / "merged"
    assert invoke("merge", str(trained), "--output", str(out)).exit_code == 0
    (out / "model.safetensors").write_bytes(b"stale")  # ours (listed in peftko-merge.json): replaced
    r = invoke("merge", str(trained), "--output", str(out), "--force")
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").read_bytes() != b"stale"
    assert json.loads((out / "config.json").read_text())["vocab_size"] > 0


def test_seq_len_beyond_the_base_context(tiny_bases, small_corpus, tmp_path):
    out = tmp_path / "out"
    args = train_args(tiny_bases["llama-tied"], small_corpus, out)
    args[args.index("--seq-len") + 1] = "4096"  # the tiny bases were built with 1024 positions
    assert_refused(invoke(*args), "--seq-len 4096", "1024")
    assert not out.exists()


def test_merge_of_a_folder_no_run_started_in_says_so(small_corpus, tmp_path):
    out = tmp_path / "merged"
    result = invoke("merge", str(small_corpus), "--output", str(out))
    assert_refused(result, "is not a `peftko lora-train` output")
    assert "--resume" not in result.output
    assert not out.exists()


# --- merge believes the files, not peftko.json


def forged(trained, tmp_path, edit) -> Path:
    """A copy of the run whose peftko.json EDIT changed (adapter hash and all, as a forger would)."""
    copy = tmp_path / "forged"
    shutil.copytree(trained, copy)
    manifest = json.loads((copy / "peftko.json").read_text(encoding="utf-8"))
    edit(manifest)
    (copy / "peftko.json").write_text(json.dumps(manifest), encoding="utf-8")
    return copy


def test_merge_refuses_a_manifest_whose_rows_disagree_with_the_files(trained, tmp_path):
    run = forged(trained, tmp_path, lambda m: m["vocab"].update(rows_after=99999))
    out = tmp_path / "merged"
    assert_refused(invoke("merge", str(run), "--output", str(out)), "vocab.rows_after is 99999", "edited or damaged")
    assert not out.exists()


def test_merge_refuses_a_manifest_whose_marker_ids_disagree_with_the_tokenizer(trained, tmp_path):
    run = forged(trained, tmp_path, lambda m: m["markers"][0].update(id=5))
    out = tmp_path / "merged"
    assert_refused(invoke("merge", str(run), "--output", str(out)), "is id 5 there but", "saved tokenizer")
    assert not out.exists()


def test_merge_refuses_to_write_non_finite_marker_rows(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from peftko.run.identity import sha256_file

    copy = tmp_path / "inf"
    shutil.copytree(trained, copy)
    adapter = copy / "adapter_model.safetensors"
    tensors = load_file(adapter)
    key = next(k for k in tensors if k.endswith("trainable_tokens_delta"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, adapter, metadata={"format": "pt"})
    manifest = json.loads((copy / "peftko.json").read_text(encoding="utf-8"))
    manifest["adapter_sha256"] = sha256_file(adapter)  # the forger updates the hashes too
    manifest["seal"]["adapter_model.safetensors"] = manifest["adapter_sha256"]
    (copy / "peftko.json").write_text(json.dumps(manifest), encoding="utf-8")
    out = tmp_path / "merged"
    assert_refused(invoke("merge", str(copy), "--output", str(out)), "NaN or inf", key)
    assert not out.exists()

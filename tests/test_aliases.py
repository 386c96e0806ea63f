"""Configs and flags written for Axolotl, LLaMA-Factory, TRL or Unsloth: read as the same peftko
config, refused in one line where the meaning differs or two names disagree."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.core.aliases import ALIASES, REFUSED, SAME_NAMES, markdown_table
from peftko.core.config import FIELDS, load_config
from peftko.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

PEFTKO = """
model: /models/Llama-3-Open-Ko-8B
data: [corpus/]
output: runs/ko-books
quant: 4bit
seq_len: 1024
batch_size: 2
grad_accum: 8
epochs: 2
lr: 1.0e-4
scheduler: linear
warmup_ratio: 0.03
weight_decay: 0.01
lora_r: 32
lora_alpha: 64
lora_dropout: 0.05
target_modules: all-linear
dtype: bfloat16
gradient_checkpointing: true
val_fraction: 0.05
seed: 7
"""

AXOLOTL = """
base_model: /models/Llama-3-Open-Ko-8B
datasets:
  - path: corpus/
    type: completion
output_dir: runs/ko-books
adapter: qlora
load_in_4bit: true
load_in_8bit: false
sequence_len: 1024
micro_batch_size: 2
gradient_accumulation_steps: 8
num_epochs: 2
learning_rate: 0.0001
lr_scheduler: linear
warmup_ratio: 0.03
weight_decay: 0.01
lora_r: 32
lora_alpha: 64
lora_dropout: 0.05
lora_target_linear: true
lora_target_modules:
bf16: true
fp16: false
flash_attention: false
gradient_checkpointing: true
val_set_size: 0.05
seed: 7
"""

LLAMA_FACTORY = """
model_name_or_path: /models/Llama-3-Open-Ko-8B
dataset: corpus/
output_dir: runs/ko-books
quantization_bit: 4
cutoff_len: 1024
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
num_train_epochs: 2.0
learning_rate: 1.0e-4
lr_scheduler_type: linear
warmup_ratio: 0.03
weight_decay: 0.01
lora_rank: 32
lora_alpha: 64
lora_dropout: 0.05
lora_target: all
bf16: true
val_fraction: 0.05
seed: 7
"""

TRL_UNSLOTH = """
model_name: /models/Llama-3-Open-Ko-8B
dataset: [corpus/]
output_dir: runs/ko-books
load_in_4bit: true
max_seq_length: 1024
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
num_train_epochs: 2
learning_rate: 1.0e-4
lr_scheduler_type: linear
warmup_ratio: 0.03
weight_decay: 0.01
r: 32
lora_alpha: 64
lora_dropout: 0.05
target_modules: all-linear
bf16: true
optim: adamw_torch
val_fraction: 0.05
seed: 7
"""


def config(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("peer", [AXOLOTL, LLAMA_FACTORY, TRL_UNSLOTH], ids=["axolotl", "llama-factory", "trl-unsloth"])
def test_a_peers_config_resolves_to_the_same_config_as_its_peftko_spelling(tmp_path, peer):
    ours = load_config(config(tmp_path, PEFTKO, "peftko.yaml"), required_by="lora-train")
    theirs = load_config(config(tmp_path, peer, "peer.yaml"), required_by="lora-train")
    assert dataclasses.asdict(theirs) == dataclasses.asdict(ours)


def test_a_clash_through_the_cli_names_both_keys_and_the_file(tmp_path):
    path = config(tmp_path, PEFTKO + "learning_rate: 3.0e-4\n")
    result = invoke("lora-train", "--config", str(path), "--dry-run")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = next(line for line in result.output.splitlines() if "learning_rate" in line)
    assert str(path) in line and "lr: 0.0001" in line and "learning_rate: 0.0003" in line


@pytest.mark.parametrize("text, words", [
    ("micro_batch_size: 2\nper_device_train_batch_size: 4\n", ["micro_batch_size", "per_device_train_batch_size"]),
    ("batch_size: 16\nmicro_batch_size: 2\n", ["batch_size: 16", "micro_batch_size: 2"]),  # Axolotl's whole step
    ("quant: 4bit\nload_in_4bit: false\n", ["quant", "load_in_4bit"]),
    ("load_in_4bit: true\nload_in_8bit: true\n", ["load_in_4bit", "load_in_8bit"]),
    ("dtype: float32\nbf16: true\n", ["dtype", "bf16"]),
])
def test_two_names_of_one_key_must_agree(tmp_path, text, words):
    path = config(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(path)
    line = next(line for line in str(e.value).splitlines() if "disagree" in line)
    assert str(path) in line and all(w in line for w in words), line


def test_names_that_agree_are_fine_and_a_flag_still_overrides_the_file(tmp_path):
    path = config(tmp_path, "lr: 2.0e-4\nlearning_rate: 0.0002\n")
    assert load_config(path).lr == 2e-4
    assert load_config(path, {"lr": "1e-3"}).lr == 1e-3
    assert load_config(path, sets=["learning_rate=5e-4"]).lr == 5e-4  # --set overrides the file too


def test_set_reads_the_peers_names_and_refuses_a_clash_among_them():
    cfg = load_config(sets=["num_train_epochs=3", "load_in_8bit=true", "lora_target=q_proj,v_proj"])
    assert (cfg.epochs, cfg.quant, cfg.target_modules) == (3.0, "8bit", ["q_proj", "v_proj"])
    with pytest.raises(UserError, match=r"--set learning_rate: '1e-3' and lr: '2e-3' both set peftko's lr"):
        load_config(sets=["learning_rate=1e-3", "lr=2e-3"])


@pytest.mark.parametrize("text, key, value", [
    ("load_in_4bit: false\n", "quant", "none"),  # a peer's base without quantization
    ("load_in_4bit: false\nload_in_8bit: true\n", "quant", "8bit"),
    ("adapter: lora\n", "quant", "none"),
    ("adapter: lora\nload_in_8bit: true\n", "quant", "8bit"),
    ("bf16: false\nfp16: false\n", "dtype", "float32"),
    ("bf16: auto\n", "dtype", "auto"),
    ("lora_target_linear: false\nlora_target_modules: [q_proj]\n", "target_modules", ["q_proj"]),
    ("val_set_size: 0.2\n", "val_fraction", 0.2),
])
def test_switches_turned_off_say_what_they_leave(tmp_path, text, key, value):
    assert getattr(load_config(config(tmp_path, text)), key) == value


@pytest.mark.parametrize("text, words", [
    ("optimizer: sgd\n", ["optimizer", "adamw", "paged_adamw_8bit"]),
    ("val_set_size: 200\n", ["val_set_size", "val_fraction"]),
    ("datasets:\n  - path: ./alpaca_data.json\n    type: alpaca\n", ["datasets", "'alpaca'", "type: completion"]),
    ("datasets:\n  - path: tatsu-lab/alpaca\n    type: alpaca\n", ["datasets", "peftko reads local files; download it first"]),
    ("datasets: corpus/\n", ["datasets", "path: corpus/"]),
    ("datasets:\n  - path: c/\n    type: completion\n    split: train\n", ["datasets", "split"]),
    ("quantization_bit: 2\n", ["quantization_bit", "4 or 8"]),
    ("adapter: full\n", ["adapter", "lora or qlora"]),
    ("dataset_name: org/data\n", ["dataset_name", "local files"]),
])
def test_what_means_something_else_is_refused_in_one_line_with_peftkos_equivalent(tmp_path, text, words):
    path = config(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(path)
    line = next(line for line in str(e.value).splitlines() if words[0] in line)
    assert str(path) in line and all(w in line for w in words), line


def test_axolotl_datasets_with_several_local_text_entries(tmp_path):
    text = "datasets:\n  - path: a/\n    type: completion\n  - path: b.jsonl\n    type: text\n    ds_type: json\n"
    assert load_config(config(tmp_path, text)).data == ["a/", "b.jsonl"]


def test_an_unknown_key_is_pointed_to_the_alias_it_resembles(tmp_path):
    with pytest.raises(UserError, match=r"learning_rat: unknown key \(did you mean 'learning_rate', peftko's lr\?\)"):
        load_config(config(tmp_path, "learning_rat: 1\n"))
    with pytest.raises(UserError, match=r"lora_rr: unknown key \(did you mean 'lora_r'\?\)"):
        load_config(config(tmp_path, "lora_rr: 1\n"))


@pytest.mark.parametrize("flag, ours", [
    ("--learning-rate", "--lr"), ("--learning_rate", "--lr"), ("--num-epochs", "--epochs"),
    ("--num_train_epochs", "--epochs"), ("--output-dir", "--output"), ("--base-model", "--model"),
    ("--load-in-4bit", "--quant 4bit"), ("--micro-batch-size", "--batch-size"), ("--grad_accum", "--grad-accum"),
])
@pytest.mark.parametrize("command", ["lora-train", "ablate"])
def test_a_peers_flag_gets_one_line_naming_peftkos(command, flag, ours):
    result = invoke(command, flag, "1")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [result.output.strip()], result.output  # one line
    assert "Traceback" not in result.output and flag in result.output and f" {ours}" in result.output


def test_an_unknown_flag_that_is_no_peers_keeps_clicks_answer():
    result = invoke("lora-train", "--no-such-thing")
    assert result.exit_code == 2 and "No such option" in result.output


# --- the table: one place in the code, generated into the docs


def test_every_alias_names_a_real_key_and_never_shadows_one():
    assert {a.key for a in ALIASES.values()} <= set(FIELDS)
    assert not set(ALIASES) & set(FIELDS) and not set(REFUSED) & set(FIELDS)
    assert set(SAME_NAMES) <= set(FIELDS)


@pytest.mark.parametrize("lang", ["en", "ko"])
def test_the_docs_table_is_the_code_table(lang):
    text = (ROOT / "docs" / lang / "coming-from-other-tools.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- alias-table:start -->\n(.*?)\n<!-- alias-table:end -->", text, re.S)
    assert found, "the page lost its alias-table markers"
    assert found.group(1).strip() == markdown_table(lang), (
        f"regenerate the table: python -c \"from peftko.core.aliases import markdown_table; "
        f"print(markdown_table('{lang}'))\"")

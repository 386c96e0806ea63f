"""The memory plan: a pure prediction from config.json, checked against measured peaks, and the
`lora-train --dry-run` table, which must never load a weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.model.memory_plan import ModelShape, checkpoint_stats, plan_memory, shape_from_config

LLAMA3_8B = {  # the Llama-3-8B config.json values that matter
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
    "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 8192, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
}
LLAMA32_1B = dict(LLAMA3_8B, hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, head_dim=64,
                  tie_word_embeddings=True)
B8 = shape_from_config(LLAMA3_8B)
B1 = shape_from_config(LLAMA32_1B)
STEP = dict(batch_size=4, seq_len=2048)  # benchmarks/RESULTS.md: 4 x 2048 tokens a step, r=16, 4 markers


def test_shapes_from_config():
    assert B8.total_params == 8_030_261_248  # Llama-3-8B's published count
    assert B1.total_params == 1_235_814_400  # Llama-3.2-1B's
    assert (B8.kv_dim, B1.kv_dim, B1.tied, B8.tied) == (1024, 512, True, False)
    assert B8.lora_params(16) == 41_943_040
    assert B8.lora_params(16, ["q_proj", "v_proj"]) == 32 * 16 * (4096 + 4096 + 4096 + 1024)
    neox = shape_from_config({"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "intermediate_size": 256, "vocab_size": 100})
    assert [n for n, _, _ in neox.linears] == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    assert neox.tied  # transformers' default when config.json does not say


@pytest.mark.parametrize("shape, kwargs, trainable_m", [
    (B8, {}, 42.0), (B8, {"recipe": "common"}, 1092.6),
    (B1, {}, 11.3), (B1, {"recipe": "common"}, 536.6),
])
def test_trainable_parameters_match_the_measured_runs(shape, kwargs, trainable_m):
    assert plan_memory(shape, **STEP, **kwargs).trainable_params / 1e6 == pytest.approx(trainable_m, abs=0.05)


def predict_peak_gib(shape, **kwargs) -> float:
    return plan_memory(shape, **kwargs).peak_gib


@pytest.mark.parametrize("kwargs, measured_gib", [
    # Training peaks measured on an NVIDIA H200, each recipe alone in a fresh process (benchmarks/RESULTS.md).
    (dict(**STEP), 22.7),                                   # NF4 + token rows, bf16 kept
    (dict(**STEP, liger=True), 10.4),                       # same + Liger
    (dict(batch_size=1, seq_len=4096, liger=True), 8.9),    # same + Liger, 1 x 4096 tokens
    (dict(**STEP, recipe="common"), 39.5),                  # prepare_model_for_kbit_training + modules_to_save
])
def test_prediction_is_within_15_percent_of_measured_8b_peaks(kwargs, measured_gib):
    predicted = predict_peak_gib(B8, quant="4bit", lora_r=16, marker_rows=4, **kwargs)
    assert abs(predicted - measured_gib) / measured_gib < 0.15, predicted


@pytest.mark.parametrize("shape, kwargs, measured_gib", [
    # Training peaks measured on an NVIDIA H100 by benchmarks/gpu_check.sh and benchmarks/recipes.py
    # (benchmarks/RESULTS.md), peftko's fused loss (peftko/model/fused_loss.py) for the Liger rows.
    (B8, dict(**STEP, liger=True), 9.50),
    (B8, dict(**STEP, liger=True, offload_checkpoints=True), 7.71),
    (B8, dict(batch_size=1, seq_len=8192, liger=True), 9.64),
    (B8, dict(batch_size=2, seq_len=8192, liger=True, offload_checkpoints=True), 9.70),
    (B8, dict(**STEP, recipe="common"), 36.46),
    (B1, dict(**STEP, liger=True), 2.58),
    (B1, dict(**STEP, liger=True, gradient_checkpointing=False), 12.01),
    (B1, dict(**STEP, recipe="common"), 20.83),
])
def test_prediction_is_within_15_percent_of_the_h100_peaks(shape, kwargs, measured_gib):
    predicted = predict_peak_gib(shape, quant="4bit", lora_r=16, marker_rows=4, **kwargs)
    assert abs(predicted - measured_gib) / measured_gib < 0.15, predicted


@pytest.mark.parametrize("shape, measured_gib", [(B8, 6.29), (B1, 1.45)])
def test_loading_prediction_is_within_15_percent_of_the_h100_loading_peaks(shape, measured_gib):
    """peftko's loading peak (4-bit base loaded, embeddings grown), measured apart from training."""
    predicted = plan_memory(shape, **STEP, liger=True, marker_rows=4).loading_gib
    assert abs(predicted - measured_gib) / measured_gib < 0.15, predicted
    assert predicted < plan_memory(shape, **STEP, liger=True, marker_rows=4).peak_gib  # loading stays below training


def test_prediction_moves_the_right_way():
    def p(**kw):
        return predict_peak_gib(B8, **{**STEP, **kw})

    assert p(liger=True) < p() < p(recipe="common")
    assert p(quant="4bit") < p(quant="8bit") < p(quant="none")
    assert p(seq_len=1024) < p() < p(seq_len=4096)
    assert p(gradient_checkpointing=True) < p(gradient_checkpointing=False)
    assert p(optimizer="paged_adamw_8bit") < p()
    assert p(compute_bytes=2) < p(compute_bytes=4)
    with pytest.raises(ValueError):
        p(recipe="axolotl")


def test_fits_verdict():
    lean = plan_memory(B8, batch_size=1, seq_len=4096, liger=True)
    assert lean.fits(12) and lean.fits(24)
    # Measured on an H100 with the allocator capped at 11.5 GiB (a 12 GiB card less its CUDA context):
    # 1 x 8192 and 2 x 8192 with offloaded checkpoints both trained (9.64 / 9.70 GiB allocated);
    # 4 x 2048 peaks lower still (9.50 GiB). 2 x 8192 without offloading needs more.
    assert plan_memory(B8, **STEP, liger=True).fits(12)
    assert plan_memory(B8, batch_size=2, seq_len=8192, liger=True, offload_checkpoints=True).fits(12)
    assert not plan_memory(B8, batch_size=2, seq_len=8192, liger=True).fits(12)
    assert plan_memory(B8, batch_size=2, seq_len=8192, liger=True).fits(24)
    assert not plan_memory(B8, batch_size=8, seq_len=8192, liger=True, offload_checkpoints=True).fits(24)
    assert not plan_memory(B8, **STEP).fits(12)
    assert not plan_memory(B8, **STEP, recipe="common").fits(24)


def test_checkpoint_stats_read_headers_only(tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4, dtype=torch.bfloat16), "b": torch.zeros(10)}, str(tmp_path / "model.safetensors"))
    assert checkpoint_stats(tmp_path) == (22, 40)
    save_file({"q": torch.zeros(8, dtype=torch.uint8)}, str(tmp_path / "model.safetensors"))
    assert checkpoint_stats(tmp_path) is None  # pre-quantized: element counts are not parameters
    assert checkpoint_stats(tmp_path / "missing") is None


# --- the dry run through the CLI

def dry_run(model_dir: Path, *extra: str):
    # The built-in sample corpus, the default before lora-train asked for --data; a dry run writes no --output.
    return CliRunner().invoke(main, ["lora-train", "--model", str(model_dir), "--data", "builtin:sample",
                                     "--output", str(model_dir.parent / "dry-run-out"), "--dry-run",
                                     "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def weightless_tiny_base(tmp_path_factory) -> Path:
    """A real tiny base whose weights file was deleted: a dry run that loaded weights would fail."""
    from peftko.model.tiny_base import build_tiny_base

    base = build_tiny_base(tmp_path_factory.mktemp("tiny") / "base")
    (base / "model.safetensors").unlink()
    return base


def test_dry_run_prints_the_plan_without_weights(weightless_tiny_base, monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a dry run must not load the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    result = dry_run(weightless_tiny_base, "--seq-len", "256", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    out = result.output
    for part in ("memory plan", "weights", "trainable", "activations", "logits", "peak", "loading"):
        assert part in out
    assert "fits in 8 GiB: yes, 12 GiB: yes, 16 GiB: yes, 24 GiB: yes" in out
    assert "to fit" not in out  # it fits everywhere: nothing to change
    assert "4 x 256 x" in out
    assert "far too slow on a CPU" not in out  # a tiny model trains on the CPU (the demo)


def test_dry_run_on_an_8b_config_alone(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    result = dry_run(tmp_path, "--seq-len", "2048", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "memory plan for a CUDA card, bfloat16" in out
    assert "8.03 B parameters" in out
    assert "fits in 8 GiB: no, 12 GiB: no, 16 GiB: no, 24 GiB: no  (counting" in out  # full logits: 22.5 GiB
    liger_line = next(line for line in out.splitlines() if line.startswith("with Liger kernels"))
    # Evaluation passes skip_logits to the fused loss, so it stays below training.
    assert "training peak 9.78" in liger_line and "evaluation 6.4" in liger_line
    assert "fits in 8 GiB: no, 12 GiB: yes, 16 GiB: yes, 24 GiB: yes" in liger_line  # measured: 9.50 GiB, 10.23 reserved on an H100
    assert "GiB of RAM" in out
    # 6 FLOPs per parameter and token, 4 x 4 x 2048 tokens a step: a CPU run of this is a plan for a GPU.
    cpu_line = next(line for line in out.splitlines() if line.startswith("this run is on the CPU"))
    assert "one step of 32,768 tokens is about 1.6e+15 floating-point operations" in cpu_line
    assert "far too slow on a CPU: plan the run for a CUDA card" in cpu_line
    # Offloaded checkpoints: 32 layers x 8192 tokens x 4096 x 2 bytes leave the GPU for pinned RAM.
    offload = dry_run(tmp_path, "--seq-len", "2048", "--batch-size", "4", "--offload-checkpoints")
    assert offload.exit_code == 0, offload.output
    assert "the hidden states checkpointed in CPU memory (2.00 GiB of pinned RAM)" in offload.output
    assert "training peak 7.78" in offload.output
    lean = dry_run(tmp_path, "--seq-len", "1024", "--batch-size", "1", "--liger", "off")
    assert lean.exit_code == 0, lean.output
    assert "fits in 8 GiB: no, 12 GiB: yes" in lean.output and "with Liger" not in lean.output


def test_shape_defaults_head_dim_and_kv_heads():
    s = shape_from_config({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "vocab_size": 10, "intermediate_size": 128})
    assert isinstance(s, ModelShape) and (s.head_dim, s.kv_heads, s.model_type) == (16, 4, "llama")


def test_dry_run_on_an_unknown_config_says_so(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    result = dry_run(tmp_path)
    assert result.exit_code == 0, result.output
    assert "no prediction for this architecture" in result.output


def test_dry_run_answers_8_to_24_gib_and_names_the_smallest_changes_that_fit(tmp_path: Path):
    """Issue 35: Llama-3-8B at the defaults (10.69 GiB) fits no 12 GiB card, while --seq-len 1024
    (8.72 GiB) or Liger (6.90 GiB) would: the dry run says so, each change with its peak."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    out = dry_run(tmp_path, "--seq-len", "2048", "--batch-size", "1").output
    assert "fits in 8 GiB: no, 12 GiB: no, 16 GiB: yes, 24 GiB: yes" in out
    lines = {line.split(":")[0]: line for line in out.splitlines() if line.startswith("to fit")}
    assert set(lines) == {"to fit 8 GiB", "to fit 12 GiB"}
    assert "--seq-len 1024 (8.72 GiB)" in lines["to fit 12 GiB"] and "--liger on" in lines["to fit 12 GiB"]
    assert "(6.90 GiB)" in lines["to fit 12 GiB"] and "--seq-len 512" not in lines["to fit 12 GiB"]
    assert "no single change" in lines["to fit 8 GiB"]
    big = dry_run(tmp_path, "--seq-len", "2048", "--batch-size", "4").output
    fit24 = next(line for line in big.splitlines() if line.startswith("to fit 24 GiB"))
    # the smallest batch change keeps the blocks a step trains (4 x 4 = 2 x 8); offloading also fits here
    assert "--batch-size 2 --grad-accum 8 (14.62 GiB)" in fit24 and "--offload-checkpoints (20.47 GiB)" in fit24

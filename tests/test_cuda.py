"""The CUDA paths, end to end: run on a GPU by benchmarks/gpu_check.sh (`pytest -m gpu`), skipped on the CPU.

Every command that touches a device runs here on `--device cuda` with tiny real bases: lora-train in
4-bit, 8-bit and bf16 (Liger on where it applies, and off), a held-out split and checkpoints, then
eval, generate and merge of the result; the fp16 path (cards without bf16) with the GradScaler and
the non-finite guard together; a real CUDA out-of-memory; and evaluation leaving 4-bit CUDA layers
as they were.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import TrainerCallback

from peftko.model.base import Precision
from peftko.cli import main
from peftko.run.checkpoints import latest_checkpoint
from peftko.model.kernels import liger_installed
from tests.conftest import train_args
from tests.test_eval_side_effects import check_evaluation_changes_nothing
from tests.test_resilience import add_callback, trainable_state

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
CUDA_BF16 = Precision(torch.device(DEVICE), torch.bfloat16)


def invoke(argv):
    return CliRunner().invoke(main, argv)


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return result


def cuda_train(tiny_bases, small_corpus, out, base="llama-untied", *extra):
    return invoke(train_args(tiny_bases[base], small_corpus, out, "--device", DEVICE, "--save-steps", "3",
                             "--eval-steps", "3", *extra))


def manifest(out) -> dict:
    return json.loads((out / "peftko.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("base,quant,liger", [
    ("llama-untied", "4bit", "auto"),   # the default path: NF4 + Liger's fused cross-entropy
    ("llama-untied", "4bit", "off"),
    ("llama-tied", "8bit", "auto"),
    ("qwen2-padded", "none", "auto"),   # biased linears, padded vocabulary
    ("gpt-neox", "4bit", "auto"),       # no Liger for this architecture: the plain path
])
def test_train_then_eval_generate_merge_on_cuda(tiny_bases, small_corpus, tmp_path, base, quant, liger):
    out = tmp_path / "run"
    ok(cuda_train(tiny_bases, small_corpus, out, base, "--quant", quant, "--liger", liger))
    m = manifest(out)
    assert m["config"]["device"] == DEVICE and m["compute_dtype"] == "bfloat16", m
    results = m["results"]
    if liger == "off" or base == "gpt-neox":
        assert not results["kernels"] or "fused" not in results["kernels"], results["kernels"]
    elif liger_installed() and base.startswith(("llama", "qwen2")):
        assert "fused linear cross-entropy" in results["kernels"], results["kernels"]
    assert all(math.isfinite(results[k]) for k in ("bpc_before", "bpc_after", "train_loss")), results
    assert latest_checkpoint(out) is not None
    if DEVICE == "cuda":
        assert 0 < results["gpu_peak_load_gib"] and 0 < results["gpu_peak_train_gib"], results
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in lines) and all(math.isfinite(r["loss"]) for r in lines if "loss" in r)

    scores = json.loads(ok(invoke(["eval", str(out), "--data", str(small_corpus), "--device", DEVICE,
                                   "--seq-len", "64", "--json"])).stdout)
    assert math.isfinite(scores["bits_per_char"]), scores
    ok(invoke(["generate", str(out), "--prompt", "|START_OF_TITLE|>", "--max-new-tokens", "8",
               "--temperature", "0", "--device", DEVICE]))
    ok(invoke(["merge", str(out), "--output", str(tmp_path / "merged")]))
    assert (tmp_path / "merged" / "config.json").is_file()


class InfAtSteps(TrainerCallback):
    """At the given steps the final norm returns inf, so loss and gradients overflow; records the
    trainable parameters after every step."""

    def __init__(self, steps: set[int]):
        self.steps, self.params = steps, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs, output):
            return output * float("inf") if module.training and state.global_step + 1 in self.steps else output

        model.get_base_model().model.norm.register_forward_hook(hook)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params[state.global_step] = trainable_state(model)


def test_fp16_scaler_skips_an_overflow_and_the_run_goes_on(tiny_bases, small_corpus, tmp_path, monkeypatch):
    """Cards without bf16 train in fp16 with a GradScaler: an overflowing step is skipped (parameters
    unchanged), counted once by the guard, and the run ends normally."""
    probe = InfAtSteps({3})
    add_callback(monkeypatch, probe)
    out = tmp_path / "run"
    r = ok(cuda_train(tiny_bases, small_corpus, out, "llama-untied", "--dtype", "float16", "--quant", "4bit",
                      "--max-bad-steps", "2"))
    assert manifest(out)["compute_dtype"] == "float16"
    assert r.output.count("step skipped") == 1, r.output
    same = [torch.equal(probe.params[2][n], probe.params[3][n]) for n in probe.params[2]]
    assert all(same), "the overflowing step changed parameters"
    assert not all(torch.equal(probe.params[3][n], probe.params[4][n]) for n in probe.params[3])


def test_fp16_run_that_keeps_overflowing_stops_with_exit_3(tiny_bases, small_corpus, tmp_path, monkeypatch):
    add_callback(monkeypatch, InfAtSteps(set(range(2, 100))))
    r = cuda_train(tiny_bases, small_corpus, tmp_path / "run", "llama-untied", "--dtype", "float16",
                   "--quant", "none", "--max-steps", "12", "--max-bad-steps", "3")
    assert r.exit_code == 3, r.output
    assert "non-finite" in r.output and "Traceback" not in r.output


class ShrinkTheCard(TrainerCallback):
    """A real CUDA out-of-memory from torch's allocator: once the model is loaded the card is capped
    at 1 % of its memory, and the first forward asks for an activation-sized block beyond that."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        torch.cuda.set_per_process_memory_fraction(0.01)

        def big_activation(module, inputs):
            torch.empty(2 * torch.cuda.get_device_properties(0).total_memory // 100, dtype=torch.uint8,
                        device="cuda")

        model.register_forward_pre_hook(big_activation)


def test_real_cuda_out_of_memory_is_one_message_and_exit_2(tiny_bases, small_corpus, tmp_path, monkeypatch):
    add_callback(monkeypatch, ShrinkTheCard())
    try:
        r = cuda_train(tiny_bases, small_corpus, tmp_path / "run", "llama-untied", "--quant", "4bit")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert r.exit_code == 2, r.output + repr(r.exception)
    assert "out of GPU memory while training" in r.output and "Traceback" not in r.output, r.output
    assert "--batch-size" in r.output and not (tmp_path / "run" / "peftko.json").exists()


@pytest.mark.parametrize("base,quant", [("llama-untied", "4bit"), ("gpt-neox", "4bit"), ("llama-tied", "8bit")])
def test_cuda_gradients_do_not_depend_on_an_evaluation_before(tiny_bases, tmp_path, base, quant):
    check_evaluation_changes_nothing(tiny_bases[base], quant, tmp_path, CUDA_BF16)


def test_offloaded_checkpoints_train_the_same_steps(tiny_bases, small_corpus, tmp_path):
    """--offload-checkpoints moves where the checkpointed hidden states wait, not what is computed."""
    losses = {}
    for name, extra in (("plain", ()), ("offload", ("--offload-checkpoints",))):
        out = tmp_path / name
        ok(cuda_train(tiny_bases, small_corpus, out, "llama-untied", "--quant", "4bit", *extra))
        assert manifest(out)["config"]["offload_checkpoints"] == (name == "offload")
        lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in lines if "loss" in r]
    assert len(losses["plain"]) >= 2
    assert losses["offload"] == pytest.approx(losses["plain"], rel=1e-3)

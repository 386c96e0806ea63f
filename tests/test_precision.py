"""The compute dtype: `auto` follows the device, an explicit `dtype` wins, impossible ones are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from peftko.cli import main
from peftko.core.config import load_config
from peftko.core.errors import UserError
from peftko.model import base as base_model
from peftko.model.base import pick_precision
from peftko.model.inference import load_for_inference


@pytest.mark.parametrize("fast_bf16,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_the_cpu_depends_on_bf16_support(monkeypatch, fast_bf16, expected):
    monkeypatch.setattr(base_model, "_cpu_has_fast_bf16", lambda: fast_bf16)
    assert pick_precision("cpu").dtype == expected
    assert pick_precision("cpu", "auto").dtype == expected


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_explicit_dtype_wins_whatever_the_cpu(monkeypatch, fast_bf16):
    monkeypatch.setattr(base_model, "_cpu_has_fast_bf16", lambda: fast_bf16)
    assert pick_precision("cpu", "float32").dtype == torch.float32
    assert pick_precision("cpu", "bfloat16").dtype == torch.bfloat16  # emulated where slow, still allowed


def test_float16_is_refused_on_the_cpu():
    with pytest.raises(UserError, match="dtype: float16 needs a CUDA device"):
        load_config(None, {"device": "cpu", "dtype": "float16"})
    with pytest.raises(UserError, match="float16 needs a CUDA device"):
        pick_precision("cpu", "float16")  # device auto on a machine without CUDA ends here
    with pytest.raises(UserError, match="dtype: 'float8' must be one of auto, float32, bfloat16, float16"):
        load_config(None, {"dtype": "float8"})


def test_demo_config_fixes_float32():
    """The README's demo figures are float32 ones; auto would give bf16 on some CPUs."""
    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml")
    assert cfg.dtype == "float32"


# --- what eval and generate compute in: the dtype the run or the merged model records


def recorded_as(run: Path, dtype: str, tmp_path: Path) -> Path:
    """A copy of RUN whose peftko.json says it trained in DTYPE."""
    copy = tmp_path / f"run-{dtype}"
    shutil.copytree(run, copy)
    manifest = json.loads((copy / "peftko.json").read_text(encoding="utf-8"))
    (copy / "peftko.json").write_text(json.dumps({**manifest, "compute_dtype": dtype}), encoding="utf-8")
    return copy


def loaded_dtype(path: Path, dtype: str | None = None) -> tuple[str, torch.dtype]:
    """What the loader says it computes in, and the dtype its frozen weights hold (the adapter's own
    trainable weights stay float32, as peft keeps them)."""
    model, _, info = load_for_inference(path, device="cpu", dtype=dtype)
    return info.dtype, model.get_input_embeddings().weight.dtype


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["bf16-cpu", "plain-cpu"])
def test_an_adapter_computes_in_the_dtype_it_trained_in(tiny_run, tmp_path, monkeypatch, fast_bf16):
    monkeypatch.setattr(base_model, "_cpu_has_fast_bf16", lambda: fast_bf16)  # what auto would pick
    assert loaded_dtype(recorded_as(tiny_run, "float32", tmp_path)) == ("float32", torch.float32)
    assert loaded_dtype(recorded_as(tiny_run, "bfloat16", tmp_path)) == ("bfloat16", torch.bfloat16)
    run = recorded_as(tiny_run, "float16", tmp_path)  # a CUDA run used on the CPU: auto, said so
    assert loaded_dtype(run)[0] == ("bfloat16" if fast_bf16 else "float32")
    assert loaded_dtype(run, "float32")[0] == "float32"  # --dtype wins
    assert loaded_dtype(run, "auto")[0] == ("bfloat16" if fast_bf16 else "float32")


def test_a_merged_model_computes_in_the_dtype_it_was_written_in(tiny_run, small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(base_model, "_cpu_has_fast_bf16", lambda: True)
    merged = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(tiny_run), "--output", str(merged), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert loaded_dtype(merged) == ("float32", torch.float32)
    assert loaded_dtype(merged, "bfloat16")[0] == "bfloat16"
    result = CliRunner().invoke(main, ["eval", str(merged), "--data", str(small_corpus), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dtype"] == "float32"
    plain = tmp_path / "plain"  # a folder peftko did not write: the device's choice
    shutil.copytree(merged, plain, ignore=shutil.ignore_patterns("peftko-merge.json"))
    assert loaded_dtype(plain)[0] == "bfloat16"

"""The compute dtype: `auto` follows the device, an explicit `dtype` wins, impossible ones are refused."""

from __future__ import annotations

import pytest
import torch

from peftko.model import base as base_model
from peftko.model.base import pick_precision
from peftko.core.config import load_config
from peftko.core.errors import UserError


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
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml")
    assert cfg.dtype == "float32"

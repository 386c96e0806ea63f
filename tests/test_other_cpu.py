"""benchmarks/as_avx2_cpu.py: the library paths of a CPU with AVX2 only, taken on this one (the
measurement in benchmarks/RESULTS.md, "The demo on a CPU without AVX512", depends on it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # the emulated CPU, in its own processes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "as_avx2_cpu.py"
PROBE = ("import runpy; runpy.run_path({script!r}, run_name='probe')['emulate'](); "
         "import bitsandbytes.functional as F, torch; from peftko.model.base import pick_precision; "
         "print('bf16 probe', F.has_avx512bf16(), torch.backends.cpu.get_cpu_capability(), "
         "pick_precision('cpu').dtype_name)")


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="an x86-64 CPU")
def test_the_emulation_takes_the_paths_of_an_avx2_cpu():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    probe = subprocess.run([sys.executable, "-c", PROBE.format(script=str(SCRIPT))], env=env, cwd=ROOT,
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    # bitsandbytes' probe says no AVX512-BF16, torch runs AVX2 kernels, and dtype auto picks float32
    assert "bf16 probe False AVX2 float32" in probe.stdout, probe.stdout + probe.stderr
    refused = subprocess.run([sys.executable, str(SCRIPT), "peftko", "--version"], cwd=ROOT, capture_output=True,
                             text=True, env={k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"})
    assert refused.returncode != 0 and "ATEN_CPU_CAPABILITY=avx2" in refused.stderr

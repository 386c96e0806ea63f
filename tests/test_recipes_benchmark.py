"""benchmarks/recipes.py end to end on the CPU: both recipes, one process each, JSON lines + table.

Small settings keep it to the cost of the workers' imports; the real CPU figures come from
`python benchmarks/recipes.py --shape tiny --device cpu` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark script in its own processes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recipes.py"
KEYS = {"recipe", "shape", "device", "trainable_params", "peak_gib", "load_peak_gib", "tokens_per_s",
        "real_token_fraction", "mfu", "predicted_peak_gib"}


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("peftko_bench_recipes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_stdout(tmp_path_factory) -> str:
    # Built here (this process has torch already) and reused through --base-dir: one process fewer.
    base = tmp_path_factory.mktemp("bench") / "tiny"
    load_script().build_base("tiny", base, "cpu")
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--base-dir", str(base),
           "--steps", "3", "--seq-len", "64", "--batch-size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_one_json_line_per_recipe(bench_stdout):
    results = json_lines(bench_stdout)
    assert [r["recipe"] for r in results] == ["common", "peftko"]
    for r in results:
        assert KEYS <= r.keys()
        assert r["shape"] == "tiny" and r["device"] == "cpu"
        assert isinstance(r["tokens_per_s"], float) and r["tokens_per_s"] > 0
        assert r["peak_gib"] is None and r["load_peak_gib"] is None and r["mfu"] is None  # no CUDA
        assert 0 < r["real_token_fraction"] <= 1
        assert r["trainable_params"] > 0 and r["predicted_peak_gib"] > 0
        assert r["loss_first"] is not None and r["loss_last"] is not None
    common, peftko = results
    # modules_to_save trains both whole matrices; peftko trains LoRA + the 4 marker rows only.
    assert peftko["trainable_params"] < common["trainable_params"]
    assert peftko["kernels"] is None  # Liger never runs on the CPU


def test_markdown_table_with_ratios(bench_stdout):
    assert "| recipe | shape | device | trainable params | tokens/s |" in bench_stdout
    assert "| common | tiny | cpu |" in bench_stdout and "| peftko | tiny | cpu |" in bench_stdout
    ratios = [line for line in bench_stdout.splitlines() if line.startswith("| peftko / common")]
    assert len(ratios) == 1 and "x |" in ratios[0] and "n/a" in ratios[0]  # memory ratio needs CUDA


def test_one_ratio_line_per_baseline():
    """common-noamp differs from common only on a GPU (no autocast there is no bf16 on the CPU): its
    ratio line is checked on results shaped as the GPU run writes them."""
    row = dict(shape="8b", device_name="H100", error=None, mfu=0.3, predicted_peak_gib=1.0, load_peak_gib=1.0)
    results = [dict(row, recipe="common", trainable_params=1000, tokens_per_s=5000.0, peak_gib=36.0),
               dict(row, recipe="common-noamp", trainable_params=1000, tokens_per_s=2500.0, peak_gib=35.0),
               dict(row, recipe="peftko", trainable_params=40, tokens_per_s=7500.0, peak_gib=9.0)]
    lines = load_script().table(results).splitlines()
    assert "| peftko / common | 1.50x | 0.25x | 0.040x |" in lines
    assert "| peftko / common-noamp | 3.00x | 0.26x | 0.040x |" in lines


def test_bad_recipe_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--recipes", "axolotl"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--recipes" in proc.stderr

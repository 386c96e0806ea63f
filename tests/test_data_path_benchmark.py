"""benchmarks/data_path.py still runs (its figures live in benchmarks/RESULTS.md, not in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark script in its own processes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "data_path.py"


def test_the_data_path_benchmark_runs_and_prints_its_table(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "0.05", "--shapes", "lines",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| lines |")]
    assert len(rows) == 1 and rows[0].split("|")[-2].strip() != "0", proc.stdout  # train tokens

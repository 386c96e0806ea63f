"""benchmarks/merge_memory.py still runs (its figures live in benchmarks/RESULTS.md, not in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark script in its own processes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_memory.py"


def test_the_merge_memory_benchmark_runs_and_prints_the_streaming_merge(tmp_path):
    """The streaming path only: each path is one process of imports (some 11 s on 2 cores), and the
    old path is merge.merge_and_check, the in-memory fallback `peftko merge` itself runs and tests."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "0.01", "--hidden-size", "256",
                           "--paths", "new", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| 0.")]
    assert [r[4].strip() for r in rows] == ["new"], proc.stdout
    assert all(float(r[5]) > float(r[6]) > 0 for r in rows), proc.stdout  # peak above the imports

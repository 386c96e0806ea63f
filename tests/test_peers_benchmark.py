"""benchmarks/peers_real.py on the tiny base: a row per recipe, measured the same way, and the peers'
training code free of peftko.

The real figures come from `python benchmarks/peers_real.py` on builtin:gemma-3-270m
(benchmarks/RESULTS.md); here two steps and one short sample keep it to the processes' start-up.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmark scripts, in processes of their own (tests/test_suite_markers.py)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "peers_real.py"
PEERS = BENCH / "peer_recipes.py"
KEYS = {"recipe", "bpc", "bpc_text", "structure", "samples", "adapter_mb", "adapter_folder_mb", "s_per_step",
        "peak_rss_gib", "tokens_per_char"}


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_peers_training_code_does_not_import_peftko():
    names = imported_modules(PEERS)
    assert "peft" in names and "transformers" in names  # the check reads the real imports
    assert "peftko" not in names


def test_held_out_books_are_the_demos_split():
    """HELD_OUT is what lora-train's own split chooses for the demo (val_fraction 0.1, seed 42)."""
    from peftko.data.packing import choose_val_docs

    bench = load(SCRIPT, "peftko_bench_peers")
    books = sorted(bench.CORPUS.glob("*.txt"))
    chosen = {books[i].name for i in choose_val_docs(len(books), 0.1, 42)}
    assert chosen == set(bench.HELD_OUT)
    assert len(bench.training_files()) == len(books) - 2
    assert not {f.name for f in bench.training_files()} & chosen


def test_peer_markers_are_the_corpus_markers():
    from peftko.core.config import DEFAULT_MARKER_PATTERN
    from peftko.corpus.reading import read_documents

    bench = load(SCRIPT, "peftko_bench_peers")
    _, found = read_documents([str(bench.CORPUS)], DEFAULT_MARKER_PATTERN)
    assert sorted(load(PEERS, "peftko_bench_peer_recipes").MARKERS) == sorted(found)


def test_bad_recipe_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--recipes", "axolotl"], check=False, capture_output=True, text=True)
    assert proc.returncode == 2 and "--recipes" in proc.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("peers")
    cmd = [sys.executable, str(SCRIPT), "--model", "builtin:tiny-llama", "--max-steps", "3", "--samples", "1",
           "--max-new-tokens", "8", "--out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, out


def test_a_row_per_recipe_measured_alike(tiny_run):
    stdout, out = tiny_run
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"recipe"')]
    assert [r["recipe"] for r in rows] == ["peftko", "peft-tokens", "unsloth", "as-text"]
    by = {r["recipe"]: r for r in rows}
    for r in rows:
        assert KEYS <= r.keys()
        assert 0 < r["bpc_text"] and 0 < r["bpc"]
        assert r["samples"] == 1 and 0 <= r["structure"] <= 1
        assert r["s_per_step"] > 0 and len(r["step_s"]) == 3 and r["peak_rss_gib"] > 0.1
        assert (out / r["recipe"] / "merged" / "config.json").is_file()
    # The same held-out text is scored: markers as text cost more tokens per character than as tokens.
    assert by["as-text"]["tokens_per_char"] > by["peft-tokens"]["tokens_per_char"]
    assert by["peft-tokens"]["tokens_per_char"] == by["unsloth"]["tokens_per_char"] == by["peftko"]["tokens_per_char"]
    # Unsloth's recipe saves whole matrices, PEFT's the resized embedding; peftko only its marker rows.
    assert by["unsloth"]["adapter_mb"] > by["peft-tokens"]["adapter_mb"] > by["peftko"]["adapter_mb"]
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| recipe | held-out bpc, whole | story text | structure |") and len(table) == 5  # the header and a row per recipe
    assert json.loads(stdout.splitlines()[-1])["steps"] == 3


def test_a_folder_it_did_not_write_is_refused_not_removed(tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--recipe", "as-text", "--out", str(tmp_path)],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 2 and "not an earlier output" in proc.stderr and "Traceback" not in proc.stderr
    assert mine.read_text() == "keep me"

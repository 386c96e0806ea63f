"""A base peftko builds into its cache is checked against its build record on every use, and a
damaged one is built again with a line saying so, never trained on (issue 34, item 4).

The Gemma build itself (a minute, peftko[real]) is replaced here by a tiny base written in its
place; tests/test_real_base.py builds the real one.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.model import gemma_base as gemma
from peftko.model.built_base import RECORD, Rebuilt, confirm, damage, recorded_files
from tests.conftest import train_args


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_bases):
    """A private PEFTKO_HOME (.path) whose `builtin:gemma-3-270m` build copies a tiny base (.builds: each build)."""
    import shutil

    monkeypatch.setenv("PEFTKO_HOME", str(tmp_path / "home"))
    builds = []

    def fake_build(out):
        builds.append(out)
        shutil.copytree(tiny_bases["llama-tied"], out)

    monkeypatch.setattr(gemma, "_build_base", fake_build)
    monkeypatch.setattr(gemma, "_check_installed", lambda: None)
    return SimpleNamespace(path=tmp_path / "home", builds=builds)


def flip(path, offset, width=4096):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytes(b ^ 0x5A for b in f.read(width))
        f.seek(offset)
        f.write(data)


def test_a_build_records_every_file_it_wrote_last(home):
    target = gemma.gemma_base()
    files = recorded_files(target)
    assert set(files) == {p.name for p in target.iterdir() if p.name != RECORD}
    assert files["model.safetensors"]["size"] == (target / "model.safetensors").stat().st_size
    assert damage(target) is None and len(home.builds) == 1
    assert gemma.gemma_base() == target and len(home.builds) == 1  # verified, not rebuilt


def test_changed_bytes_are_built_again_and_only_peftkos_files_replaced(home, capsys):
    target = gemma.gemma_base()
    confirm(target)
    weights = target / "model.safetensors"
    good = weights.read_bytes()
    flip(weights, len(good) // 2)
    (target / "my-notes.txt").write_text("mine", encoding="utf-8")
    capsys.readouterr()
    assert gemma.gemma_base() == target and len(home.builds) == 1  # handed out while its bytes are hashed
    with pytest.raises(Rebuilt):
        confirm(target)  # before the weights are used
    assert len(home.builds) == 2
    said = capsys.readouterr()
    line = f"the built base in {target} was damaged (model.safetensors differs from what was built); building it again"
    assert line in said.out + said.err, said
    assert weights.read_bytes() == good and damage(target) is None
    assert (target / "my-notes.txt").read_text(encoding="utf-8") == "mine"
    confirm(target)  # confirmed once: nothing left to compare


def test_the_hash_runs_while_the_caller_loads(home, monkeypatch):
    """gemma_base() returns before every byte is hashed; confirm() waits for the hash. A check that
    hashed first would hang here, since the hash cannot finish before the test lets it."""
    import threading

    from peftko.core import hashing

    target = gemma.gemma_base()
    with hashing._lock:
        hashing._memo.clear()
    release, real = threading.Event(), hashing.sha256_of

    def held(path):
        assert release.wait(30), "the hash was never let go"
        return real(path)

    monkeypatch.setattr(hashing, "sha256_of", held)
    loaded = []
    timer = threading.Timer(0.5, lambda: (loaded.append(len(home.builds)), release.set()))
    timer.start()
    assert gemma.gemma_base() == target and not release.is_set()  # returned while the hash was held
    confirm(target)
    assert release.is_set() and loaded == [1] and len(home.builds) == 1
    timer.join()


@pytest.mark.parametrize("harm", ["header", "truncated", "no record", "missing file"])
def test_each_kind_of_damage_is_built_again(home, harm, capsys):
    target = gemma.gemma_base()
    weights = target / "model.safetensors"
    if harm == "header":
        flip(weights, 8, 64)  # the JSON header
    elif harm == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    elif harm == "no record":  # a build cut short before its record, or one by an older peftko
        (target / RECORD).unlink()
    else:
        (target / "tokenizer.json").unlink()
    capsys.readouterr()
    gemma.gemma_base()
    said = capsys.readouterr()
    assert "was damaged" in said.out + said.err and "download" not in said.out + said.err
    assert len(home.builds) == 2 and damage(target) is None


@pytest.mark.slow  # a training run (about 8 s on a quiet 2-core machine)
@pytest.mark.parametrize("where", ["header", "middle"])
def test_lora_train_never_trains_on_a_damaged_built_base(home, small_corpus, tmp_path, where):
    target = gemma.gemma_base()
    weights = target / "model.safetensors"
    # a corrupted header is seen at once; bytes in the middle once hashed, after the load
    flip(weights, 8, 64) if where == "header" else flip(weights, weights.stat().st_size // 2)
    result = CliRunner().invoke(main, train_args(gemma.NAME, small_corpus, tmp_path / "run", "--quant", "none",
                                                 "--max-steps", "1"))
    assert result.exit_code == 0, result.output
    assert "was damaged" in result.output and "download it again" not in result.output
    assert len(home.builds) == 2 and damage(target) is None
    record = json.loads((tmp_path / "run" / "peftko.json").read_text(encoding="utf-8"))
    built = recorded_files(target)["model.safetensors"]["sha256"]
    assert record["base_fingerprint"]["weights"]["model.safetensors"] == built  # one hash serves both


def test_generate_on_a_damaged_built_base_builds_it_again_first(home, capsys):
    target = gemma.gemma_base()
    confirm(target)
    weights = target / "model.safetensors"
    good = weights.read_bytes()
    flip(weights, len(good) // 2)
    result = CliRunner().invoke(main, ["generate", gemma.NAME, "--prompt", "달빛", "--max-new-tokens", "3",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "was damaged (model.safetensors differs from what was built)" in result.output
    assert len(home.builds) == 2 and weights.read_bytes() == good


@pytest.mark.slow  # a training run on the tiny base, two generations and a merge (about 15 s on 2 cores)
def test_a_run_whose_built_base_was_damaged_or_removed_has_it_built_again(home, small_corpus, tmp_path):
    """A run records its base by folder; where that folder is peftko's built base, a damaged or removed
    one is built again from its source, not called "changed since training" or "not found"."""
    import shutil

    run = tmp_path / "run"
    result = CliRunner().invoke(main, train_args(gemma.NAME, small_corpus, run, "--quant", "none", "--max-steps", "1"))
    assert result.exit_code == 0, result.output
    target = gemma.gemma_base()
    weights = target / "model.safetensors"
    generate = ["generate", str(run), "--prompt", "달빛", "--max-new-tokens", "3", "--device", "cpu"]
    for command in (generate, ["merge", str(run), "--output", str(tmp_path / "merged")]):
        flip(weights, weights.stat().st_size // 2)
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, result.output
        assert "was damaged (model.safetensors differs from what was built)" in result.output, result.output
        assert "changed since training" not in result.output
    assert (tmp_path / "merged" / "model.safetensors").is_file() and len(home.builds) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # the first try's stage is gone
    shutil.rmtree(target)
    result = CliRunner().invoke(main, generate)
    assert result.exit_code == 0 and "building builtin:gemma-3-270m" in result.output, result.output
    assert len(home.builds) == 4

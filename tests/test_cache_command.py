"""`peftko cache` lists peftko's caches with sizes and clears only what peftko wrote (issue 34, item 7)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.model.built_base import RECORD, install
from peftko.train import caches
from tests.conftest import train_args


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_bases):
    """A PEFTKO_HOME holding one token cache, one built base (with a user's file in it), a base
    folder without a record, and files that are not peftko's."""
    home = tmp_path / "home"
    monkeypatch.setenv("PEFTKO_HOME", str(home))
    tokens = home / "datasets" / ("ab" * 10)
    (tokens / "train").mkdir(parents=True)
    (tokens / "train" / "data-00000-of-00001.arrow").write_bytes(b"\0" * 300_000)
    (tokens / "stats.json").write_text("{}", encoding="utf-8")
    stage = tmp_path / "stage"
    shutil.copytree(tiny_bases["llama-tied"], stage)
    install(stage, home / "bases" / "tiny-llama")
    (home / "bases" / "tiny-llama" / "my-notes.txt").write_text("mine", encoding="utf-8")
    shutil.copytree(tiny_bases["llama-untied"], home / "bases" / "unrecorded")
    (home / "datasets" / "my-data").mkdir()
    (home / "README-mine.txt").write_text("mine", encoding="utf-8")
    return home


def test_lists_each_cache_with_its_size_and_kind(home):
    result = invoke("cache")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("  ")}
    assert "293.0 KB" in lines["datasets/" + "ab" * 10] and "tokens" in lines["datasets/" + "ab" * 10]
    assert "bases" in lines["bases/tiny-llama"] and "other" in lines["bases/unrecorded"]
    assert "other" in lines["datasets/my-data"] and "other" in lines["README-mine.txt"]
    as_json = invoke("cache", "--progress", "json")
    entries = [json.loads(x) for x in as_json.output.splitlines() if x.startswith("{")]
    listed = next(e for e in entries if e.get("event") == "result")["value"]["entries"]
    base = next(e for e in listed if e["path"].endswith("tiny-llama"))
    assert base["bytes"] == sum(p.stat().st_size for p in (home / "bases" / "tiny-llama").iterdir()
                                if p.name not in (RECORD, "my-notes.txt"))


def test_clear_tokens_removes_only_the_token_blocks(home):
    result = invoke("cache", "--clear", "tokens")
    assert result.exit_code == 0, result.output
    assert f"removed {home / 'datasets' / ('ab' * 10)}" in result.output
    assert not (home / "datasets" / ("ab" * 10)).exists()
    assert (home / "bases" / "tiny-llama" / "model.safetensors").is_file()
    assert (home / "datasets" / "my-data").is_dir()


def test_clear_removes_only_what_peftko_wrote_and_says_so(home):
    before_unrecorded = sorted(p.name for p in (home / "bases" / "unrecorded").iterdir())
    result = invoke("cache", "--clear")
    assert result.exit_code == 0, result.output
    assert "removed" in result.output and "freed" in result.output
    assert sorted(p.name for p in (home / "bases" / "tiny-llama").iterdir()) == ["my-notes.txt"]
    assert sorted(p.name for p in (home / "bases" / "unrecorded").iterdir()) == before_unrecorded
    assert (home / "README-mine.txt").is_file() and (home / "datasets" / "my-data").is_dir()
    again = invoke("cache", "--clear")
    assert again.exit_code == 0 and "nothing to remove" in again.output


@pytest.mark.slow  # a one-step training run (about 4 s on a quiet 2-core machine)
def test_a_run_that_writes_a_large_token_cache_says_where(tiny_bases, small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKO_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(caches, "LARGE_TOKEN_CACHE", 1)  # the small corpus's cache counts as large here
    result = invoke(*train_args(tiny_bases["llama-tied"], small_corpus, tmp_path / "run", "--quant", "none",
                                "--max-steps", "1"))
    assert result.exit_code == 0, result.output
    line = next((x for x in result.output.splitlines() if x.startswith("token cache:")), None)
    assert line is not None and str(tmp_path / "home" / "datasets") in line and "peftko cache" in line, result.output

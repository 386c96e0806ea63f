"""The bottom layer of every write: a result is whole or absent, and a failure leaves the old one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftko.core.atomic import (process_alive, remove_dir, replace_dir, replaced_on_success, staging_dir,
                                write_json_atomic)


def folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "f.txt").write_text(text)
    return path


def test_replace_dir_swaps_in_the_new_folder_and_leaves_nothing_else(tmp_path):
    target, new = folder(tmp_path / "out", "old"), folder(tmp_path / "new", "new")
    replace_dir(new, target, ".trash-")
    assert (target / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path):
    target = folder(tmp_path / "out", "old")
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "missing", target, ".trash-")
    assert (target / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_remove_dir_leaves_nothing(tmp_path):
    remove_dir(folder(tmp_path / "checkpoint-3", "x"))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "peftko.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError), replaced_on_success(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["peftko.json"]


def test_results_get_the_permissions_of_an_ordinary_write(tmp_path):
    mask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "r.json", [])
    finally:
        os.umask(mask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_a_staging_folder_goes_whatever_happens(tmp_path):
    with pytest.raises(KeyboardInterrupt), staging_dir(tmp_path, ".stage-") as stage:
        (stage / "part").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_process_alive():
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert process_alive(os.getpid())
    assert not process_alive(int(ended.stdout))
    for not_a_pid in (0, -1, "123", None, True):
        assert not process_alive(not_a_pid)

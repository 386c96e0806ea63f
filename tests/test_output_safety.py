"""Nothing a user owns is deleted: where an output may be, what --force may replace, one writer
per output (a lock, tested with two real processes), and merge's checks of what it reads.

A trained run (tiny untied Llama, 2 steps) and one merge of it are shared by the module.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftko.run.layout import LOCK
from tests.test_resilience import REPO, Run, args, env, invoke, logged_a_step, refused  # noqa: F401


def tree(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(env):
    out = env.root / "safety" / "run"
    r = invoke(args(env, out, "--max-steps", "2", "--save-steps", "2"))
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def merged(finished):
    out = finished.parent / "merged"
    r = invoke(["merge", str(finished), "--output", str(out), "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


# --- 1. where an output may be, and what --force may replace
@pytest.mark.parametrize("where", ["corpus", "inside-corpus", "above-corpus", "base", "cwd", "home"])
def test_force_never_writes_into_an_input_the_cwd_or_home(env, tmp_path, monkeypatch, where):
    corpus = tmp_path / "data" / "corpus"
    shutil.copytree(env.corpus, corpus)
    base = tmp_path / "base"
    shutil.copytree(env.base, base)
    cwd, home = tmp_path / "work", tmp_path / "users" / "me"
    for d in (cwd, home):
        d.mkdir(parents=True)
        (d / "mine.txt").write_text("mine", encoding="utf-8")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    output = {"corpus": corpus, "inside-corpus": corpus / "out", "above-corpus": corpus.parent,
              "base": base, "cwd": Path("."), "home": home.parent}[where]
    before = tree(tmp_path)
    argv = args(env, output, "--max-steps", "1", "--force")
    argv[argv.index("--data") + 1], argv[argv.index("--model") + 1] = str(corpus), str(base)
    refused(invoke(argv), 2, "--output", "peftko never")
    assert tree(tmp_path) == before


def test_force_refuses_a_directory_peftko_did_not_write(env, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("my notes", encoding="utf-8")
    refused(invoke(args(env, out, "--max-steps", "1", "--force")), 2, "keep.txt", "did not write")
    assert tree(out) == {Path("keep.txt"): b"my notes"}


def test_force_refuses_a_trainer_output_that_only_looks_like_a_run(env, tmp_path):
    """A Hugging Face Trainer's folder: checkpoint-N, an adapter, a card. No record of peftko's in it."""
    out = tmp_path / "hf"
    (out / "checkpoint-500").mkdir(parents=True)
    (out / "checkpoint-500" / "optimizer.pt").write_bytes(b"state")
    (out / "adapter_model.safetensors").write_bytes(b"mine")
    (out / "README.md").write_text("card", encoding="utf-8")
    before = tree(out)
    refused(invoke(args(env, out, "--max-steps", "1", "--force")), 2, "checkpoint-500/", "did not write")
    assert tree(out) == before


def test_force_refuses_a_checkpoint_peftko_did_not_seal_inside_a_run(env, run_copy):
    (run_copy / "checkpoint-500").mkdir()
    (run_copy / "checkpoint-500" / "optimizer.pt").write_bytes(b"someone else's")
    before = tree(run_copy)
    refused(invoke(args(env, run_copy, "--max-steps", "1", "--force")), 2, "checkpoint-500/", "never deletes")
    assert tree(run_copy) == before


def test_force_refuses_a_run_directory_holding_a_file_peftko_did_not_write(env, run_copy):
    (run_copy / "notes.txt").write_text("mine", encoding="utf-8")
    before = tree(run_copy)
    refused(invoke(args(env, run_copy, "--max-steps", "1", "--force")), 2, "notes.txt", "never deletes")
    assert tree(run_copy) == before


def test_force_replaces_only_what_the_earlier_run_wrote(env, run_copy):
    assert (run_copy / "checkpoint-2").is_dir()
    r = invoke(args(env, run_copy, "--max-steps", "1", "--force"))
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in run_copy.iterdir())
    assert "checkpoint-2" not in names and LOCK not in names  # the old run is gone, the lock released
    assert json.loads((run_copy / "peftko.json").read_text())["results"]["steps"] == 1
    logged = [json.loads(ln)["step"] for ln in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 1  # the old run's log went with it


def test_merge_never_writes_into_its_inputs_or_over_what_it_did_not_write(finished, env, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(env.base, base)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine", encoding="utf-8")
    before = {p: tree(p) for p in (finished, base, mine)}
    for output, words in ((finished, "is the adapter directory"), (finished / "sub", "lies inside"),
                          (base, "is the base model"), (mine, "keep.txt")):
        refused(invoke(["merge", str(finished), "--output", str(output), "--base", str(base), "--force"]),
                2, words)
    assert {p: tree(p) for p in (finished, base, mine)} == before


def test_merge_force_replaces_an_earlier_merge_but_not_a_file_added_to_it(finished, merged, tmp_path):
    out = tmp_path / "merged"
    shutil.copytree(merged, out)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    refused(invoke(["merge", str(finished), "--output", str(out), "--force"]), 2, "notes.txt")
    (out / "notes.txt").unlink()
    refused(invoke(["merge", str(finished), "--output", str(out)]), 2, "merged model", "--force")
    r = invoke(["merge", str(finished), "--output", str(out), "--force", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    mark = json.loads((out / "peftko-merge.json").read_text())
    assert sorted(mark["files"] + ["peftko-merge.json"]) == sorted(p.name for p in out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no stage, no lock left


# --- 2. one writer per output
@pytest.mark.slow  # a real lora-train process; the fast check of a live lock is merge's, below
def test_a_second_run_into_a_running_runs_output_is_refused(env, tmp_path):
    out = tmp_path / "run"
    first = Run(env, out)
    try:
        deadline = time.monotonic() + 240
        while not logged_a_step(out):
            assert first.proc.poll() is None and time.monotonic() < deadline, first.text
            time.sleep(0.1)
        for extra in ((), ("--force",)):
            r = invoke(args(env, out, "--max-steps", "1", *extra))
            refused(r, 2, "in use by another peftko process", f"pid {first.proc.pid}")
        assert first.proc.poll() is None and (out / "run.json").exists()  # untouched, still running
        first.send(signal.SIGINT)
        assert first.proc.wait(timeout=120) == 130, first.text
    finally:
        first.proc.kill()
    assert not (out / LOCK).exists()  # released on the way out
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one writer: each step logged once


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(env, tmp_path, capsys):
    from peftko.core.lock import hold

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"pid": int(dead), "host": os.uname().nodename}))
    with hold(lock, "--output x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "took over the lock" in capsys.readouterr().out and not lock.exists()


def test_a_merge_into_an_output_another_process_is_writing_is_refused(finished, tmp_path):
    out = tmp_path / "merged"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from peftko.core.lock import hold\n"
         f"with hold(__import__('pathlib').Path({str(tmp_path / '.merged.peftko-lock')!r}), 'x'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(invoke(["merge", str(finished), "--output", str(out)]), 2, "in use", f"pid {holder.pid}")
        assert not out.exists()
    finally:
        holder.kill()


# --- 8. merge checks what it reads, and that it can write, before loading anything
@pytest.mark.parametrize("manifest, words", [
    ({}, "'base_model' is missing"),
    ([], "JSON list, not an object"),
    ("drop vocab", "'vocab' is missing"),
    ("markers not a list", "'markers' must be a list"),
])
def test_merge_refuses_a_malformed_manifest(run_copy, tmp_path, manifest, words):
    path = run_copy / "peftko.json"
    data = json.loads(path.read_text())
    if manifest == "drop vocab":
        del data["vocab"]
        manifest = data
    elif manifest == "markers not a list":
        manifest = {**data, "markers": "|SOUND|>"}
    path.write_text(json.dumps(manifest))
    refused(invoke(["merge", str(run_copy), "--output", str(tmp_path / "m")]), 2, "peftko.json", words)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("damage", ["truncated", "one byte"])
def test_merge_refuses_an_adapter_file_that_is_not_the_one_training_wrote(run_copy, tmp_path, damage):
    adapter = run_copy / "adapter_model.safetensors"
    data = adapter.read_bytes()
    adapter.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:-1] + bytes([data[-1] ^ 1]))
    refused(invoke(["merge", str(run_copy), "--output", str(tmp_path / "m")]), 2,
            "adapter_model.safetensors", "SHA-256")


def test_merge_refuses_a_run_saved_without_its_seal(run_copy, tmp_path):
    """An older peftko sealed nothing: its truncated adapter cannot be told from a whole one."""
    manifest = json.loads((run_copy / "peftko.json").read_text())
    del manifest["adapter_sha256"], manifest["seal"]
    (run_copy / "peftko.json").write_text(json.dumps(manifest))
    adapter = run_copy / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])
    refused(invoke(["merge", str(run_copy), "--output", str(tmp_path / "m")]), 2,
            "older peftko", "peftko.json", "Train again")


def test_merge_checks_that_the_output_is_writable_before_loading(finished, tmp_path, monkeypatch):
    import transformers

    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    real_open, real_mkdir = os.open, os.mkdir

    def denied(path):  # as a non-root user sees a read-only folder (root ignores the mode)
        if Path(path).resolve().is_relative_to(locked.resolve()):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(os, "open", lambda p, *a, **kw: denied(p) or real_open(p, *a, **kw))
    monkeypatch.setattr(os, "mkdir", lambda p, *a, **kw: denied(p) or real_mkdir(p, *a, **kw))
    loads = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: loads.append(a) or 1 / 0))
    refused(invoke(["merge", str(finished), "--output", str(locked / "merged")]), 2,
            "cannot write", str(locked))
    assert loads == []  # refused before the base was loaded
    locked.chmod(0o755)


@pytest.mark.parametrize("record", ['{"identity": 1}', "[]", '{"identity": {"config": {}}}'])
def test_resume_refuses_a_run_record_of_the_wrong_shape(env, run_copy, record):
    (run_copy / "run.json").write_text(record, encoding="utf-8")
    refused(invoke(args(env, run_copy, "--max-steps", "4", "--resume")), 2, "not a peftko run record")


def test_a_checkpoint_whose_state_does_not_read_is_not_resumed_from(env, run_copy):
    (run_copy / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2,', encoding="utf-8")
    refused(invoke(args(env, run_copy, "--max-steps", "4", "--resume")), 2, "no complete checkpoint",
            "checkpoint-2 incomplete")

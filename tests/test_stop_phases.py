"""Ctrl-C and SIGTERM in every phase of a real `lora-train` process, not only during the steps.

Before training there is nothing to save: one line, exit 130/143, and temporary folders removed.
After training, a stop during the final evaluation writes a checkpoint that --resume finishes;
one during the final save lets the save complete. A second signal never prints a traceback.
Each process is real and gets a real signal (tests/signal_points.py picks the moment).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from peftko.run.checkpoints import latest_checkpoint
from peftko.run.manifest import read_manifest
from tests.test_resilience import REPO, args, env, invoke  # noqa: F401 - env is a fixture

# Five real lora-train processes, started together: some 20 s on a quiet 2-core machine. A stop during a step
# stays in the fast subset (tests/test_resilience.py, a real SIGINT to the test process itself).
pytestmark = pytest.mark.slow


def start_at(env, point, signame, output, *options, home=None):
    cmd = [sys.executable, "-m", "tests.signal_points", point, signame, *options, "--",
           *args(env, output, "--max-steps", "2")]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PEFTKO_HOME": str(home or env.root / "home"),
                   "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=environment, cwd=REPO)


@pytest.fixture(scope="module")
def stopped(env):
    """The runs, started together (their imports take the longest), each signalled once at its point."""
    root = env.root / "phases"
    plans = {
        "data-SIGINT": ("data", "SIGINT", (), root / "home-int"),
        "data-SIGTERM": ("data", "SIGTERM", (), root / "home-term"),
        "evaluate": ("evaluate", "SIGTERM", (), None),
        "save": ("save", "SIGINT", ("--again-at-exit",), None),
        "save2": ("save2", "SIGINT", (), None),
        "report": ("report", "SIGTERM", (), None),
    }
    procs = {name: (start_at(env, point, sig, root / name, *opts, home=home), root / name, home)
             for name, (point, sig, opts, home) in plans.items()}
    runs = {}
    deadline = time.monotonic() + 300
    for name, (proc, output, home) in procs.items():
        text, _ = proc.communicate(timeout=max(1, deadline - time.monotonic()))
        runs[name] = {"code": proc.returncode, "text": text, "output": output, "home": home}
    return runs


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and "Exception ignored" not in text and "Aborted!" not in text, text


@pytest.mark.parametrize("name, code", [("data-SIGINT", 130), ("data-SIGTERM", 143)])
def test_a_stop_while_the_data_is_prepared_cleans_up_and_exits_with_one_line(stopped, name, code):
    r = stopped[name]
    assert r["code"] == code, r["text"]
    no_traceback(r["text"])
    signame = name.split("-")[1]
    assert r["text"].count(f"stopped by {signame}") == 1, r["text"]
    assert "before training began" in r["text"]
    datasets = r["home"] / "datasets"
    assert datasets.is_dir()  # the build had started ...
    assert not [p.name for p in datasets.iterdir() if p.name.startswith(".build-")]  # ... and was removed
    assert not r["output"].exists()  # "nothing in --output was changed": not even the folder it made


def test_a_stop_during_the_final_evaluation_writes_a_checkpoint_that_resume_finishes(env, stopped):
    r = stopped["evaluate"]
    assert r["code"] == 143, r["text"]
    no_traceback(r["text"])
    assert "stopped by SIGTERM; checkpoint written to" in r["text"] and "--resume" in r["text"]
    checkpoint = latest_checkpoint(r["output"])
    assert checkpoint is not None and checkpoint.name == "checkpoint-2", r["text"]
    assert not (r["output"] / "peftko.json").exists()
    resumed = invoke(args(env, r["output"], "--max-steps", "2", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert read_manifest(r["output"]).results.steps == 2


def test_a_stop_during_the_final_save_lets_it_complete(stopped):
    r = stopped["save"]
    assert r["code"] == 130, r["text"]
    no_traceback(r["text"])  # the second SIGINT arrived during interpreter shutdown
    assert "finishing the save" in r["text"] and "after the adapter was written" in r["text"]
    manifest = read_manifest(r["output"])  # complete: every file, the adapter's hash matches
    assert manifest.results.steps == 2
    assert not (r["output"] / ".peftko.lock").exists()


def test_a_second_signal_during_the_save_stops_at_once_without_a_traceback(stopped):
    r = stopped["save2"]
    assert r["code"] == 130, r["text"]
    no_traceback(r["text"])
    assert "SIGINT again: stopping at once" in r["text"]
    assert not (r["output"] / ".peftko.lock").exists()
    assert not (r["output"] / "peftko.json").exists() or read_manifest(r["output"])
    assert json.loads((r["output"] / "run.json").read_text())["identity"]


def test_a_stop_after_the_adapter_was_written_says_the_run_is_complete(stopped):
    """Not "before training began; nothing in --output was changed": that sent users to --force."""
    r = stopped["report"]
    assert r["code"] == 143, r["text"]
    no_traceback(r["text"])
    assert "before training began" not in r["text"] and "nothing in --output was changed" not in r["text"]
    assert f"after the adapter was written: the run in {r['output']} is complete" in r["text"], r["text"]
    read_manifest(r["output"])  # and it is: a finished run merge accepts


@pytest.mark.parametrize("phase", ["prepare", "train", "save"])
def test_a_forked_worker_ends_on_sigterm_whatever_the_commands_phase(phase):
    """A tokenising pool's workers are forked from the command and inherit its handler; Pool.terminate
    SIGTERMs them, and one that took 'finish this step' instead would hang the command for ever."""
    import signal

    from peftko.core.signals import Stopper

    stopper = Stopper("before the command finished.")
    with stopper.installed():
        stopper.phase = phase
        read, write = os.pipe()
        ready_read, ready_write = os.pipe()
        child = os.fork()
        if child == 0:  # the worker: waits on its queue, as a pool's worker does
            os.close(write)
            os.write(ready_write, b"r")
            os.read(read, 1)
            os._exit(0)
        os.close(read)
        # A signal that reaches the child before Python's after-fork reset is dropped with it, as it
        # would be in any forked Python: signal once the child is running, as Pool.terminate does.
        os.read(ready_read, 1)
        os.close(ready_read)
        os.close(ready_write)
        os.kill(child, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not (done := os.waitpid(child, os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        if not done[0]:  # it took the command's handler and kept waiting: what hung Pool.terminate
            os.kill(child, signal.SIGKILL)
            done = os.waitpid(child, 0)
        status = done[1]
        os.close(write)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
    assert stopper.signum is None  # the command itself was not stopped


def test_a_forked_worker_signalled_while_it_starts_ends_too():
    """Pool.terminate may SIGTERM a worker forked a moment before, still inside Python's after-fork
    reset, which clears the signals caught so far: such a worker lost the signal and its pool waited
    for ever (the clean-clone suite once hung here in test_packing). Forked with the signals blocked,
    the child takes the signal once it runs. Signalled at once after each fork, every child ends."""
    import signal

    from peftko.core.signals import Stopper

    def fork_and_terminate() -> int:
        child = os.fork()
        if child == 0:
            time.sleep(30)  # a worker waiting on its queue
            os._exit(0)
        os.kill(child, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not (done := os.waitpid(child, os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        if not done[0]:  # the signal was lost: the hang
            os.kill(child, signal.SIGKILL)
            done = os.waitpid(child, 0)
        return done[1]

    stopper = Stopper("before the command finished.")
    with stopper.installed():
        stopper.phase = "prepare"
        statuses = [fork_and_terminate() for _ in range(20)]
    lost = [s for s in statuses if not (os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGTERM)]
    assert not lost, f"{len(lost)} of 20 children lost their SIGTERM"
    assert stopper.signum is None

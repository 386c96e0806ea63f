"""Data-parallel training: real `torchrun --nproc_per_node 2` runs on the CPU (gloo).

Two ranks of a real `peftko lora-train` train a tiny 4-bit Llama. Checked: every file and console
line is written once (rank 0), metrics.jsonl holds each step once, checkpoints are complete (both
ranks' RNG states, sealed), a resume continues, SIGTERM stops both ranks after the same step with
one checkpoint, and the adapter equals a one-process run with the same global batch.
Each launch costs some 30 s of imports on a 2-core machine, so there are three, shared by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from peftko.run.checkpoints import complete_checkpoints
from peftko.cli import main
from tests.conftest import two_story_env

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")

pytestmark = [pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python"),
              pytest.mark.slow]  # torchrun: three launches of two ranks, some 10 s each


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with two_story_env(tmp_path_factory.mktemp("ddp")) as built:
        yield built


def args(env, output: Path, *extra: str) -> list[str]:
    # No dropout and a constant rate: the 1- and 2-process runs must compute the same steps, in
    # float32 (the tolerance below is float32's) whatever `auto` would choose on this CPU.
    return [
        "lora-train", "--model", str(env.base), "--data", str(env.corpus), "--output", str(output),
        "--dtype", "float32", "--seq-len", "64", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "4",
        "--save-steps", "2",
        "--lr", "1e-2", "--embedding-lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
        "--logging-steps", "1", "--eval-steps", "0", "--val-fraction", "0.25", "--device", "cpu",
        "--warmup-ratio", "0", "--scheduler", "constant", "--seed", "3", *extra,
    ]


def launch(env, output: Path, *extra: str) -> subprocess.Popen:
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
           "-m", "peftko", *args(env, output, *extra)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PEFTKO_HOME": str(env.root / "home"),
                   "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment, cwd=REPO)


def launch_until_a_step(env, output: Path) -> subprocess.Popen:
    """A long 2-rank run, returned once its first step is logged."""
    proc = launch(env, output, "--max-steps", "100000", "--save-steps", "0", "--val-fraction", "0")
    deadline = time.monotonic() + 300
    while not ((output / "metrics.jsonl").is_file() and '"loss"' in (output / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


Done = namedtuple("Done", "code stdout stderr")


def torchrun(env, output: Path, *extra: str, timeout: int = 300) -> Done:
    proc = launch(env, output, *extra)
    stdout, stderr = proc.communicate(timeout=timeout)
    return Done(proc.returncode, stdout, stderr)


def metrics(output: Path) -> list[dict]:
    return [json.loads(ln) for ln in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two(env):
    """A finished 2-process run: 4 steps of 2 blocks on each rank, checkpoints at steps 2 and 4."""
    out = env.root / "two"
    done = torchrun(env, out)
    assert done.code == 0, done.stdout + done.stderr
    return out, done


def test_every_file_and_line_is_written_once(two):
    out, done = two
    for line in ("data: ", "trainable parameters:", "held-out bits per character:", "adapter written to"):
        assert done.stdout.count(line) == 1, (line, done.stdout)
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == [1, 2, 3, 4], metrics(out)
    assert sum("bpc_after" in r for r in metrics(out)) == 1
    # Both ranks' blocks count: 2 processes x 2 blocks of 62 tokens a step.
    assert [r["tokens_seen"] for r in metrics(out) if "loss" in r] == [248, 496, 744, 992]
    manifest = json.loads((out / "peftko.json").read_text())
    assert manifest["results"]["steps"] == 4
    assert json.loads((out / "run.json").read_text())["identity"]["processes"] == 2
    assert not list(out.glob(".*staging*")) and not list(out.glob(".final-*"))


def test_checkpoints_are_complete_with_every_ranks_rng_state(two):
    out, _ = two
    done = complete_checkpoints(out)
    assert [p.name for p in done] == ["checkpoint-2", "checkpoint-4"]
    for ckpt in done:
        names = {p.name for p in ckpt.iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= names
        assert json.loads((ckpt / "checkpoint.json").read_text())["processes"] == 2


def test_two_processes_train_what_one_does_with_the_same_global_batch(env, two):
    """2 processes x batch 2 against 1 process x batch 4: the same blocks in each step (the ranks
    take consecutive batches of one shuffled order), so the same adapter up to float32 rounding.

    Tolerance: the runs add the same per-token losses in another order (two partial gradients
    all-reduced vs one batch), a relative difference of ~1e-7 in each gradient. Adam divides the
    gradient by its own root mean square, so that stays ~1e-7 relative in each update except for
    gradients as small as the rounding itself, whose update is ~lr x g / eps < 1e-5 here. After 4
    steps at lr 1e-2 the trained values move by ~4e-2, so 1e-4 is 400x below the training signal
    while any difference in the data (another block, another batch size) moves them by ~1e-3 or
    more (a check below makes sure of that).
    """
    out, _ = two
    single = env.root / "single"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTKO_HOME", str(env.root / "home"))
        r = CliRunner().invoke(main, args(env, single, "--batch-size", "4"))
        assert r.exit_code == 0, r.output
        other = env.root / "single-half-batch"
        r = CliRunner().invoke(main, args(env, other, "--batch-size", "2"))
        assert r.exit_code == 0, r.output
    a, b = load_file(out / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    c = load_file(other / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((b[k] - c[k]).abs().max()) for k in a)
    assert diff < 1e-4, diff
    assert moved > 1e-3, moved  # the check can fail: half the global batch trains something else


def test_resume_with_the_same_number_of_processes_continues(env, two):
    out, _ = two
    resumed = env.root / "resumed"
    shutil.copytree(out, resumed)
    done = torchrun(env, resumed, "--max-steps", "6", "--resume")
    assert done.code == 0, done.stdout + done.stderr
    assert done.stdout.count("resuming from") == 1
    steps = [r["step"] for r in metrics(resumed) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in complete_checkpoints(resumed)][-1] == "checkpoint-6"
    assert "rng_state_1.pth" in {p.name for p in (resumed / "checkpoint-6").iterdir()}


def test_resume_on_another_count_needs_the_same_global_batch(env, two):
    out, _ = two
    copy = env.root / "one-gpu-resume"
    shutil.copytree(out, copy)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTKO_HOME", str(env.root / "home"))
        r = CliRunner().invoke(main, args(env, copy, "--max-steps", "6", "--resume"))
        assert r.exit_code == 2, r.output
        assert "global batch: 2 x 1 accumulation x 2 process(es) = 4 -> 2 x 1 accumulation x 1 " in r.output
        # Twice the accumulation on one process is the same global batch: it continues.
        r = CliRunner().invoke(main, args(env, copy, "--max-steps", "6", "--grad-accum", "2", "--resume"))
        assert r.exit_code == 0, r.output
    assert [r["step"] for r in metrics(copy) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_sigterm_stops_every_rank_after_the_same_step_with_one_checkpoint(env):
    out = env.root / "signalled"
    proc = launch_until_a_step(env, out)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
    stdout, stderr = proc.communicate(timeout=120)
    done = complete_checkpoints(out)
    assert len(done) == 1, (stdout, stderr)
    names = {p.name for p in done[0].iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= names, names
    assert stderr.count("checkpoint written to") == 1, stderr
    # torchrun itself reports the signal with its own traceback; the ranks print none (no frame of
    # peftko's own code, whatever the checkout folder is called).
    assert "peftko rank" not in stderr and f"{REPO / 'peftko'}{os.sep}" not in stderr, stderr


def test_dry_run_plans_per_card_and_the_global_batch(env):
    r = CliRunner().invoke(main, args(env, env.root / "dry", "--dry-run", "--num-processes", "4"))
    assert r.exit_code == 0, r.output
    assert "per card, 4 data-parallel processes" in r.output
    assert "2 x 1 accumulation x 4 processes = 8 blocks" in r.output
    assert "DDP gradient buckets" in r.output
    r = CliRunner().invoke(main, args(env, env.root / "dry", "--num-processes", "4"))
    assert r.exit_code == 2 and "torchrun --nproc_per_node" in r.output, r.output


def test_fsdp_launch_is_refused_with_the_reason(env, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    r = CliRunner().invoke(main, args(env, env.root / "fsdp"))
    assert r.exit_code == 2 and "use_orig_params" in r.output and "accelerate launch --multi_gpu" in r.output
    assert not (env.root / "fsdp").exists()


def _rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the launcher's workers (its children that carry RANK in their environment)."""
    found = {}
    for child in Path("/proc").glob("[0-9]*"):
        try:
            if int((child / "stat").read_text().rsplit(")", 1)[1].split()[1]) != proc.pid:
                continue
            env = dict(e.split("=", 1) for e in (child / "environ").read_text().split("\0") if "=" in e)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(child.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_killed_rank_ends_the_others_without_a_traceback(env):
    out = env.root / "killed"
    proc = launch_until_a_step(env, out)
    os.kill(_rank_pids(proc)[1], signal.SIGKILL)  # as the OOM killer or a lost machine would
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0
    # The surviving rank says what happened in one line; no frame of peftko's own code is printed.
    assert f"{REPO / 'peftko'}{os.sep}" not in stderr and "peftko rank" not in stderr, stderr
    # rank 0 reads the lost peer first; the launcher's SIGTERM may beat it on a slow machine
    assert "another process of this run ended" in stderr or "stopped by SIGTERM" in stderr, stderr

"""Training that survives Ctrl-C, preemption, bad numbers, out-of-memory and full disks.

Everything runs on the CPU with one tiny untied Llama (hidden 64, 2 layers) built here, real
transformers/peft/torch parts, and real signals sent to a real `peftko lora-train` process. The
only injected failures are the ones a CPU cannot produce on demand: a CUDA out-of-memory error, a
full disk, and a forward pass that returns inf.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import TrainerCallback

import peftko.train.session
from peftko.run.checkpoints import complete_checkpoints, latest_checkpoint
from peftko.cli import main
from tests.conftest import two_story_env

REPO = Path(__file__).resolve().parents[1]


# --- fixtures and helpers
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One tiny base, a two-story corpus (32 blocks of 64 tokens: 16 steps an epoch) and a private
    PEFTKO_HOME."""
    threads = torch.get_num_threads()
    # One thread: with tiny matrices, two OpenMP threads on a busy 2-core machine spin-wait for
    # each other and run 5-7x slower (measured: 8 s vs 56 s for 30 steps).
    torch.set_num_threads(1)
    with two_story_env(tmp_path_factory.mktemp("resilience"), OMP_NUM_THREADS="1") as built:
        yield built
    torch.set_num_threads(threads)


def args(env, output, *extra) -> list[str]:
    return [
        "lora-train", "--model", str(env.base), "--data", str(env.corpus), "--output", str(output),
        "--quant", "none", "--device", "cpu", "--seq-len", "64", "--batch-size", "2", "--grad-accum", "1",
        "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--lr", "3e-3",
        "--embedding-lr", "3e-3", "--warmup-ratio", "0.1", "--scheduler", "cosine",
        "--logging-steps", "1", "--eval-steps", "0", "--val-fraction", "0", "--no-gradient-checkpointing",
        "--seed", "7", *extra,
    ]


def invoke(argv):
    return CliRunner().invoke(main, argv)


def refused(result, code=2, *words):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "error:" in result.output, result.output
    for w in words:
        assert w in result.output, (w, result.output)


def losses(output: Path) -> dict[int, float]:
    records = [json.loads(ln) for ln in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def add_callback(monkeypatch, callback):
    """Add a callback to the trainer peftko builds (the real one, with all of its own callbacks)."""
    real = peftko.train.session.make_trainer

    def make_trainer(*a, **kw):
        trainer = real(*a, **kw)
        trainer.add_callback(callback)
        return trainer

    monkeypatch.setattr(peftko.train.session, "make_trainer", make_trainer)


class SignalDuringStep(TrainerCallback):
    """A real SIGINT to this process while step `step` runs, as a Ctrl-C would arrive."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- 1. checkpoints and 3. resume
@pytest.fixture(scope="module")
def straight(env):
    """30 uninterrupted steps (two epochs), a checkpoint every 10, the last 2 kept."""
    out = env.root / "straight"
    r = invoke(args(env, out, "--max-steps", "30", "--save-steps", "10", "--save-total-limit", "2"))
    assert r.exit_code == 0, r.output
    return out


def test_checkpoints_hold_lora_rows_and_training_state_only(straight):
    kept = complete_checkpoints(straight)
    assert [p.name for p in kept] == ["checkpoint-20", "checkpoint-30"]  # the last K, never more
    assert not [p for p in straight.iterdir() if p.name.startswith(".")]  # no staging leftovers
    vocab = json.loads((straight / "peftko.json").read_text())["vocab"]["rows_after"]
    ckpt = kept[-1]
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "checkpoint.json"):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 30
    with safe_open(ckpt / "adapter_model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert any("trainable_tokens_delta" in k for k in shapes)  # the marker rows are there
    assert all(vocab not in shape for shape in shapes.values()), shapes  # no full embedding matrix
    # The last checkpoint's adapter is the final adapter.
    final, last = load_file(straight / "adapter_model.safetensors"), load_file(ckpt / "adapter_model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


def test_interrupt_and_resume_equals_an_uninterrupted_run(env, straight, tmp_path, monkeypatch):
    resumed = tmp_path / "resumed"
    argv = args(env, resumed, "--max-steps", "30", "--save-steps", "10", "--save-total-limit", "2")
    with monkeypatch.context() as mp:
        add_callback(mp, SignalDuringStep(10))
        r = invoke(argv)
    assert r.exit_code == 130, r.output
    assert "--resume" in r.output
    assert latest_checkpoint(resumed).name == "checkpoint-10"
    assert not (resumed / "peftko.json").exists()

    r = invoke([*argv, "--resume"])
    assert r.exit_code == 0, r.output
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 31))  # each step logged once, across two epochs
    assert b[30] == pytest.approx(a[30], abs=1e-4)
    fa, fb = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.allclose(fa[k], fb[k], atol=1e-6), k


def test_resume_refuses_changed_config_corpus_or_base_unless_forced(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        add_callback(mp, SignalDuringStep(2))
        assert invoke(args(env, out, "--max-steps", "8")).exit_code == 130

    refused(invoke(args(env, out, "--max-steps", "8", "--resume", "--lr", "1e-3")), 2,
            "config lr: 0.003 -> 0.001", "--force")
    corpus = tmp_path / "corpus"
    shutil.copytree(env.corpus, corpus)
    first = sorted(corpus.iterdir())[0]
    first.write_text(first.read_text(encoding="utf-8") + "\n덧붙인 문장.\n", encoding="utf-8")
    argv = args(env, out, "--max-steps", "8", "--resume")
    argv[argv.index("--data") + 1] = str(corpus)
    refused(invoke(argv), 2, f"corpus: {first.name} changed")
    base = tmp_path / "base"
    shutil.copytree(env.base, base)
    config = json.loads((base / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (base / "config.json").write_text(json.dumps(config))
    argv = args(env, out, "--max-steps", "8", "--resume")
    argv[argv.index("--model") + 1] = str(base)
    refused(invoke(argv), 2, "base model: config.json")

    # max_steps may change (extending a run), and --force continues despite a change.
    r = invoke(args(env, out, "--max-steps", "4", "--resume", "--lr", "1e-3", "--force"))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "peftko.json").read_text())["results"]["steps"] == 4


def test_resume_without_a_checkpoint_is_a_clear_error(env, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    refused(invoke(args(env, out, "--max-steps", "4", "--resume")), 2, "no complete checkpoint", str(out))
    (out / "checkpoint-3").mkdir()  # a half-written one (no checkpoint.json) is never picked up
    refused(invoke(args(env, out, "--max-steps", "4", "--resume")), 2, "checkpoint-3 incomplete")


# --- 2. signals, to a real process
def start(env, output, *extra):
    cmd = [sys.executable, "-m", "peftko", *args(env, output, "--max-steps", "100000", *extra)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PEFTKO_HOME": str(env.root / "home"),
                   "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=environment, cwd=REPO)


def logged_a_step(output: Path) -> bool:
    return (output / "metrics.jsonl").is_file() and '"loss"' in (output / "metrics.jsonl").read_text()


class Run:
    """A real `python -m peftko lora-train` process, its output read as it comes."""

    def __init__(self, env, output: Path, *extra: str):
        self.output, self.lines, self.sent, self.code = output, [], [], None
        self.proc = start(env, output, *extra)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def send(self, signum):
        self.proc.send_signal(signum)
        self.sent.append(time.monotonic())


def run_and_signal(runs: dict[str, Run], plan, timeout=240) -> None:
    """Poll every run; plan(run) sends what is due. Returns once all have exited."""
    deadline = time.monotonic() + timeout
    while any(r.code is None for r in runs.values()):
        for r in runs.values():
            if r.code is None:
                plan(r)
                if r.proc.poll() is not None:
                    r.code, r.exited = r.proc.returncode, time.monotonic()
        if time.monotonic() > deadline:
            for r in runs.values():
                r.proc.kill()
            pytest.fail("timed out:\n" + "\n".join(f"{n}: {r.text[-2000:]}" for n, r in runs.items()))
        time.sleep(0.02)


@pytest.fixture(scope="module")
def signalled(env):
    """Three real runs started together (their imports take the longest): SIGINT and SIGTERM once
    the first step is logged; SIGINT once a checkpoint exists, then SIGINT again as soon as the
    first was acknowledged, while the next (long: 16 micro-batches) step is still running."""
    root = env.root / "signals"
    runs = {
        "SIGINT": Run(env, root / "int"),
        "SIGTERM": Run(env, root / "term"),
        "twice": Run(env, root / "twice", "--grad-accum", "16", "--save-steps", "1", "--save-total-limit", "3"),
    }

    def plan(r: Run):
        if r is runs["twice"]:
            if not r.sent and latest_checkpoint(r.output) is not None:
                r.send(signal.SIGINT)
            elif len(r.sent) == 1 and "SIGINT received" in r.text:
                r.send(signal.SIGINT)
        elif not r.sent and logged_a_step(r.output):
            r.send(getattr(signal, next(n for n, v in runs.items() if v is r)))

    run_and_signal(runs, plan)
    time.sleep(0.2)  # the reader threads drain the pipes
    for name, r in runs.items():
        assert r.sent, f"{name} exited before it was signalled ({r.code}):\n{r.text}"
    return runs


@pytest.mark.slow  # `signalled`: three real processes (test_interrupt_and_resume_... is the fast one)
@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(signalled, name, code):
    r = signalled[name]
    assert r.code == code, r.text
    assert f"stopped by {name}" in r.text and "--resume" in r.text and "Traceback" not in r.text
    ckpt = latest_checkpoint(r.output)
    assert ckpt is not None, r.text
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == int(ckpt.name.split("-")[1]) >= 1
    assert not (r.output / "peftko.json").exists()


@pytest.mark.slow  # `signalled`
def test_second_ctrl_c_exits_at_once_and_keeps_the_last_checkpoint(env, signalled):
    r = signalled["twice"]
    assert r.code == 130, r.text
    assert "SIGINT again: stopping at once" in r.text, r.text
    assert r.exited - r.sent[1] < 5
    kept = complete_checkpoints(r.output)
    assert kept and all(json.loads((p / "trainer_state.json").read_text())["global_step"] ==
                        int(p.name.split("-")[1]) for p in kept)
    # Whatever the killed process left half-written does not stop a resume.
    step = int(kept[-1].name.split("-")[1])
    res = invoke(args(env, r.output, "--grad-accum", "16", "--save-steps", "1", "--save-total-limit", "3",
                      "--max-steps", str(step + 1), "--resume"))
    assert res.exit_code == 0, res.output
    assert not [p for p in r.output.iterdir() if p.name.startswith(".")]


# --- 4. non-finite loss or gradients
class InfFromStep(TrainerCallback):
    """From step `first` on, the final norm returns inf (as a diverged model would), so loss and
    gradients are non-finite; records the trainable parameters and AdamW state after every step."""

    def __init__(self, first: int):
        self.first, self.params, self.moments = first, {}, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs, output):
            if module.training and state.global_step + 1 >= self.first:
                return output * float("inf")
            return output

        model.get_base_model().model.norm.register_forward_hook(hook)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.params[state.global_step] = trainable_state(model)
        self.moments[state.global_step] = [s["exp_avg"].clone() for s in optimizer.state.values()]


def test_non_finite_steps_are_skipped_then_training_stops(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    probe = InfFromStep(first=4)
    add_callback(monkeypatch, probe)
    r = invoke(args(env, out, "--max-steps", "20", "--save-steps", "2", "--max-bad-steps", "3"))
    refused(r, 3, "steps 4-6 (3 in a row)", "non-finite", "learning rate", "fp16")
    # the advice is a fresh run at a lower rate in a new folder: lr is no resumable setting, and --force
    # would switch off the resume's check that config, corpus and base are unchanged
    advice = r.output.split("Start again with a lower rate")[1]
    assert "--force" not in advice and "--resume" not in advice, advice
    assert f"--lr 0.0003 --embedding-lr 0.0003 --output {out}-lr0.0003" in advice, advice
    assert "Traceback" not in r.output
    assert r.output.count("step skipped") == 3
    good = probe.params[3]
    for step in (4, 5, 6):  # a skipped step changes neither parameters nor optimizer moments
        assert all(torch.equal(good[n], probe.params[step][n]) for n in good), step
        assert all(torch.equal(a, b) for a, b in zip(probe.moments[3], probe.moments[step]))
    assert max(probe.params) == 6  # stopped after 3 bad steps in a row
    assert not (out / "peftko.json").exists()
    ckpt = latest_checkpoint(out)  # the checkpoint at step 6 holds step 3's parameters
    saved = load_file(ckpt / "adapter_model.safetensors")
    named = {k.replace(".default", ""): v for k, v in good.items()}
    assert all(torch.equal(saved[k], named[k]) for k in saved)


@pytest.mark.parametrize("argv, expected", [
    (["lora-train", "--config", "c.yaml", "--lr=1e-3", "--force", "--resume", "--output", "runs/a"],
     "peftko lora-train --config c.yaml --lr 1e-05 --output runs/a-lr1e-05"),
    (["lora-train", "--lr", "1e-3", "--embedding-lr", "2e-3", "--output=runs/a", "--max-steps", "9"],
     "peftko lora-train --embedding-lr 2e-3 --max-steps 9 --lr 1e-05 --output runs/a-lr1e-05"),
    (["-m", "pytest"], "peftko lora-train <your config and flags> --lr 1e-05 --output runs/a-lr1e-05"),
])
def test_a_fresh_run_command_drops_resume_force_and_the_changed_flags(monkeypatch, argv, expected):
    from peftko.train.rerun import fresh_run_command
    monkeypatch.setattr(sys, "argv", ["peftko", *argv])
    assert fresh_run_command(Path("runs/a"), Path("runs/a-lr1e-05"), {"--lr": "1e-05"}) == expected


# --- 5. out of memory
def test_cuda_out_of_memory_is_one_message_with_sizes_and_next_steps(env, tmp_path, monkeypatch):
    class OOMOnFirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def hook(module, inputs):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            model.register_forward_pre_hook(hook)

    add_callback(monkeypatch, OOMOnFirstStep())
    r = invoke(args(env, tmp_path / "run", "--max-steps", "4"))
    refused(r, 2, "out of GPU memory while training", "seq_len 64", "batch_size 2", "grad_accum 1",
            "quant none", "--batch-size 1 --grad-accum 2", "--seq-len", "--quant 4bit",
            "--gradient-checkpointing", "--dry-run")


# --- 6. disk space and failed writes
def test_too_little_disk_space_is_refused_before_training(env, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    out = tmp_path / "run"
    r = invoke(args(env, out, "--max-steps", "4", "--save-steps", "2"))
    refused(r, 2, "not enough disk space", str(out), "9.8 KiB is free")
    assert not (out / "metrics.jsonl").exists()  # refused before the first step
    assert not out.exists()  # and the folder it made for the run is gone again


def test_unwritable_output_is_refused(env, tmp_path, monkeypatch):
    import tempfile

    def no_write(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", no_write)
    refused(invoke(args(env, tmp_path / "run", "--max-steps", "2")), 2, "cannot write to --output",
            "Permission denied")


def enospc(*a, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(env, tmp_path, monkeypatch):
    import peft.peft_model

    out = tmp_path / "run"
    real = peft.peft_model.safe_save_file
    calls = []

    def save_then_fill_the_disk(*a, **kw):
        calls.append(1)
        if len(calls) > 1:  # checkpoint-2 is written, then the disk is full
            enospc()
        real(*a, **kw)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_then_fill_the_disk)
    r = invoke(args(env, out, "--max-steps", "4", "--save-steps", "2"))
    refused(r, 2, "could not write checkpoint-4", "No space left on device", "checkpoint-2 is intact")
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.name == "checkpoint-4"]
    monkeypatch.undo()
    assert invoke(args(env, out, "--max-steps", "4", "--save-steps", "2", "--resume")).exit_code == 0


def test_full_disk_while_saving_the_adapter_keeps_the_previous_one(env, tmp_path, monkeypatch):
    import peft.peft_model

    out = tmp_path / "run"
    r = invoke(args(env, out, "--max-steps", "2", "--save-steps", "2"))
    assert r.exit_code == 0, r.output
    logs = ("run.json", "metrics.jsonl")  # what a resumed run appends to, by design
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name not in logs}

    # One more step, no checkpoint: the only write is the final adapter, and the disk is full.
    monkeypatch.setattr(peft.peft_model, "safe_save_file", enospc)
    r = invoke(args(env, out, "--max-steps", "3", "--save-steps", "0", "--resume"))
    refused(r, 2, "could not write the adapter", "No space left on device", "previous adapter there is intact")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name not in logs}
    assert after == before  # peftko.json, adapter and tokenizer untouched: still a complete run
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_full_disk_on_the_final_save_without_a_checkpoint_does_not_advise_resume(env, tmp_path, monkeypatch):
    import peft.peft_model

    monkeypatch.setattr(peft.peft_model, "safe_save_file", enospc)
    r = invoke(args(env, tmp_path / "run", "--max-steps", "2", "--save-steps", "0"))
    refused(r, 2, "could not write the adapter", "nothing to resume", "--force")
    assert "--resume" not in r.output


# --- 7. safe loading
def test_pickle_only_base_is_refused_without_allow_pickle(env, tmp_path):
    base = tmp_path / "pickled"
    base.mkdir()
    for f in env.base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, base / f.name)
    torch.save(load_file(env.base / "model.safetensors"), base / "pytorch_model.bin")
    argv = args(env, tmp_path / "run", "--max-steps", "1")
    argv[argv.index("--model") + 1] = str(base)
    refused(invoke(argv), 2, "pytorch_model.bin", "--allow-pickle", "safetensors")


def test_remote_code_is_not_trusted_unless_asked(env, tmp_path, monkeypatch):
    import transformers

    class Loaded(Exception):
        """Raised once the model's loading arguments are seen: nothing to train for this test."""

    seen = {}
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__

        def spy(klass, *a, _real=real, **kw):
            seen[klass.__name__] = kw.get("trust_remote_code")
            if klass is transformers.AutoModelForCausalLM:
                raise Loaded
            return _real(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    for flags, expected in (((), False), (("--trust-remote-code",), True)):
        seen.clear()
        r = invoke(args(env, tmp_path / str(expected), "--max-steps", "1", *flags))
        assert isinstance(r.exception, Loaded), r.output
        assert seen == {"AutoTokenizer": expected, "AutoModelForCausalLM": expected}


# --- 8. what a failed --resume leaves, full disks as the real writers report them, NaN parameters
def test_a_resume_into_another_adapter_shape_is_refused_even_forced(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = args(env, out, "--max-steps", "4")
    with monkeypatch.context() as mp:
        add_callback(mp, SignalDuringStep(2))
        assert invoke(argv).exit_code == 130
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = invoke([*argv, "--resume", "--force", "--lora-r", "8"])
    refused(r, 2, "cannot continue from", "lora_r 4 -> 8", "new --output")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # run.json, metrics
    assert invoke([*argv, "--resume"]).exit_code == 0  # the original command still works


class FileSizeLimit(TrainerCallback):
    """From step `step` on, no file may grow past `limit` bytes (RLIMIT_FSIZE): the real writers
    (torch.save's C++ writer, safetensors' Rust one) fail as on a full disk, each in its own way."""

    def __init__(self, step: int, limit: int, at_train_end: bool = False):
        import resource

        self.step, self.limit, self.at_train_end = step, limit, at_train_end
        self.original = resource.getrlimit(resource.RLIMIT_FSIZE)

    def _limit(self):
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.original[1]))

    def restore(self):
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, self.original)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.at_train_end and state.global_step == self.step:
            self._limit()

    def on_train_end(self, args, state, control, **kwargs):
        if self.at_train_end:
            self._limit()


def test_full_disk_at_the_first_checkpoint_never_advises_resume(env, tmp_path, monkeypatch):
    import peft.peft_model

    monkeypatch.setattr(peft.peft_model, "safe_save_file", lambda *a, **kw: enospc())
    r = invoke(args(env, tmp_path / "run", "--max-steps", "2", "--save-steps", "2"))
    refused(r, 2, "could not write checkpoint-2", "no earlier checkpoint exists", "nothing to resume", "--force")
    assert "--resume" not in r.output, r.output


def test_a_checkpoint_that_cannot_be_written_by_torch_save_is_a_clear_error(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # 60 kB: the adapter (40 kB) is written, the optimizer state (~100 kB, torch.save) is not.
    limit = FileSizeLimit(step=4, limit=60_000)
    add_callback(monkeypatch, limit)
    try:
        r = invoke(args(env, out, "--max-steps", "4", "--save-steps", "2"))
    finally:
        limit.restore()
    refused(r, 2, "could not write checkpoint-4", "disk full?", "checkpoint-2 is intact")
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not [p for p in out.iterdir() if p.name.startswith(".staging") or p.name == "checkpoint-4"]


def files_except_logs(out: Path) -> dict:
    """What a resumed run leaves alone (it appends to run.json's record and metrics.jsonl by design)."""
    logs = ("run.json", "metrics.jsonl")
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name not in logs}


def test_an_adapter_that_cannot_be_written_by_safetensors_is_a_clear_error(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert invoke(args(env, out, "--max-steps", "2", "--save-steps", "2")).exit_code == 0
    before = files_except_logs(out)
    limit = FileSizeLimit(step=0, limit=20_000, at_train_end=True)  # the adapter is 40 kB
    add_callback(monkeypatch, limit)
    try:
        r = invoke(args(env, out, "--max-steps", "3", "--save-steps", "0", "--resume"))
    finally:
        limit.restore()
    refused(r, 2, "could not write the adapter", "SafetensorError", "previous adapter there is intact")
    assert files_except_logs(out) == before


def test_parameters_that_end_not_finite_never_exit_0_nor_write_an_adapter(env, tmp_path):
    out = tmp_path / "run"
    # a finite rate that overflows: the parameters end finite but ~1e29, and every loss after
    # step 1 is NaN (`--lr inf` and 1e38 are refused before training: test_config_values)
    r = invoke(args(env, out, "--max-steps", "4", "--lr", "1e30"))
    refused(r, 3, "NaN or inf", "no adapter was written", "learning rate")
    assert not (out / "peftko.json").exists() and not (out / "adapter_model.safetensors").exists()


def test_a_config_key_added_after_the_run_started_reads_as_its_default():
    from peftko.run.records import RunIdentity
    from peftko.run.resume import identity_changes
    from peftko.core.config import TrainConfig

    new = {"config": TrainConfig().to_dict(), "corpus": [], "tokenizer": "t", "base": {"weights": {}}}
    old = {**new, "config": {k: v for k, v in new["config"].items() if k != "dtype"}}
    changes = lambda a, b: identity_changes(RunIdentity.from_json(a), RunIdentity.from_json(b))  # noqa: E731
    assert changes(old, new) == []
    assert changes(old, {**new, "config": {**new["config"], "dtype": "bfloat16"}}) != []


def test_out_of_memory_advice_follows_the_checkpointing_in_use():
    from peftko.core.config import load_config
    from peftko.train.oom import oom_message

    def advice(**keys):
        return oom_message(load_config(None, {"seq_len": "512", **{k: str(v).lower() for k, v in keys.items()}}).memory_levers(), "training")

    assert "--gradient-checkpointing (" in advice(gradient_checkpointing=False)
    assert "--offload-checkpoints" in advice(gradient_checkpointing=True)
    assert "--offload-checkpoints" not in advice(gradient_checkpointing=True, offload_checkpoints=True)
    assert "gradient checkpointing on" in advice(gradient_checkpointing=True)

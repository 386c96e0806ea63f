"""Issue 35: every optimiser step moves the model (the warmup starts above 0), and what a stop or a
shortened resume prints says what was done."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.train.logs import format_log
from peftko.train.trainer import lr_factor
from peftko.run.identity import sha256_file
from tests.conftest import train_args


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("warmup,total", [(0, 1), (1, 1), (2, 40), (5, 5), (3, 10)])
def test_no_step_runs_at_learning_rate_zero(kind, warmup, total):
    factors = [lr_factor(i, kind=kind, warmup=warmup, total=total) for i in range(total)]
    assert all(f > 0 for f in factors), factors
    assert max(factors) <= 1.0
    # the warmup rises, and the peak is reached right after it
    assert factors[:warmup] == sorted(factors[:warmup])
    if warmup < total:
        assert factors[warmup] == 1.0


def test_the_first_logged_step_of_a_warmed_up_run_has_a_learning_rate(tiny_bases, small_corpus, tmp_path):
    out = tmp_path / "run"
    argv = train_args(tiny_bases["llama-untied"], small_corpus, out)
    argv = argv[:argv.index("--warmup-ratio")] + ["--warmup-ratio", "0.5", "--scheduler", "cosine"]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 0, r.output
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert lrs and all(lr > 0 for lr in lrs), lrs
    assert "lr 0.00e+00" not in r.output


def _state(step, tokens=1000):
    return SimpleNamespace(global_step=step, num_input_tokens_seen=tokens)


def test_a_stop_says_where_it_stopped_and_a_finished_run_says_done():
    logs = {"train_runtime": 10.0, "train_loss": 1.0}
    assert format_log(_state(18), logs, total=40).startswith("stopped at step 18 of 40 in 10 s")
    assert format_log(_state(40), logs, total=40).startswith("done: 40 steps in 10 s")


def test_resume_advice_never_adds_force(monkeypatch, tmp_path):
    from peftko.train.rerun import resume_command

    monkeypatch.setattr("sys.argv", ["peftko", "lora-train", "--output", "x", "--force", "--max-steps", "4"])
    line = resume_command(tmp_path)
    assert "--force" not in line and line.endswith("--resume"), line


def test_a_shortened_resume_counts_to_its_own_total(tiny_bases, small_corpus, tmp_path):
    out = tmp_path / "run"
    argv = train_args(tiny_bases["llama-untied"], small_corpus, out, "--save-steps", "4")
    at = argv.index("--max-steps") + 1
    argv[at] = "4"
    assert CliRunner().invoke(main, argv).exit_code == 0
    # as if the run had planned 20 steps and stopped after its checkpoint at step 4
    state = out / "checkpoint-4" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "max_steps": 20}))
    sealed = out / "checkpoint-4" / "checkpoint.json"  # re-sealed, as a checkpoint of such a run would be
    done = json.loads(sealed.read_text())
    sealed.write_text(json.dumps({**done, "seal": {**done["seal"], state.name: sha256_file(state)}}))
    r = CliRunner().invoke(main, [*argv, "--resume", "--progress", "json"])
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    started = [e for e in events if e["event"] == "started" and e["phase"] == "train"]
    finished = [e for e in events if e["event"] == "finished" and e["phase"] == "train"]
    assert [e["total"] for e in started + finished] == [4, 4], started + finished
    assert "/20" not in r.output


def test_a_run_that_is_all_warmup_is_told_before_loading(tiny_bases, small_corpus, tmp_path):
    out = tmp_path / "run"
    argv = train_args(tiny_bases["llama-untied"], small_corpus, out)
    argv = argv[:argv.index("--max-steps")] + ["--max-steps", "1"] + argv[argv.index("--max-steps") + 2:]
    argv = argv[:argv.index("--warmup-ratio")] + ["--warmup-ratio", "0.05", "--scheduler", "cosine"]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 0, r.output
    assert "all 1 planned step are warmup steps (warmup_ratio 0.05 of 1 = 1)" in r.output
    assert "rises to 5.00e-03 at most, not lr 0.01" in r.output
    assert r.output.index("planned step") < r.output.index("loading ")


def test_a_run_with_nothing_to_train_is_refused(tiny_bases, small_corpus, tmp_path):
    from peftko.core.config import load_config
    from peftko.core.errors import UserError

    config = tmp_path / "c.yaml"
    config.write_text("target_modules: []\n")
    with pytest.raises(UserError, match="target_modules: an empty list trains no LoRA layer"):
        load_config(config, {"model": str(tiny_bases["llama-untied"]), "data": [str(small_corpus)],
                             "output": str(tmp_path)})

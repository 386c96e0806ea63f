"""Watching a run: report.png with Hangul that renders, TensorBoard inside the run directory,
plain log lines when stdout is a file, and one held-out evaluation per step in metrics.jsonl."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.core.errors import UserError
from peftko.run.plot import BPC_BARS, TRAIN_LOSS, read_history, write_report, write_report_or_warn
from tests.conftest import train_args

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MISSING_GLYPH = r"Glyph .* missing from font"


def fake_run(folder: Path, records: list[dict], results: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    if results is not None:
        (folder / "peftko.json").write_text(json.dumps({"format": 1, "results": results}), encoding="utf-8")
    return folder


def logged_run(steps: int = 20, bad_at: tuple[int, ...] = ()) -> list[dict]:
    """Records shaped like the ones MetricsFile and log_bpc write."""
    records = []
    for s in range(1, steps + 1):
        bad = s in bad_at
        records.append({"step": s, "loss": math.nan if bad else 4.0 / s ** 0.3, "grad_norm": math.inf if bad
                        else 1.0 / s, "lr": 3e-3 * (1 - s / steps), "epoch": s / 10, "tokens_seen": 1016 * s})
        if s % 10 == 0:
            records.append({"step": s, "eval_loss": 3.9 / s ** 0.2, "eval_runtime": 0.5, "tokens_seen": 1016 * s})
    records.append({"step": steps, "train_runtime": 12.0, "train_loss": 3.0, "tokens_seen": 1016 * steps})
    records.append({"step": steps, "bpc_base": 9.1, "bpc_before": 7.5, "bpc_after": 5.2})
    return records


def draw_strictly(run_dir: Path) -> Path:
    """write_report with a missing glyph (a tofu box in the PNG) turned into an error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=MISSING_GLYPH)
        return write_report(run_dir)


# --- the picture
def test_report_draws_every_korean_label_with_a_real_glyph(tmp_path):
    run = fake_run(tmp_path / "run", logged_run(bad_at=(7,)), {"skipped_steps": 1, "steps": 20})
    path = draw_strictly(run)
    assert path == run / "report.png" and path.read_bytes()[:8] == PNG_MAGIC
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left


STRUCTURE = {"samples": 2, "balanced": 1.0, "ends_with_marker": 0.5, "whole_markers_only": 0.5,
             "fragments_per_sample": 1.5, "structure": 0.5}


def test_report_rings_the_kept_step_and_draws_the_structure_of_the_samples(tmp_path):
    from matplotlib.figure import Figure

    from peftko.run.plot import _plot_loss, _plot_structure

    run = fake_run(tmp_path / "run", logged_run(), {"steps": 20, "kept_step": 10, "structure": STRUCTURE})
    assert draw_strictly(run).read_bytes()[:8] == PNG_MAGIC
    history = read_history(run)
    loss_ax, structure_ax, empty_ax = Figure().subplots(1, 3)
    _plot_loss(loss_ax, history)
    assert "남긴 어댑터 (kept adapter): step 10" in [t.get_text() for t in loss_ax.get_legend().get_texts()]
    _plot_structure(structure_ax, history.results["structure"])
    assert [round(b.get_height()) for b in structure_ax.patches] == [100, 50, 50, 50]
    assert "1.5" in structure_ax.get_title()  # marker fragments per sample
    _plot_structure(empty_ax, None)
    assert "not measured" in empty_ax.texts[0].get_text()


def test_the_missing_glyph_check_can_fail():
    """Without the registered font, Hangul does raise the warning the test above turns into an error."""
    from matplotlib.figure import Figure

    fig = Figure()
    fig.text(0.5, 0.5, TRAIN_LOSS, family="DejaVu Sans")
    with pytest.warns(UserWarning, match=MISSING_GLYPH):
        fig.savefig(io.BytesIO(), format="png")  # glyphs are looked up when Agg draws


def test_history_splits_training_eval_and_bpc_records(tmp_path):
    run = fake_run(tmp_path / "run", logged_run(bad_at=(3, 4)), {"skipped_steps": 2, "bpc_after": 5.2})
    (run / "metrics.jsonl").open("a").write('{"step": 21, "loss": 1.')  # cut short by a crash
    history = read_history(run)
    assert len(history.train) == 20 and len(history.evals) == 2
    assert [r["step"] for r in history.non_finite] == [3, 4]
    assert {k for k, _, _ in BPC_BARS} <= set(history.results)


def test_damaged_lines_anywhere_in_the_metrics_are_skipped_not_a_traceback(tmp_path):
    run = fake_run(tmp_path / "run", logged_run())
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    damage = [b'\xff\xfe{"step":3\n', b"[1, 2]\n", b'"text"\n', b'{"step": "x", "loss": 1}\n',
              b'{"step": 4, "loss": 2.0, "tokens_seen": "many"}\n']
    (run / "metrics.jsonl").write_bytes(b"".join(lines[:5] + damage + lines[5:]))
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert len(read_history(run).train) == 21  # the 20 good steps and the one with an odd token count


def test_unfinished_run_without_held_out_documents_still_draws(tmp_path):
    records = [r for r in logged_run(steps=5) if "loss" in r]  # no eval, no bpc, no peftko.json
    assert draw_strictly(fake_run(tmp_path / "run", records)).is_file()


def test_report_command_prints_the_path_and_refuses_a_wrong_dir(tmp_path):
    run = fake_run(tmp_path / "run", logged_run())
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(run / "report.png")
    for wrong in (tmp_path / "nowhere", tmp_path):
        result = CliRunner().invoke(main, ["report", str(wrong)])
        assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


def test_a_failed_plot_only_warns(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path / "run", logged_run())

    def broken(run_dir):
        raise RuntimeError("no space for the picture")

    monkeypatch.setattr("peftko.run.plot.write_report", broken)
    write_report_or_warn(run)  # must not raise: the adapter is already saved
    assert "warning: could not draw" in capsys.readouterr().err


def test_missing_font_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="pip install koreanize-matplotlib"):
        write_report(fake_run(tmp_path / "run", logged_run()))


# --- log lines
def test_progress_is_a_bar_only_when_both_streams_are_terminals(monkeypatch):
    from peftko.commands.render import Renderer
    from peftko.core.progress import Started

    for out_tty, err_tty, bar in ((True, True, True), (False, True, False), (True, False, False), (False, False, False)):
        monkeypatch.setattr(sys.stdout, "isatty", lambda v=out_tty: v)
        monkeypatch.setattr(sys.stderr, "isatty", lambda v=err_tty: v)
        renderer = Renderer()
        renderer(Started("train", 10, "steps"))
        assert bool(renderer.bars) is bar
        for b in renderer.bars.values():
            b.close()


# --- one real run: tensorboard, log lines, metrics.jsonl and report.png together
@pytest.fixture(scope="module")
def watched_run(tiny_bases, small_corpus, tmp_path_factory):
    """`peftko lora-train ... > train.log 2>&1` in a real process, so the libraries load as they do for users."""
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("watched") / "run"
    args = train_args(tiny_bases["llama-untied"], small_corpus, out, "--report-to", "tensorboard",
                      "--eval-steps", "3", "--logging-steps", "2", "--samples", "1", "--sample-tokens", "8")
    log = out.parent / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "peftko", *args], stdout=f, stderr=subprocess.STDOUT,
                              cwd=Path(__file__).resolve().parents[1])
    output = log.read_text(encoding="utf-8")
    assert proc.returncode == 0, output
    return out, output


@pytest.mark.slow  # `watched_run`: a real lora-train process, some 10 s on 2 cores
def test_tensorboard_events_are_written_inside_the_run_dir(watched_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = watched_run
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and not (out / "runs").exists()
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 4, 6]
    assert [e.step for e in acc.Scalars("eval/loss")] == [3, 6]


@pytest.mark.slow  # `watched_run`
def test_output_to_a_file_has_plain_lines_and_no_carriage_returns(watched_run):
    _, output = watched_run
    assert "\r" not in output
    assert "step     6/6" in output and "eval_loss" in output
    assert "report: " in output and "structure of 1 sampled continuation:" in output


@pytest.mark.slow  # `watched_run`
def test_metrics_hold_one_eval_per_step(watched_run):
    out, _ = watched_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    manifest = json.loads((out / "peftko.json").read_text())
    last_eval = [r for r in records if "eval_loss" in r][-1]["eval_loss"]
    assert manifest["results"]["eval_loss"] == last_eval


@pytest.mark.slow  # `watched_run`
def test_lora_train_writes_the_report(watched_run):
    out, _ = watched_run
    assert (out / "report.png").read_bytes()[:8] == PNG_MAGIC
    history = read_history(out)
    assert history.results["bpc_after"] is not None and len(history.evals) == 2
    structure = history.results["structure"]  # --samples 1: one continuation of the held-out document
    assert structure["samples"] == 1 and 0 <= structure["structure"] <= 1
    assert draw_strictly(out) == out / "report.png"  # the real run's records draw with every glyph


# --- W&B: never a prompt, never a wait
class _Closed:
    def close(self):
        pass


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE",
                "WANDB_BASE_URL", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: _Closed())
    return monkeypatch


def test_wandb_without_a_key_logs_offline_into_the_run_dir(wandb_env, tmp_path, capsys):
    import os

    from peftko.train.logs import prepare_wandb

    prepare_wandb(tmp_path / "run")
    assert os.environ["WANDB_MODE"] == "offline"
    assert os.environ["WANDB_DIR"] == str((tmp_path / "run").resolve())
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no API key" in out and "wandb sync" in out


def test_wandb_with_a_key_but_no_network_logs_offline(wandb_env, tmp_path, capsys):
    import os

    from peftko.train.logs import prepare_wandb

    def unreachable(*a, **k):
        raise OSError("network is unreachable")

    wandb_env.setenv("WANDB_API_KEY", "x" * 40)
    wandb_env.setattr("socket.create_connection", unreachable)
    prepare_wandb(tmp_path / "run")
    assert os.environ["WANDB_MODE"] == "offline" and "not reachable" in capsys.readouterr().out


def test_wandb_online_when_a_key_and_the_server_are_there_or_the_user_chose(wandb_env, tmp_path, capsys):
    import os

    from peftko.train.logs import prepare_wandb

    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    wandb_env.setenv("NETRC", str(tmp_path / "netrc"))
    prepare_wandb(tmp_path / "run")
    assert "WANDB_MODE" not in os.environ and capsys.readouterr().out == ""
    wandb_env.delenv("NETRC")
    wandb_env.setenv("WANDB_MODE", "disabled")  # the user's own choice wins
    prepare_wandb(tmp_path / "run")
    assert os.environ["WANDB_MODE"] == "disabled"


def test_eval_steps_zero_still_evaluates_once_at_the_end_inside_the_trainer(tmp_path):
    """So the last held-out loss reaches metrics.jsonl, TensorBoard and W&B like every other one."""
    from peftko.model.base import pick_precision
    from peftko.core.config import load_config
    from peftko.train.trainer import training_arguments

    cfg = load_config(None, {"eval_steps": "0", "max_steps": "7", "device": "cpu"})
    args = training_arguments(cfg, pick_precision("cpu"), tmp_path, n_blocks=10, has_eval=True)
    assert args.eval_strategy == "steps" and args.eval_steps == 7
    assert training_arguments(cfg, pick_precision("cpu"), tmp_path, 10, has_eval=False).eval_strategy == "no"

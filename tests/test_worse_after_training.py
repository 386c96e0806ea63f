"""Issue 35: a run whose adapter predicts the held-out text worse than the markers as registered
is not reported as a success: lora-train says so, report.png draws it red, the model card says it,
and keep_best keeps the registered-only state (or says why it cannot)."""

from __future__ import annotations

import json

import matplotlib
import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.run.plot import WORSE_LABEL, _plot_bpc
from peftko.run.records import Results, worse_after_training
from tests.conftest import train_args

matplotlib.use("Agg")


def test_worse_is_judged_as_printed():
    assert worse_after_training(2.595, 3.352)
    assert not worse_after_training(2.595, 2.5951)  # the same when printed: no verdict
    assert not worse_after_training(2.595, 2.0) and not worse_after_training(None, 3.0)
    assert Results(bpc_before=2.595, bpc_after=3.352).worse_after_training


def _bars(results):
    from matplotlib.colors import to_hex
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    _plot_bpc(ax, results)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    colours = [to_hex(p.get_facecolor()) for p in ax.patches]
    plt.close(fig)
    return dict(zip(labels, colours))


def test_report_draws_a_worse_trained_bar_red_and_says_worse():
    from matplotlib.colors import to_hex

    worse = _bars({"bpc_base": 3.0, "bpc_before": 2.595, "bpc_after": 3.352})
    assert worse[WORSE_LABEL] == to_hex("tab:red") and to_hex("tab:green") not in worse.values()
    better = _bars({"bpc_base": 3.0, "bpc_before": 2.595, "bpc_after": 2.1})
    assert WORSE_LABEL not in better and to_hex("tab:green") in better.values()


def _run(tiny_bases, small_corpus, out, *extra):
    argv = train_args(tiny_bases["llama-untied"], small_corpus, out, *extra)
    for flag in ("--lr", "--embedding-lr"):  # a rate that makes this tiny base worse in 6 steps
        argv[argv.index(flag) + 1] = "0.3"
    return CliRunner().invoke(main, argv)


@pytest.mark.slow
def test_keep_best_keeps_the_markers_as_registered_when_training_made_it_worse(tiny_bases, small_corpus, tmp_path):
    out = tmp_path / "run"
    r = _run(tiny_bases, small_corpus, out)
    assert r.exit_code == 0, r.output
    assert "kept the adapter as registered, before any step: training made the held-out documents harder" in r.output
    results = json.loads((out / "peftko.json").read_text())["results"]
    assert results["kept_step"] == 0 and results["bpc_after"] == pytest.approx(results["bpc_before"], abs=1e-6)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "Adapter kept: the markers as registered, before any step" in card


@pytest.mark.slow
def test_a_worse_adapter_is_said_to_be_worse_in_the_summary_and_the_card(tiny_bases, small_corpus, tmp_path):
    out = tmp_path / "run"
    r = _run(tiny_bases, small_corpus, out, "--no-keep-best")
    assert r.exit_code == 0, r.output
    results = json.loads((out / "peftko.json").read_text())["results"]
    assert results["bpc_after"] > results["bpc_before"]
    assert "keep_best: the trained adapter is kept although the markers as registered did better" in r.output
    assert "keep_best is off (--no-keep-best)" in r.output
    summary = r.output[r.output.index("held-out bits per character"):]
    assert (f"warning: the adapter is worse than no training: held-out bits per character rose from "
            f"{results['bpc_before']:.3f} (with the markers registered) to {results['bpc_after']:.3f}") in summary
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "**Warning: held-out bits per character after training" in card and "**주의: 학습 후" in card


def test_report_on_a_run_in_progress_says_not_yet_rather_than_no_held_out_documents():
    from matplotlib.figure import Figure

    from peftko.run.plot import NOT_MEASURED, NOT_YET

    in_progress, finished = Figure().subplots(1, 2)
    _plot_bpc(in_progress, {})  # metrics.jsonl only: no peftko.json yet
    _plot_bpc(finished, {"steps": 20, "bpc_before": None})
    assert in_progress.texts[0].get_text() == NOT_YET and finished.texts[0].get_text() == NOT_MEASURED

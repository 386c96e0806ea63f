"""Progress events (peftko.core.progress) and `--progress json`: every long phase of every command
reports started / advanced / finished, stdout holds nothing but JSON lines, and the terminal output
is made of the same events (docs/en/progress.md)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.core import progress
from tests.conftest import train_args

SCHEMA = {"message": {"text", "level", "err", "end"}, "started": {"phase", "total", "unit"},
          "advanced": {"phase", "done", "total", "unit", "text", "values"},
          "finished": {"phase", "done", "total", "unit", "seconds", "ok"}, "result": {"name", "value"}}


def events_of(result) -> list[dict]:
    """Every stdout line of a --progress json run, parsed; each must be one event of the schema."""
    events = [json.loads(line) for line in result.stdout.splitlines()]
    for e in events:
        assert e["v"] == progress.SCHEMA_VERSION and isinstance(e["time"], float)
        assert set(e) - {"v", "event", "time"} == SCHEMA[e["event"]], e
    return events


def phases(events: list[dict]) -> dict[str, list[list[dict]]]:
    """phase -> each time it ran, as its events: it opens, advances within its total, and closes."""
    by_phase: dict[str, list[list[dict]]] = {}
    for e in events:
        if e["event"] == "started":
            assert not by_phase.get(e["phase"]) or by_phase[e["phase"]][-1][-1]["event"] == "finished", e
            by_phase.setdefault(e["phase"], []).append([e])
        elif e["event"] in ("advanced", "finished"):
            runs = by_phase[e["phase"]]
            assert runs[-1][-1]["event"] != "finished", e  # nothing after its end
            assert e["total"] is None or 0 <= e["done"] <= e["total"], e
            runs[-1].append(e)
    for name, runs in by_phase.items():
        assert all(r[-1]["event"] == "finished" for r in runs), name
    return by_phase


# --- the module itself
def test_a_phase_reports_its_end_also_when_it_fails():
    seen = []
    with progress.reporting(seen.append), pytest.raises(ValueError):
        with progress.phase("work", 3, "items") as p:
            p.advance()
            raise ValueError("disk full")
    assert [type(e).__name__ for e in seen] == ["Started", "Advanced", "Finished"]
    assert seen[-1].ok is False and seen[-1].done == 1


def test_advances_are_throttled_but_lines_and_the_end_always_come(monkeypatch):
    seen = []
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    with progress.reporting(seen.append), progress.phase("tokenise", 1000, "documents") as p:
        for _ in range(999):
            p.advance()  # all within one instant: only the first is reported
        p.advance(text=None)  # the last one ends the phase: reported
        now[0] += 1
        p.set(1000, text="a log line")
    advanced = [e for e in seen if isinstance(e, progress.Advanced)]
    assert [e.done for e in advanced] == [1, 1000, 1000] and advanced[-1].text == "a log line"


def test_without_a_sink_the_engine_is_silent(capsys):
    token = progress._sink.set(progress._ignore)  # as a library caller that installed none
    try:
        progress.say("hello")
        progress.warn("careful")
    finally:
        progress._sink.reset(token)
    assert capsys.readouterr() == ("", "")


# --- every long phase of the commands, as JSON lines
@pytest.fixture(scope="module")
def trained(tiny_bases, small_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("progress")
    # A corpus no other test trains on: the token cache is built here, so its phase is seen.
    corpus = folder / "corpus"
    shutil.copytree(small_corpus, corpus)
    (corpus / "progress.txt").write_text("|START_OF_BOOK|>진행 이벤트를 보는 책.|END_OF_BOOK|>\n", encoding="utf-8")
    out = folder / "run"
    r = CliRunner().invoke(main, train_args(tiny_bases["llama-untied"], corpus, out, "--eval-steps", "3",
                                            "--samples", "1", "--sample-tokens", "4", "--progress", "json"))
    assert r.exit_code == 0, r.output
    return out, events_of(r)


def test_lora_train_reports_reading_tokenising_training_evaluating_and_sampling(trained):
    _, events = trained
    by_phase = phases(events)
    assert {"read corpus", "tokenise", "train", "evaluate", "sample"} <= set(by_phase)
    (train,) = by_phase["train"]
    assert len(by_phase["evaluate"]) >= 3  # before training, at steps 3 and 6, and the final one
    assert train[0]["total"] == 6 and train[-1]["done"] == 6 and train[-1]["ok"]
    logged = [e for e in train if e["event"] == "advanced" and e["text"]]
    # each log line is also data: the step's loss and learning rate, as metrics.jsonl has them
    assert logged and all("loss" in e["values"] or "train_runtime" in e["values"] or "eval_loss" in e["values"]
                          for e in logged)
    assert logged[0]["text"].startswith("step     1/6  loss")
    texts = [e["text"] for e in events if e["event"] == "message"]
    assert any(t.startswith("adapter written to") for t in texts)


def test_json_progress_carries_the_same_lines_as_the_terminal(trained, tiny_bases, small_corpus, tmp_path):
    """The terminal's stdout is exactly the JSON run's stdout messages and log lines, in order."""
    run, events = trained
    carried = "".join(e["text"] + e["end"] if e["event"] == "message" else e["text"] + "\n" for e in events
                      if (e["event"] == "message" and not e["err"]) or (e["event"] == "advanced" and e["text"]))
    r = CliRunner().invoke(main, train_args(tiny_bases["llama-untied"], run.parent / "corpus", tmp_path / "run",
                                            "--eval-steps", "3", "--samples", "1", "--sample-tokens", "4"))
    assert r.exit_code == 0, r.output

    def same(text: str, folder) -> list[str]:  # what differs between two runs: the folder, the speed, the cache
        text = text.replace(str(folder), "RUN").replace(" (from cache)", "")
        return [re.sub(r"done: .*", "done", line) for line in text.splitlines()]

    assert same(r.stdout, tmp_path / "run") == same(carried, run)


def test_merge_eval_and_generate_report_their_phases(trained, small_corpus, tmp_path):
    run, _ = trained
    merged = tmp_path / "merged"
    r = CliRunner().invoke(main, ["merge", str(run), "--output", str(merged), "--progress", "json"])
    assert r.exit_code == 0, r.output
    assert {"merge", "self-check"} <= set(phases(events_of(r)))

    r = CliRunner().invoke(main, ["eval", str(run), "--data", str(small_corpus), "--seq-len", "64",
                                  "--samples", "1", "--sample-tokens", "4", "--progress", "json"])
    assert r.exit_code == 0, r.output
    events = events_of(r)
    assert {"read corpus", "evaluate", "sample"} <= set(phases(events))
    assert [e["name"] for e in events if e["event"] == "result"] == ["eval"]

    r = CliRunner().invoke(main, ["generate", str(merged), "--prompt", "|SOUND|>", "--max-new-tokens", "5",
                                  "--num-samples", "2", "--json", "--progress", "json"])
    assert r.exit_code == 0, r.output
    events = events_of(r)
    assert set(phases(events)) == {"sample 1/2", "sample 2/2"}
    samples = [e["value"] for e in events if e["event"] == "result"]
    assert len(samples) == 2 and all(s["new_tokens"] <= 5 for s in samples)


def test_an_error_is_an_event_too(tmp_path):
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "nowhere"), "--output", str(tmp_path / "m"),
                                  "--progress", "json"])
    assert r.exit_code == 2
    (error,) = events_of(r)
    assert error["level"] == "error" and error["text"].startswith("peftko: error: adapter directory not found")


def test_streamed_text_is_one_message_per_piece(trained, capsys):
    """generate's streamed text arrives as messages that end no line until the sample does."""
    run, _ = trained
    r = CliRunner().invoke(main, ["generate", str(run), "--prompt", "|SOUND|>", "--max-new-tokens", "4",
                                  "--temperature", "0", "--progress", "json"])
    assert r.exit_code == 0, r.output
    messages = [e for e in events_of(r) if e["event"] == "message" and not e["err"]]
    assert messages[0]["text"] == "|SOUND|>" and messages[0]["end"] == ""
    assert messages[-1]["end"] == "\n"


@pytest.mark.slow
def test_building_the_builtin_base_is_a_phase(tmp_path, monkeypatch):
    """The built-in tiny base, built from nothing in an empty home, reports its build."""
    from peftko.model.tiny_base import builtin_base

    monkeypatch.setenv("PEFTKO_HOME", str(tmp_path))
    seen = []
    with progress.reporting(seen.append):
        builtin_base()
    names = [(type(e).__name__, getattr(e, "phase", None)) for e in seen]
    assert ("Started", "build base") in names and ("Finished", "build base") in names
    assert seen[0].text.startswith("building the built-in tiny base")

"""`peftko bench` (lm-evaluation-harness) on a tiny base and a tiny trained run, offline.

The tasks are in tests/fixtures/bench, each over a local JSONL read by datasets' json builder
(nothing on the Hub): ko_copa_mini, 8 Korean COPA-style items (accuracy), and ko_text_mini, 4
passages scored whole (bits per byte, which always tells a base from a run). Both are checked
against an independent computation with plain transformers and peft that shares no code with
lm-eval or peftko.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftko.cli import main
from tests.conftest import train_args

pytest.importorskip("lm_eval")  # the [bench] extra; [test] installs it
pytestmark = pytest.mark.slow  # lm-eval: its imports and task index take seconds a test

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bench"
REPO = FIXTURES.parents[2]
TASK, TEXT = "ko_copa_mini", "ko_text_mini"


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    """An empty datasets and Hub cache per test: nothing read from, or left in, the user's."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(REPO)  # the task YAML names its JSONL relative to the repository root


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to look up a host or open a connection, recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture
def hub_online(monkeypatch):
    """The environment as a user with network has it: no offline switch set anywhere."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def bench(*args: str):
    return CliRunner().invoke(main, ["bench", *args], terminal_width=200)


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def refused(result, *words: str):
    assert result.exit_code == 2, result.output + repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- the independent reference


def items(task: str = TASK) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]


@torch.no_grad()
def reference_accuracy(model, tok) -> float:
    """Premise (its full stop dropped) + 왜냐하면/그래서, then " " + each ending; the ending's tokens
    scored given everything before them, the tokenizer's own special tokens included."""
    right = 0
    for item in items():
        context = item["premise"][:-1] + " " + ("왜냐하면" if item["question"] == "원인" else "그래서")
        context_ids = tok(context)["input_ids"]
        scores = []
        for ending in (item["alternative_1"], item["alternative_2"]):
            ids = tok(context + " " + ending)["input_ids"]
            assert ids[: len(context_ids)] == context_ids  # the ending starts at a token boundary
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            scores.append(sum(float(logp[p - 1, ids[p]]) for p in range(len(context_ids), len(ids))))
        right += int(max(range(2), key=lambda i: scores[i]) == item["label"])
    return right / len(items())


@torch.no_grad()
def reference_bits_per_byte(model, tok) -> float:
    """Each passage's tokens, all predicted after the tokenizer's BOS (lm-eval's prefix token):
    minus their summed log-probability, in bits, over the passages' UTF-8 bytes."""
    nats = size = 0
    for item in items(TEXT):
        ids = tok(item["text"])["input_ids"]
        assert tok.bos_token_id is not None and ids[0] != tok.bos_token_id  # one BOS: lm-eval's prefix
        x = torch.tensor([[tok.bos_token_id, *ids]])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        nats -= float(logp.gather(-1, x[0, 1:, None]).sum())
        size += len(item["text"].encode("utf-8"))
    return nats / math.log(2) / size


def load_plain(path: Path, run: Path | None = None):
    """The base with plain transformers, the run's adapter applied with plain peft."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if run is None:
        return model.eval(), AutoTokenizer.from_pretrained(path)
    manifest = json.loads((run / "peftko.json").read_text())
    model.resize_token_embeddings(manifest["vocab"]["rows_after"], mean_resizing=False)
    return PeftModel.from_pretrained(model, run).eval(), AutoTokenizer.from_pretrained(run)


# --- the tests


def test_a_run_is_scored_beside_its_base_as_plain_transformers_and_peft_score_them(tiny_run, tmp_path, no_network):
    out = tmp_path / "bench.json"
    result = ok(bench(str(tiny_run), "--tasks", f"{TASK},{TEXT}", "--include-path", str(FIXTURES), "--device", "cpu",
                      "--dtype", "float32", "--json", str(out)))
    manifest = json.loads((tiny_run / "peftko.json").read_text())
    record = json.loads(out.read_text(encoding="utf-8"))
    base, run = record["models"]
    assert (base["kind"], base["model"], base["label"]) == ("model", manifest["base_model"], "base (llama-untied)")
    assert (run["kind"], run["model"], run["base"]) == ("adapter", str(tiny_run), manifest["base_model"])
    assert run["adapter_sha256"] == manifest["adapter_sha256"] and base["adapter_sha256"] is None
    for column in (base, run):
        copa, text = column["results"][TASK], column["results"][TEXT]
        assert (copa["samples"], copa["n_shot"], text["samples"], column["dtype"]) == (8, 0, 4, "float32")
        acc = copa["metrics"]["acc"]
        assert math.isfinite(acc) and 0 <= acc <= 1 and math.isfinite(copa["metrics"]["acc_stderr"])
        assert math.isfinite(text["metrics"]["bits_per_byte"]) and text["metrics"]["bits_per_byte"] > 0
    for column, plain in ((base, load_plain(Path(manifest["base_model"]))),
                          (run, load_plain(Path(manifest["base_model"]), tiny_run))):
        assert column["results"][TASK]["metrics"]["acc"] == pytest.approx(reference_accuracy(*plain))
        assert column["results"][TEXT]["metrics"]["bits_per_byte"] == pytest.approx(
            reference_bits_per_byte(*plain), rel=1e-4)
    bpb = [c["results"][TEXT]["metrics"]["bits_per_byte"] for c in (base, run)]
    # Ten times the tolerance above apart (6 training steps move them ~0.3 %): a run column that
    # scored the base again, or swapped columns, fails the reference checks.
    assert bpb[1] != pytest.approx(bpb[0], rel=1e-3)
    # The table: a row per metric, both columns and the change from the base to the run.
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("task "))
    assert header.split()[:4] == ["task", "shots", "items", "metric"]
    assert "base (llama-untied)" in header and str(tiny_run) in header and header.endswith("change")
    for task, metric, n in ((TASK, "acc", "8"), (TEXT, "bits_per_byte", "4")):
        row = next(line for line in lines if line.split()[:4] == [task, "0", n, metric])
        a, b = (c["results"][task]["metrics"][metric] for c in (base, run))
        assert f"{a:.3f}" in row and f"{b:.3f}" in row and row.split()[-1] == f"{b - a:+.3f}"
    assert no_network == []


def test_without_json_the_scores_go_into_the_run_which_force_may_replace(tiny_run, tmp_path):
    from peftko.run.run_folder import RUN_KIND
    from peftko.run.ownership import entries_to_replace

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ok(bench(str(run), "--tasks", TASK, "--include-path", str(FIXTURES), "--device", "cpu", "--no-base"))
    record = json.loads((run / "bench.json").read_text(encoding="utf-8"))
    assert [(c["kind"], c["model"]) for c in record["models"]] == [("adapter", str(run))]
    assert record["tasks"] == [TASK] and record["include_path"] == str(FIXTURES)
    assert run / "bench.json" in entries_to_replace(run, RUN_KIND, True, "")  # a later lora-train --force


def test_a_4bit_run_over_a_tied_base_is_scored_as_the_demo_trains_it(tiny_bases, small_corpus, tmp_path):
    """The demo's kind of run: its input embedding is peft's wrapper (the marker rows) over a base
    whose output embedding is tied to it, in 4-bit NF4."""
    run = tmp_path / "run"
    ok(CliRunner().invoke(main, train_args(tiny_bases["llama-tied"], small_corpus, run, "--quant", "4bit",
                                           "--max-steps", "2", "--val-fraction", "0")))
    result = ok(bench(str(run), "--tasks", TEXT, "--include-path", str(FIXTURES), "--device", "cpu"))
    record = json.loads((run / "bench.json").read_text(encoding="utf-8"))
    assert [(c["kind"], c["quant"]) for c in record["models"]] == [("model", "4bit"), ("adapter", "4bit")]
    bpb = [c["results"][TEXT]["metrics"]["bits_per_byte"] for c in record["models"]]
    assert all(math.isfinite(b) and b > 0 for b in bpb) and bpb[0] != bpb[1]
    assert "base (llama-tied)" in result.stdout


def test_a_base_folder_alone_writes_nothing_unless_asked(tiny_bases, tmp_path):
    base = tiny_bases["llama-tied"]
    before = sorted(p.name for p in base.iterdir())
    result = ok(bench(str(base), "--tasks", TASK, "--include-path", str(FIXTURES), "--device", "cpu",
                      "--limit", "3"))
    assert "--json FILE" in result.stderr and "--limit 3" in result.stdout
    assert sorted(p.name for p in base.iterdir()) == before
    assert f"{TASK}      0      3  acc" in result.stdout


def test_bench_never_goes_online_by_itself_and_says_how_to_fetch_hub_data_once(tiny_bases, hub_online, no_network,
                                                                                caplog):
    import datasets.config

    caplog.set_level(logging.DEBUG)
    line = refused(bench(str(tiny_bases["llama-untied"]), "--tasks", "kobest_copa"),
                   "--tasks kobest_copa", "skt/kobest_v1", "--download")
    assert "not in the local cache" in line
    assert no_network == []
    assert not datasets.config.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ  # put back as they were
    # Nothing else on the console: lm-eval's "f1 not found in the evaluate library!" (KoBEST) is noise.
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval") and r.levelno >= logging.ERROR] == []


def test_unknown_task_names_are_one_line_with_close_matches(tiny_bases):
    line = refused(bench(str(tiny_bases["llama-untied"]), "--tasks", "kobest_cop,ko_copa_mni",
                         "--include-path", str(FIXTURES)), "'kobest_cop'", "'ko_copa_mni'")
    assert "kobest_copa" in line and TASK in line and "lm-eval ls tasks" in line


def test_a_relative_data_path_from_another_folder_is_one_line(tiny_bases, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(bench(str(tiny_bases["llama-untied"]), "--tasks", TASK, "--include-path", str(FIXTURES)),
            "--tasks ko_copa_mini", "ko_copa_mini.jsonl", "write them absolute")


def test_other_refusals_are_one_line(tiny_bases, tmp_path, monkeypatch):
    base = str(tiny_bases["llama-untied"])
    refused(bench(base, "--tasks", TASK, "--include-path", str(tmp_path / "nope")), "--include-path", "no such folder")
    refused(bench(base, "--tasks", TASK, "--json", str(tmp_path / "no" / "b.json")), "--json", "does not exist")
    refused(bench(base, "--tasks", " , "), "--tasks", "names no task")
    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    refused(bench(base), "pip install 'peftko[bench]'")


def test_hub_access_switches_every_library_and_puts_them_back():
    import datasets.config
    import evaluate.config
    import huggingface_hub.constants

    from peftko.evaluate.bench import hub_access

    def switches():
        return (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE,
                evaluate.config.HF_EVALUATE_OFFLINE, os.environ.get("HF_DATASETS_OFFLINE"))

    before = switches()
    with hub_access(True):  # --download: task data, never a metric script (code)
        assert switches() == (False, False, True, "0")
    with hub_access(False):
        assert switches() == (True, True, True, "1")
    assert switches() == before

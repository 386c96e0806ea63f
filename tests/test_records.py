"""peftko.run.records: the three JSON files a run or a merge writes, read back as typed records.

tests/fixtures/records/ holds the files a tiny run and its merge wrote before these records existed
(commit ec82944; only the temporary folder in their paths was renamed): they must load, and write
back unchanged. Every refusal names the file and says what to do, on one line.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from peftko.core.errors import UserError
from peftko.run.records import (BaseFingerprint, CorpusPart, CorpusRecord, MarkerEntry, MergeRecord, Results,
                                RunIdentity, RunIdentityRecord, RunRecord, Vocab)

TODAY = Path(__file__).parent / "fixtures" / "records"


def today(name: str):
    return json.loads((TODAY / name).read_text(encoding="utf-8"))


def written(folder: Path, name: str, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return folder


def refusal(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message  # one line
    return message


# --- peftko.json
def a_run_record() -> RunRecord:
    return RunRecord(
        base_model="/models/base", base_fingerprint=BaseFingerprint("c" * 64, {"model.safetensors": "w" * 64}),
        markers=[MarkerEntry("|SOUND|>", 260, 4, [1, 2, 3, 4], [2]), MarkerEntry("|END_OF_BOOK|>", 261, 5)],
        vocab=Vocab(tokenizer_before=260, tokenizer_after=262, rows_before=260, rows_after=262),
        config={"doc_end_marker": "|END_OF_BOOK|>", "trust_remote_code": False, "lora_r": 4},
        peftko_version="0.1.0", base_terms=["LICENSE"], marker_piece_rows=[1, 3], tied_embeddings=False,
        quantization="none", compute_dtype="float32",
        corpus=CorpusRecord(10, 5000, CorpusPart(8, 4000, 1200), CorpusPart(2, 1000, 300, ["a.txt", "b.txt"])),
        results=Results(bpc_base=4.1, kernels=None, bpc_before=4.5, train_loss=3.2, steps=6, tokens_seen=768,
                        skipped_steps=0, kept_step=4, bpc_after=3.9, structure={"samples": 1, "structure": 1.0}),
        files=["README.md", "adapter_config.json"], adapter_sha256="a" * 64,
    )


def test_a_run_record_round_trips():
    record = a_run_record()
    assert RunRecord.from_json(json.loads(json.dumps(record.to_json())), Path("peftko.json")) == record


def test_a_peftko_json_written_before_the_records_loads_and_writes_back_unchanged():
    data = today("peftko.json")
    record = RunRecord.from_json(data, TODAY / "peftko.json")
    assert record.to_json() == data
    assert list(record.to_json()) == list(data)  # the keys in the order they were written
    assert record.version == 1 and record.vocab.rows_after == data["vocab"]["rows_after"]
    assert record.marker_names == [m["marker"] for m in data["markers"]]
    assert record.book_end().marker == data["config"]["doc_end_marker"] == record.doc_end_marker
    assert record.results.bpc_after == data["results"]["bpc_after"] and record.results.steps == 3
    assert record.corpus.held_out.names == data["corpus"]["held_out"]["names"]
    assert record.base_fingerprint.to_json() == data["base_fingerprint"]


def test_a_run_saved_before_the_hash_and_the_file_list_were_kept_loads():
    data = today("peftko.json")
    for key in ("format", "files", "adapter_sha256", "corpus", "marker_piece_rows", "base_terms"):
        del data[key]
    for m in data["markers"]:
        del m["piece_ids"], m["init_ids"]
    record = RunRecord.from_json(data, Path("peftko.json"))
    assert (record.version, record.files, record.adapter_sha256, record.corpus) == (None, None, None, None)
    assert record.to_json() == data


def test_book_end_is_a_registered_marker_or_none():
    record = a_run_record()
    assert record.book_end().id == 261
    assert replace(record, config={"doc_end_marker": "|NOT_REGISTERED|>"}).book_end() is None
    assert replace(record, config={"doc_end_marker": None}).book_end() is None


@pytest.mark.parametrize("edit, words", [
    (lambda d: [], "it holds a JSON list, not an object"),
    (lambda d: {k: v for k, v in d.items() if k != "base_model"}, "'base_model' is missing"),
    (lambda d: {**d, "markers": "|SOUND|>"}, "'markers' must be a list"),
    (lambda d: {**d, "vocab": {"rows_after": "300"}}, "'vocab.rows_after' must be an integer"),
    (lambda d: {**d, "markers": [{"marker": "|SOUND|>"}]},
     "each entry of 'markers' needs a text 'marker' and an integer 'id'"),
    (lambda d: {**d, "adapter_sha256": None}, "'adapter_sha256' must be a string"),
    # beyond what the readers always checked: each part has its type
    (lambda d: {**d, "results": []}, "'results' must be a dict"),
    (lambda d: {**d, "results": {**d["results"], "steps": "3"}}, "'results.steps' must be an integer"),
    (lambda d: {**d, "results": {**d["results"], "bpc_after": True}}, "'results.bpc_after' must be a number"),
    (lambda d: {**d, "corpus": {"held_out": {"names": "a.txt"}}}, "'corpus.held_out.names' must be a list of names"),
    (lambda d: {**d, "files": "README.md"}, "'files' must be a list of names"),
    (lambda d: {**d, "marker_piece_rows": ["1"]}, "'marker_piece_rows' must be a list of integers"),
    (lambda d: {**d, "tied_embeddings": "no"}, "'tied_embeddings' must be true or false"),
    (lambda d: {**d, "format": "1"}, "'format' must be an integer"),
    (lambda d: {**d, "base_fingerprint": {"weights": []}}, "'base_fingerprint.weights' must be a dict"),
    (lambda d: {**d, "markers": [{**d["markers"][0], "piece_ids": 5}]},
     "'markers[0].piece_ids' must be a list of integers"),
])
def test_a_malformed_peftko_json_is_refused_by_name(tmp_path, edit, words):
    run = written(tmp_path / "run", "peftko.json", edit(today("peftko.json")))
    with pytest.raises(UserError) as e:
        RunRecord.read(run)
    message = refusal(e)
    assert message.startswith(f"{run / 'peftko.json'} is not a peftko manifest: ") and words in message
    assert message.endswith("Restore the file from the training run, or train again.")
    assert RunRecord.peek(run) is None  # what the ownership rules see: not peftko's


@pytest.mark.parametrize("text", ["{", "\xff"])
def test_an_unreadable_peftko_json_is_refused_by_name(tmp_path, text):
    run = written(tmp_path / "run", "peftko.json", text)
    with pytest.raises(UserError, match="^cannot read .*peftko.json: "):
        RunRecord.read(run)
    assert RunRecord.peek(run) is None and RunRecord.results_of(run) is None


def test_the_report_reads_the_results_of_an_incomplete_peftko_json(tmp_path):
    run = written(tmp_path / "run", "peftko.json", {"format": 1, "results": {"steps": 20, "kept_step": 10}})
    assert RunRecord.results_of(run) == Results(steps=20, kept_step=10)
    assert RunRecord.results_of(tmp_path / "unfinished") is None


def test_results_leave_out_the_optional_values_not_measured():
    assert set(Results().to_json()) == {"bpc_base", "kernels", "bpc_before", "train_loss", "steps", "tokens_seen",
                                        "skipped_steps", "bpc_after"}
    assert Results(eval_loss=1.5).to_json()["eval_loss"] == 1.5


# --- run.json
def test_a_run_identity_record_round_trips():
    record = RunIdentityRecord(RunIdentity({"lora_r": 4}, [["a.txt", 10, "s" * 64]], "t" * 16,
                                           BaseFingerprint("c" * 64, {}), 2), 4.5, "checkpoint-2")
    assert RunIdentityRecord.from_json(json.loads(json.dumps(record.to_json())), Path("run.json")) == record
    assert list(record.to_json()) == ["format", "identity", "bpc_before", "resumed_from"]


def test_a_run_json_written_before_the_records_loads_and_writes_back_unchanged(tmp_path):
    data = today("run.json")
    record = RunIdentityRecord.read(written(tmp_path / "run", "run.json", data))
    assert record.to_json() == data and record.version is None
    assert record.identity.processes == 1 and record.bpc_before == data["bpc_before"]
    resumed = {**data, "resumed_from": "checkpoint-2"}
    assert RunIdentityRecord.from_json(resumed, Path("run.json")).to_json() == resumed
    assert RunIdentityRecord.read(tmp_path / "nothing") is None


@pytest.mark.parametrize("data, words", [
    ({"identity": 1}, "(its identity is missing or malformed): restore it, or start again without --resume"),
    ([], "(its identity is missing or malformed)"),
    ({"identity": {"config": {}}}, "(its identity is missing or malformed)"),
    ({"identity": {**today("run.json")["identity"], "corpus": [["a.txt"]]}}, "(its identity is missing or malformed)"),
    ({**today("run.json"), "bpc_before": "4.5"}, "('bpc_before' must be a number): restore it, or start again"),
    ({**today("run.json"), "resumed_from": 2}, "'resumed_from' must be a string"),
    ({**today("run.json"), "identity": {**today("run.json")["identity"], "processes": "2"}},
     "'identity.processes' must be an integer"),
])
def test_a_malformed_run_json_is_refused_by_name(tmp_path, data, words):
    run = written(tmp_path / "run", "run.json", data)
    with pytest.raises(UserError) as e:
        RunIdentityRecord.read(run)
    message = refusal(e)
    assert message.startswith(f"{run / 'run.json'} is not a peftko run record ") and words in message


def test_a_run_json_with_any_identity_object_still_marks_a_run(tmp_path):
    """The ownership rules' looser test: a damaged identity still says a run began there."""
    assert RunIdentityRecord.marks(written(tmp_path / "a", "run.json", {"identity": {}}))
    assert not RunIdentityRecord.marks(written(tmp_path / "b", "run.json", {"identity": 1}))
    assert not RunIdentityRecord.marks(tmp_path / "c")


# --- peftko-merge.json
def test_a_merge_record_round_trips():
    mark = MergeRecord("/runs/a", "/models/base", "bfloat16", ["config.json", "model.safetensors"])
    assert MergeRecord.from_json(json.loads(json.dumps(mark.to_json())), Path("peftko-merge.json")) == mark


def test_a_merge_mark_written_before_the_records_loads_and_writes_back_unchanged(tmp_path):
    data = today("peftko-merge.json")
    mark = MergeRecord.read(written(tmp_path / "merged", "peftko-merge.json", data))
    assert mark.to_json() == data and list(mark.to_json()) == list(data)
    assert mark.dtype == "float32" and "model.safetensors" in mark.files


@pytest.mark.parametrize("data, words", [
    ("[]", "it holds a JSON list, not an object"),
    ({**today("peftko-merge.json"), "adapter": None}, "'adapter' is missing"),
    ({"adapter": "/runs/a", "dtype": "float32"}, "'base_model' is missing"),
    ({**today("peftko-merge.json"), "dtype": 32}, "'dtype' must be a string"),
    ({**today("peftko-merge.json"), "files": "model.safetensors"}, "'files' must be a list of names"),
])
def test_a_malformed_merge_mark_is_refused_by_name_and_read_as_none_where_reading_is_lenient(tmp_path, data, words):
    merged = written(tmp_path / "merged", "peftko-merge.json", data)
    with pytest.raises(UserError) as e:
        MergeRecord.read(merged)
    message = refusal(e)
    assert message.startswith(f"{merged / 'peftko-merge.json'} is not a peftko merge mark: ") and words in message
    assert MergeRecord.peek(merged) is None  # damaged: only the mark is ours; the dtype is chosen as for any model
    assert MergeRecord.peek(tmp_path / "plain-model") is None

"""`peftko merge --gguf`: a tiny model on the real Llama-3 vocabulary through llama.cpp's own converter.

The converter is the one vendored in the llama-cpp-python sdist that tests/real_vocab.py fetches
for the vocabularies. The GGUF is read back with the `gguf` package, independently of peftko's own
check: every Hugging Face token keeps its id, each marker is a USER_DEFINED token, the marker rows
carry the trained embeddings, and the Modelfile stops at the run's book-end marker; llama.cpp itself
(tests/llama_cpp_build.py, built once per machine) tokenizes Korean text with every marker to the
Hugging Face ids, and so does peftko's own check where llama-cpp-python imports. Refusals (no
converter, the demo's locally trained tokenizer) come before the merge and write nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from importlib.util import find_spec
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.run.records import RunRecord
from tests.llama_cpp_build import id_problems, llama_cpp_site, run_worker  # noqa: F401 - a fixture
from tests.real_vocab import SDIST_VERSION, RealVocabUnavailable, cache_root, fetch_sdist

LLAMA_CPP_IN_SDIST = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def record_of(manifest: dict) -> RunRecord:
    return RunRecord.from_json(manifest, Path("peftko.json"))


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def extract_llama_cpp(root: Path) -> Path:
    """The converter, its `conversion` package and its gguf-py, out of the sdist, laid out as llama.cpp is."""
    target = root / f"llama.cpp-{SDIST_VERSION}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    sdist = fetch_sdist(root)
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=root))
    try:
        with tarfile.open(sdist) as tar:
            for member in tar:
                name = member.name.removeprefix(LLAMA_CPP_IN_SDIST)
                if member.isfile() and name != member.name and name.startswith(CONVERTER_PARTS):
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(tmp / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    except (tarfile.TarError, OSError, EOFError) as e:
        if not (target / "convert_hf_to_gguf.py").is_file():  # else another process finished first
            raise RealVocabUnavailable(f"cannot extract llama.cpp's converter from {sdist}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="module")
def llama_cpp():
    """A llama.cpp folder with convert_hf_to_gguf.py; skipped (failed under CI) when it cannot be had."""
    try:
        folder = extract_llama_cpp(cache_root())
    except RealVocabUnavailable as e:
        _unavailable(f"llama.cpp's converter unavailable: {e}")
    if find_spec("sentencepiece") is None:  # the converter imports it for every Llama model
        _unavailable("llama.cpp's converter needs sentencepiece: pip install -e '.[test]'")
    return folder


@pytest.fixture(scope="module")
def exported(llama_cpp, real_run, tmp_path_factory):
    """A 2-step 4-bit run on a tiny model with Llama-3's real vocabulary, merged with --gguf."""
    out, run = tmp_path_factory.mktemp("gguf"), real_run("llama3")
    # --gguf alone takes the default type; the option after it is not read as its value
    # --progress json: the events are checked below; their messages are the lines a terminal shows
    r = CliRunner().invoke(main, ["merge", str(run), "--output", str(out / "merged"), "--gguf",
                                  "--llama-cpp", str(llama_cpp), "--progress", "json"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    return {"merged": out / "merged", "events": events,
            "output": "\n".join(e["text"] for e in events if e["event"] == "message"),
            "manifest": json.loads((run / "peftko.json").read_text(encoding="utf-8"))}


@pytest.mark.slow  # llama.cpp's converter (the sdist)
def test_the_export_reports_its_phases(exported):
    """merge, its self-check and the GGUF export each start, advance and finish, in that order."""
    events = exported["events"]
    started = [e["phase"] for e in events if e["event"] == "started"]
    assert started == ["merge", "self-check", "gguf"]
    for name in started:
        finished = [e for e in events if e["event"] == "finished" and e["phase"] == name]
        assert len(finished) == 1 and finished[0]["ok"] and finished[0]["done"] == finished[0]["total"] > 0


@pytest.fixture(scope="module")
def reader(exported):
    """The GGUF, read once: parsing 128k tokens and 280k merges takes the gguf package seconds."""
    import gguf

    return gguf.GGUFReader(exported["merged"] / "model-q8_0.gguf")


@pytest.mark.slow  # llama.cpp's converter (the sdist)
def test_markers_are_user_defined_tokens_with_the_hugging_face_ids(exported, reader):
    import gguf
    from transformers import AutoTokenizer

    tokens, types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    hf = AutoTokenizer.from_pretrained(exported["merged"])
    # every id, not only the markers
    assert tokens.contents() == hf.convert_ids_to_tokens(list(range(len(hf))))
    markers = exported["manifest"]["markers"]
    assert {"|START_OF_TITLE|>", "|END_OF_BOOK|>", "|SOUND|>"} <= {m["marker"] for m in markers}
    for m in markers:
        assert hf(m["marker"], add_special_tokens=False)["input_ids"] == [m["id"]]
        assert tokens.contents(m["id"]) == m["marker"]
        assert types.contents(m["id"]) == gguf.TokenType.USER_DEFINED, m
    assert f"{len(markers)} markers are single USER_DEFINED tokens" in exported["output"]


@pytest.mark.slow  # llama.cpp's converter (the sdist)
def test_marker_rows_carry_the_trained_embeddings(exported, reader):
    """The GGUF's rows are the merged model's, to within one q8_0 step, for the new rows too."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file

    weights = load_file(exported["merged"] / "model.safetensors")
    tensors = {t.name: t for t in reader.tensors}
    ids = [m["id"] for m in exported["manifest"]["markers"]]
    for gguf_name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
        t = tensors[gguf_name]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        got = gguf.quants.dequantize(t.data, t.tensor_type)[ids]
        want = weights[hf_name][ids].to(torch.float32).numpy()
        step = np.abs(want).max(axis=1, keepdims=True) / 127
        assert (np.abs(got - want) <= step).all(), gguf_name


@pytest.mark.slow  # llama.cpp's converter (the sdist)
def test_modelfile_stops_at_the_book_end_marker(exported):
    from peftko.merge.merged_folder import MERGE_KIND
    from peftko.run.ownership import entries_to_replace

    end = exported["manifest"]["config"]["doc_end_marker"]
    assert end == "|END_OF_BOOK|>"
    lines = (exported["merged"] / "Modelfile").read_text(encoding="utf-8").splitlines()
    assert "FROM ./model-q8_0.gguf" in lines
    assert f'PARAMETER stop "{end}"' in lines
    # The corpus's marker grammar for llama.cpp, beside them, and how to use it
    grammar = (exported["merged"] / "markers.gbnf").read_text(encoding="utf-8")
    assert "root ::= " in grammar and '"|END_OF_BOOK|>"' in grammar
    assert "--grammar-file markers.gbnf" in exported["output"]
    # All are the merge's own: a later merge --force may replace the folder whole.
    replaced = {e.name for e in entries_to_replace(exported["merged"], MERGE_KIND, True, "")}
    assert {"model-q8_0.gguf", "Modelfile", "markers.gbnf", "model.safetensors"} <= replaced
    assert not [p for p in exported["merged"].parent.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.slow  # llama.cpp's converter (the sdist)
def test_a_stop_during_the_merge_save_skips_the_conversion(exported, llama_cpp):
    """A Ctrl-C deferred while the merged model was renamed in stops the command before the converter."""
    import signal

    from peftko.core.errors import Interrupted
    from peftko.merge.gguf import GgufOptions, export
    from peftko.core.signals import Stopper

    stopper = Stopper("before the merged model was written; nothing was written.")
    stopper.signum = signal.SIGINT
    before = {p.name: p.stat().st_mtime_ns for p in exported["merged"].iterdir()}
    with pytest.raises(Interrupted, match="after the merged model was written, before the GGUF was"):
        export(exported["merged"], record_of(exported["manifest"]), GgufOptions("f16", str(llama_cpp)), stopper)
    assert {p.name: p.stat().st_mtime_ns for p in exported["merged"].iterdir()} == before
    assert not [p for p in exported["merged"].parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # llama.cpp's converter (the sdist), and llama.cpp built from it once per machine
def test_llama_cpp_tokenizes_korean_with_markers_as_hugging_face(exported, llama_cpp_site):  # noqa: F811
    """llama.cpp itself (tests/llama_cpp_build.py), whether or not peftko's environment has it."""
    from transformers import AutoTokenizer

    from peftko.merge.gguf import sample_text

    text = sample_text(record_of(exported["manifest"]).markers)
    want = AutoTokenizer.from_pretrained(exported["merged"])(text, add_special_tokens=False)["input_ids"]
    got = run_worker(llama_cpp_site, {"gguf": str(exported["merged"] / "model-q8_0.gguf"), "tokenize": [text]})
    assert id_problems(["the Korean sample"], got["tokenize"], [want]) == []
    if find_spec("llama_cpp") is None:  # peftko's own check says it could not compare, not that it did
        assert "llama.cpp tokenization not compared" in exported["output"]
    else:
        assert "llama.cpp tokenizes a Korean sample" in exported["output"]


@pytest.mark.slow  # llama.cpp's converter (the sdist), and llama.cpp built from it once per machine
def test_peftkos_own_check_runs_llama_cpp_where_it_imports(real_run, llama_cpp, llama_cpp_site, tmp_path):  # noqa: F811
    """`peftko merge --gguf` in a process where llama_cpp imports: its check compares llama.cpp's ids,
    not only the GGUF's vocabulary (a process of its own: the test environment has no llama_cpp)."""
    import subprocess
    import sys

    paths = [str(llama_cpp_site), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    cmd = [sys.executable, "-m", "peftko", "merge", str(real_run("llama3")), "--output", str(tmp_path / "merged"),
           "--gguf", "--llama-cpp", str(llama_cpp)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, errors="replace", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "GGUF check: llama.cpp tokenizes a Korean sample with every marker" in done.stdout + done.stderr
    assert "not compared" not in done.stdout + done.stderr


@pytest.mark.slow  # llama.cpp's converter (the sdist)
def test_demo_tokenizer_is_refused_before_the_merge(tiny_run, llama_cpp, tmp_path):
    out = tmp_path / "merged"
    r = CliRunner().invoke(main, ["merge", str(tiny_run), "--output", str(out), "--gguf", "f16",
                                  "--llama-cpp", str(llama_cpp)])
    assert r.exit_code == 2, r.output
    assert "BPE pre-tokenizer was not recognized" in r.output and "merge without --gguf" in r.output
    assert "Traceback" not in r.output and "loading" not in r.output  # refused before the model load
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["nowhere", "empty"])
def test_without_the_converter_says_how_to_get_it(tiny_run, tmp_path, monkeypatch, where):
    monkeypatch.delenv("PEFTKO_LLAMA_CPP", raising=False)
    args = ["merge", str(tiny_run), "--output", str(tmp_path / "merged"), "--gguf"]
    if where == "empty":
        (tmp_path / "llama.cpp").mkdir()
        monkeypatch.setenv("PEFTKO_LLAMA_CPP", str(tmp_path / "llama.cpp"))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert "pip download --no-deps --no-binary llama-cpp-python llama-cpp-python" in r.output
    assert "--llama-cpp DIR" in r.output and "PEFTKO_LLAMA_CPP" in r.output
    if where == "empty":
        assert "holds no convert_hf_to_gguf.py" in r.output
    assert not (tmp_path / "merged").exists()


def test_modelfile_quotes_the_stop_marker():
    from peftko.merge.gguf import modelfile

    manifest = {"base_model": "base", "base_fingerprint": {}, "vocab": {"rows_after": 6},
                "config": {"doc_end_marker": '<"END\\>'}, "markers": [{"marker": '<"END\\>', "id": 5}]}
    assert 'PARAMETER stop "<\\"END\\\\>"' in modelfile("model-f16.gguf", record_of(manifest)).splitlines()
    manifest["config"]["doc_end_marker"] = None
    assert "PARAMETER" not in modelfile("model-f16.gguf", record_of(manifest))


def test_missing_converter_packages_are_named(tmp_path, monkeypatch):
    import peftko.merge.gguf as g
    from peftko.core.errors import UserError

    (tmp_path / "convert_hf_to_gguf.py").write_text("", encoding="utf-8")
    monkeypatch.setattr(g, "find_spec", lambda name: None if name == "sentencepiece" else name)
    with pytest.raises(UserError, match=r"needs the Python package\(s\) sentencepiece: pip install sentencepiece "):
        g.find_converter(str(tmp_path))
    monkeypatch.setattr(g, "find_spec", lambda name: name)  # every package found
    assert g.find_converter(str(tmp_path)) == tmp_path / "convert_hf_to_gguf.py"

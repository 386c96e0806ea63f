"""`peftko merge --gguf`: the merged model as a GGUF for llama.cpp and Ollama, checked, with a Modelfile.

The conversion is llama.cpp's own `convert_hf_to_gguf.py`, run as a subprocess: it knows every
architecture and tokenizer llama.cpp can run, and a hand-written writer would drift from it. It is
not a PyPI package, so the user points peftko at a llama.cpp folder (`--llama-cpp DIR` or
PEFTKO_LLAMA_CPP); the llama-cpp-python source distribution carries one in vendor/llama.cpp/.

Two steps, so that a refusal costs seconds and not a merge:
- preflight, before the merge: find the converter and its Python packages, and convert the
  base's vocabulary alone; llama.cpp refuses a tokenizer it does not know (the demo's locally
  trained one) right there.
- export, once the merged model is published: convert into a staging folder beside the output,
  check the GGUF (each marker one USER_DEFINED token with its Hugging Face id; llama.cpp, where
  llama-cpp-python is installed, tokenizes Korean text with markers to the Hugging Face ids), and
  only then move it in and write the Ollama Modelfile and, where the run recorded a marker grammar,
  markers.gbnf (peftko.merge.gbnf) for llama.cpp's grammar-constrained generation. Every name is
  recorded in peftko-merge.json BEFORE it is written, so a later --force may replace it (ownership).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from importlib.util import find_spec
from pathlib import Path

from peftko.core.atomic import move_into, publish, staging_dir, write_json_atomic
from peftko.core.errors import UserError
from peftko.core.progress import phase, say
from peftko.merge import gbnf
from peftko.merge.merged_folder import MARK
from peftko.run.records import MarkerEntry, MergeRecord, RunRecord

TYPES = ("q8_0", "f16", "bf16", "f32")
# Unsloth's default too: half the size of f16 and near-lossless; f16/bf16 are for re-quantizing
# later (`ollama create --quantize q4_K_M` starts from a 16-bit GGUF).
DEFAULT_TYPE = "q8_0"
ENV = "PEFTKO_LLAMA_CPP"
CONVERTER = "convert_hf_to_gguf.py"
MODELFILE = "Modelfile"
# The converter imports sentencepiece for every Llama model; peftko's check reads the GGUF with gguf.
PACKAGES = ("sentencepiece", "gguf")
GET_IT = (
    "Get it with\n"
    "  pip download --no-deps --no-binary llama-cpp-python llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz\n"
    "(the unpacked llama_cpp_python-* folder holds it in vendor/llama.cpp/), or use a checkout of llama.cpp "
    f"(ggml-org/llama.cpp); then pass --llama-cpp DIR or set {ENV}=DIR."
)
PRE_TOKENIZER_REFUSED = "BPE pre-tokenizer was not recognized"
SAMPLE = "{m}옛날 어느 마을에 작은 우체부가 살았습니다. \"할머니, 오늘은 비가 올까요?\"{m}똑똑!\n {m} "


@dataclass(frozen=True)
class GgufOptions:
    outtype: str = DEFAULT_TYPE
    llama_cpp: str | None = None  # --llama-cpp; None: $PEFTKO_LLAMA_CPP


def file_name(outtype: str) -> str:
    return f"model-{outtype}.gguf"


def find_converter(llama_cpp: str | None) -> Path:
    """convert_hf_to_gguf.py in --llama-cpp DIR or $PEFTKO_LLAMA_CPP, or a UserError saying how to get it."""
    given = llama_cpp or os.environ.get(ENV)
    if not given:
        raise UserError(f"--gguf needs llama.cpp's {CONVERTER}, which does not come with peftko. {GET_IT}")
    folder = Path(given).expanduser()
    for candidate in (folder / CONVERTER, folder / "vendor" / "llama.cpp" / CONVERTER):
        if candidate.is_file():
            missing = [p for p in PACKAGES if find_spec(p) is None]
            if missing:
                raise UserError(f"--gguf needs the Python package(s) {', '.join(missing)}: "
                                f"pip install {' '.join(missing)}  (peftko's 'gguf' extra)")
            return candidate
    where = "--llama-cpp" if llama_cpp else ENV
    raise UserError(f"{where} {folder} holds no {CONVERTER} (looked in it and in its vendor/llama.cpp/). {GET_IT}")


def preflight(base: Path, output: Path, options: GgufOptions) -> None:
    """Before the merge: the converter, and llama.cpp's verdict on the base's tokenizer (seconds)."""
    converter = find_converter(options.llama_cpp)
    say(f"GGUF: checking that llama.cpp's {CONVERTER} ({converter}) accepts the tokenizer of {base}")
    with staging_dir(output.parent, f".{output.name}.gguf-check-") as tmp:
        _convert(converter, base, tmp / "vocab.gguf", ["--vocab-only"], base)


def export(merged: Path, record: RunRecord, options: GgufOptions, stopper) -> Path:
    """After the merge is published: GGUF and Modelfile into `merged`, recorded as peftko's own.

    Both are written in a staging folder beside `merged` and renamed in only after the check, so a
    GGUF that fails it, or a stop, leaves the merged model as it was.
    """
    stopper.unfinished = "after the merged model was written, before the GGUF was: no GGUF or Modelfile was written."
    converter = find_converter(options.llama_cpp)
    name = file_name(options.outtype)
    files = [name, MODELFILE] + ([gbnf.FILE] if record.grammar else [])
    # "prepare" raises for a Ctrl-C already received during the merge's save: no conversion then.
    with stopper.during("prepare"):
        _claim(merged, files)
        say(f"GGUF: converting {merged} to {options.outtype} with llama.cpp's {CONVERTER}")
        with staging_dir(merged.parent, f".{merged.name}.gguf-") as stage:
            _convert_and_check(converter, merged, stage / name, record, options.outtype)
            (stage / MODELFILE).write_text(modelfile(name, record), encoding="utf-8")
            if record.grammar:
                (stage / gbnf.FILE).write_text(gbnf.gbnf(record.grammar, record.doc_end_marker), encoding="utf-8")
            publish(stage)  # the converter's and tempfile's modes, made readable by a model server's user
            with stopper.during("save"):
                move_into(stage, merged, files)
    say(f"GGUF written to {merged / name}; for Ollama: cd {merged} && ollama create NAME -f {MODELFILE}")
    if record.grammar:
        say(gbnf.usage(merged / gbnf.FILE))
    return merged / name


def _convert_and_check(converter: Path, merged: Path, staged: Path, record: RunRecord, outtype: str) -> None:
    try:
        with phase("gguf", 2, "steps") as progress:  # the conversion, then peftko's check of its result
            _convert(converter, merged, staged, ["--outtype", outtype], merged)
            progress.advance()
            for line in check(staged, merged, record):
                say(f"GGUF check: {line}")
            progress.advance()
    except UserError as e:
        raise UserError(f"{e}\nThe merged model in {merged} is complete; only the GGUF was not written.") from None


def _claim(merged: Path, names: list[str]) -> None:
    """Record the names in peftko-merge.json first: a stop halfway still leaves them ours."""
    mark = MergeRecord.read(merged)  # written moments ago by the merge
    write_json_atomic(merged / MARK, replace(mark, files=sorted({*mark.files, *names})).to_json())


def _convert(converter: Path, model: Path, outfile: Path, extra: list[str], whose: Path) -> None:
    cmd = [sys.executable, str(converter), str(model), "--outfile", str(outfile), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if done.returncode == 0 and outfile.is_file():
        return
    log = done.stderr + done.stdout
    if PRE_TOKENIZER_REFUSED in log:
        raise UserError(
            f"llama.cpp's converter refuses the tokenizer of {whose} (\"{PRE_TOKENIZER_REFUSED}\"): it "
            "takes a byte-level BPE tokenizer only when it is one of the published bases it lists (Llama-3, "
            "Qwen2, EXAONE, ...), which a tokenizer trained locally, like builtin:tiny-llama's, never is. Fine-tune "
            "such a base to get a GGUF, or merge without --gguf."
        )
    tail = [line for line in log.strip().splitlines() if line.strip()][-6:]
    raise UserError(f"llama.cpp's converter failed on {whose} (exit {done.returncode}); its last lines:\n  "
                    + "\n  ".join(tail or ["(no output)"]) + f"\ncommand: {' '.join(cmd)}")


def check(gguf_path: Path, merged: Path, record: RunRecord) -> list[str]:
    """What was checked, one line each; a UserError naming the first marker or text that differs."""
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(gguf_path)
    tokens, types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    markers = record.markers
    for m in markers:
        hf = tokenizer(m.marker, add_special_tokens=False)["input_ids"]
        got = (tokens.contents(m.id), types.contents(m.id)) if m.id < len(tokens.data) else None
        if hf != [m.id] or got != (m.marker, gguf.TokenType.USER_DEFINED):
            raise UserError(f"GGUF check failed: marker {m.marker} is id {m.id} in peftko.json, "
                            f"{hf} in the merged tokenizer and {got} in the GGUF.")
    ids = sorted(m.id for m in markers)
    lines = [f"{len(ids)} markers are single USER_DEFINED tokens with the Hugging Face ids ({ids[0]}..{ids[-1]})"
             if ids else "no markers in this run"]
    return lines + [_llama_cpp_tokenizes_alike(gguf_path, tokenizer, markers)]


def sample_text(markers: list[MarkerEntry]) -> str:
    """Korean text with every marker: after text, before text, between spaces, at a line start."""
    return "".join(SAMPLE.format(m=m.marker) for m in markers) or SAMPLE.format(m="")


def _llama_cpp_tokenizes_alike(gguf_path: Path, tokenizer, markers: list[MarkerEntry]) -> str:
    try:
        from llama_cpp import Llama
    except (ImportError, OSError) as e:  # OSError: the package is there but its libllama is not
        return f"llama.cpp tokenization not compared: llama-cpp-python cannot be imported ({e})"

    text = sample_text(markers)
    want = tokenizer(text, add_special_tokens=False)["input_ids"]
    with _native_stderr_silenced():  # llama.cpp warns about the context size of a vocabulary-only load
        vocab = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    # special=False: a marker in plain prompt text must become its token without special parsing
    got = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise UserError(f"GGUF check failed: llama.cpp tokenizes the Korean sample differently from Hugging "
                        f"Face from token {first} on (llama.cpp {got[first:first + 5]}, Hugging Face "
                        f"{want[first:first + 5]}).")
    return f"llama.cpp tokenizes a Korean sample with every marker ({len(want)} tokens) to the Hugging Face ids"


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null: llama.cpp writes from C, past Python's sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def modelfile(gguf_name: str, record: RunRecord) -> str:
    """Ollama's Modelfile: the GGUF, plain continuation (as peftko trains), stop at the book end."""
    end = record.book_end()
    lines = [
        "# Written by peftko. Create the model with: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        "# The model continues text, as it was trained: no chat template around the prompt.",
        'TEMPLATE """{{ .Prompt }}"""',
    ]
    if end is not None:
        lines.append(f"PARAMETER stop {_quoted(end.marker)}")
    if record.grammar:  # Ollama takes no GBNF: the stop above is what it keeps of the structure
        lines.append(f"# The markers' grammar for llama.cpp: {gbnf.FILE} (llama-cli --grammar-file {gbnf.FILE})")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

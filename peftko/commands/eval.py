"""`peftko eval`: bits per character of a corpus, with and without the markers, and per marker,
by the rules of peftko.evaluate.scoring, as a table or one JSON object."""

from __future__ import annotations

import json

from peftko.core.config import DEFAULT_DOC_END, DEFAULT_MARKER_PATTERN
from peftko.core.progress import Result, emit, say
from peftko.corpus.reading import read_documents
from peftko.evaluate.scoring import default_seq_len, evaluate_texts
from peftko.evaluate.structure import SampleOptions, describe, structure_score
from peftko.model.inference import load_for_inference


def run_eval(model_path: str, data: list[str], seq_len: int | None = None, batch_size: int = 4,
             quant: str | None = None, device: str = "auto", pattern: str | None = None,
             as_json: bool = False, dtype: str | None = None, sampling: SampleOptions | None = None) -> dict:
    model, tokenizer, info = load_for_inference(model_path, quant, device, dtype)
    pattern = pattern or DEFAULT_MARKER_PATTERN
    doc_end = info.doc_end_marker or DEFAULT_DOC_END
    docs, found = read_documents(data, pattern, doc_end_marker=doc_end)
    seq_len = seq_len or default_seq_len(model)
    markers = sorted({*found, *info.markers})
    scores = evaluate_texts(model, tokenizer, docs, markers, seq_len, batch_size, next(model.parameters()).device)
    result = {"model": str(info.path), "seq_len": seq_len, "dtype": info.dtype, **scores.to_json()}
    if sampling is not None:
        result["structure"] = structure_score(model, tokenizer, info, docs, markers, sampling, doc_end, pattern, seed=42)
    emit(Result("eval", result))
    say(json.dumps(result, ensure_ascii=False) if as_json else render(result))
    return result


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def render(r: dict) -> str:
    lines = [f"{r['documents']} documents, {r['chars']:,} characters, {r['tokens']:,} tokens "
             f"({_fmt(r['tokens_per_char'])} tokens per character; windows of {r['seq_len']} tokens, "
             f"computed in {r['dtype']})",
             f"bits per character, whole text:    {_fmt(r['bits_per_char'])}",
             f"bits per character, story text:    {_fmt(r['bits_per_char_text'])} "
             f"({r['text_chars']:,} characters outside markers)"]
    if r["markers"]:
        width = max(len(m) for m in r["markers"])
        lines.append(f"{'marker':<{width}}  {'count':>6}  {'bits/occurrence':>15}  {'top-1':>6}")
        for m, s in r["markers"].items():
            lines.append(f"{m:<{width}}  {s['count']:>6}  {_fmt(s['bits_per_occurrence'], '.2f'):>15}  "
                         f"{_fmt(s['top1'], '.1%'):>6}")
    if "structure" in r:
        lines.append(describe(r["structure"]))
    return "\n".join(lines)

"""`peftko markers`: a corpus report (encodings, markers, marker mistakes with file and line), as
tables or one JSON object; with --model, how that base's tokenizer splits each marker; with
--grammar, the markers' grammar learned from the corpus (peftko.corpus.grammar) as readable rules."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from peftko.core.config import DEFAULT_MARKER_PATTERN
from peftko.core.errors import UserError
from peftko.core.paths import resolve_data_paths
from peftko.core.progress import Result, emit, say
from peftko.corpus.grammar import render_rules
from peftko.corpus.scan import scan_corpus


def tokenizer_for_markers(model: str):
    """--model's tokenizer for `peftko markers`, from a local directory (or the built-in base): no network,
    no remote code."""
    # Imported here, not at the top: torch and transformers load only when --model asks for a
    # tokenizer, so the lint alone answers in a fraction of a second.
    from peftko.model.base import load_tokenizer, resolve_model_path
    from peftko.model.built_base import load_confirmed

    if model.startswith("builtin:"):
        path = resolve_model_path(model)
        return load_confirmed(path, lambda: load_tokenizer(path))
    if not Path(model).is_dir():  # a tokenizer folder is enough here; no config.json needed
        raise UserError(f"--model {model}: not a local model directory")
    return load_tokenizer(Path(model))


def run_markers_command(
    paths: Sequence[str | Path],
    model: str | None = None,
    as_json: bool = False,
    strict: bool = False,
    pattern: str = DEFAULT_MARKER_PATTERN,
    jsonl_field: str = "text",
    grammar: bool = False,
) -> int:
    """Print the report; return 1 when `strict` and any problem was found, else 0."""
    tokenizer = tokenizer_for_markers(model) if model else None
    report = scan_corpus(resolve_data_paths(paths), pattern, jsonl_field=jsonl_field, tokenizer=tokenizer)
    data = report.to_json()
    if grammar:  # only when asked: the JSON without --grammar stays as scripts know it
        data["grammar"] = report.grammar.to_json() if report.grammar else None
    emit(Result("markers", data))
    if as_json:
        say(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        say(report.render_table(), end="")
        if grammar:
            say("\n" + render_rules(report.grammar), end="")
    return 1 if strict and report.problems else 0

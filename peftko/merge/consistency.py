"""What merge relies on, recomputed from the files themselves and checked against peftko.json.

peftko.json says how many embedding rows the merged model has and which token id each marker is;
a merge that believed a damaged or edited manifest would write a model whose vocabulary and
tokenizer disagree, and pass its own self-check. So each fact is taken from where it lives (the
saved tokenizer, the adapter's config, the base's config.json) and any disagreement is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftko.core.errors import UserError
from peftko.model.base import read_base_config
from peftko.model.token_rows import trained_rows
from peftko.run.layout import MANIFEST
from peftko.run.records import RunRecord


def check_manifest_facts(run_dir: Path, base: Path, record: RunRecord, tokenizer) -> None:
    problems = _row_problems(base, record, tokenizer) + _marker_problems(run_dir, record, tokenizer)
    if problems:
        raise UserError(f"{run_dir / MANIFEST} disagrees with the files it describes: {'; '.join(problems)}. "
                        "It was edited or damaged: restore it from the training run, or train again.")


def _row_problems(base: Path, record: RunRecord, tokenizer) -> list[str]:
    config = read_base_config(base)
    base_rows = (config.get("text_config") or config).get("vocab_size")
    if not isinstance(base_rows, int):
        return []  # a config without vocab_size: the streaming merge reads the rows from the tensors
    expected = max(len(tokenizer), base_rows)  # training grows the embeddings to fit the tokenizer, never shrinks
    recorded = record.vocab.rows_after
    if recorded != expected:
        return [f"vocab.rows_after is {recorded}, but the base's {base_rows} rows grown for the saved tokenizer's "
                f"{len(tokenizer)} tokens are {expected}"]
    return []


def _marker_problems(run_dir: Path, record: RunRecord, tokenizer) -> list[str]:
    problems = []
    for m in record.markers:
        ids = tokenizer(m.marker, add_special_tokens=False)["input_ids"]
        if ids != [m.id]:
            problems.append(f"marker {m.marker} is id {m.id} there but {ids} in the saved tokenizer")
    trained = _trained_rows(run_dir)
    recorded = sorted(m.id for m in record.markers)
    pieces = record.marker_piece_rows or []  # a list of integers: RunRecord refuses anything else
    allowed = {p for m in record.markers for p in m.piece_ids or []}
    if not set(pieces) <= allowed:
        problems.append(f"marker_piece_rows {pieces} are not pieces the markers were split into")
    elif trained is not None and trained != trained_rows(record.markers, pieces):
        problems.append(f"the markers are ids {recorded} (and their pieces' rows {pieces}) there but the adapter "
                        f"trains rows {trained}")
    return problems


def _trained_rows(run_dir: Path) -> list[int] | None:
    """The token rows adapter_config.json says the adapter trains (None when it trains none)."""
    try:
        config = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # read and refused with its own message by the merge itself
    rows = config.get("trainable_token_indices") if isinstance(config, dict) else None
    if isinstance(rows, dict):
        rows = next(iter(rows.values()), None)
    return sorted(rows) if isinstance(rows, list) and all(isinstance(r, int) for r in rows) else None

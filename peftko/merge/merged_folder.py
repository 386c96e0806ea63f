"""The merged model's output folder: where it may be, what --force may replace, and the swap-in.

The output follows peftko.run.ownership: never an input, replaced only when it is an earlier merge
(marked by peftko-merge.json, which lists the files peftko wrote) and only with --force, checked
for writability before any load. The model is written in a staging folder beside the output and
swapped in whole (peftko.core.atomic), so an existing output is never half overwritten.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from peftko.core.atomic import check_writable, publish, replace_dir, staging_dir, write_json_atomic
from peftko.core.errors import UserError
from peftko.run.card import merged_card
from peftko.run.layout import MERGE_MARK as MARK
from peftko.run.run_folder import keep_sentencepiece_files
from peftko.run.ownership import OutputKind, check_place, entries_to_replace
from peftko.run.records import MergeRecord, RunRecord
from peftko.run.seal import seal_files

def _merge_files(output: Path):
    mark = MergeRecord.peek(output)  # None: a damaged mark, and then only the mark itself is ours
    names = {MARK, *(mark.files if mark else [])}
    return lambda name: name in names


MERGE_KIND = OutputKind("a merged model", lambda out: (out / MARK).is_file(), _merge_files)


def check_output(output: Path, inputs: dict[str, Path]) -> None:
    """Place and writability first: a refusal costs seconds, not a model load."""
    check_place(output, inputs)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a directory")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {output.parent}: {e.strerror or e}") from None
    for folder in (output.parent, output) if output.is_dir() else (output.parent,):
        check_writable(folder)


def claim_merged_folder(output: Path, force: bool) -> None:
    """Under the lock: an earlier merged model is replaced only with --force, and only whole."""
    entries_to_replace(output, MERGE_KIND, force, f"--output {output} already holds a merged model; "
                       "pass --force to replace it, or choose another directory.")


def save_atomically(write_model, tokenizer, output: Path, mark: MergeRecord, stopper,
                    record: RunRecord | None = None) -> None:
    """Write next to the target, then swap it in: an existing output is never half overwritten.

    `write_model(stage)` writes the weights, config.json and generation_config.json and checks
    them. Beside them: the tokenizer, the base's SentencePiece model (the tokenizer's save leaves
    it out) and, given the adapter's manifest, a README.md model card. The mark (peftko-merge.json,
    listing the files) is written last into the staging folder; the swap is two renames that a
    first Ctrl-C does not cut. The mark seals every file (peftko.run.seal): generate and eval check it.
    """
    output = output.resolve()
    with staging_dir(output.parent, f".{output.name}.merging-") as stage:
        write_model(stage)
        tokenizer.save_pretrained(stage)
        keep_sentencepiece_files(Path(mark.base_model), stage)
        if record is not None:
            (stage / "README.md").write_text(merged_card(record, mark, output.name), encoding="utf-8")
        files = sorted(f.name for f in stage.iterdir())
        publish(stage)  # the stage becomes the output
        write_json_atomic(stage / MARK, replace(mark, files=files, seal=seal_files(stage, files)).to_json())
        with stopper.during("save"):
            replace_dir(stage, output, f".{output.name}.old-")

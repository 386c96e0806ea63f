"""Writing a training run's output folder: its place, what --force may replace, the final adapter.

The folder's names are in peftko.run.layout. Everything is written without half-states: the
final adapter and tokenizer are staged in a hidden folder and renamed in, and peftko.json, written
last, marks the run complete (peftko.core.atomic).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from peftko.core.atomic import (TRASH_PREFIX, WRITE_PROBE, check_writable, describe_write_failure,
                                is_write_failure, move_into, publish, staging_dir, write_json_atomic)
from peftko.core.errors import UserError
from peftko.run.card import adapter_card
from peftko.run.checkpoints import STAGE_PREFIX, latest_checkpoint, sealed_checkpoint
from peftko.run.layout import (ADAPTER_FILES, BENCH, FINAL_FILES, FINAL_STAGE, LOCK, LOG_DIRS, MANIFEST, METRICS,
                               REPORT, RUN_FILE, SENTENCEPIECE_FILES)
from peftko.run.records import RunIdentityRecord, RunRecord
from peftko.run.seal import RUN_EXTRA, seal_files
from peftko.run.ownership import OutputKind, check_place, entries_to_replace


def prepare_output(output: Path, resume: bool, inputs: dict[str, Path]) -> list[Path]:
    """Refuse an output in the wrong place, create it, and check that it takes a file; the folders it
    created, deepest first (remove_if_empty takes them back when the run writes nothing).

    What is already in it is judged under the lock (claim_run_dir), so two runs never race.
    """
    output = Path(output)
    check_place(output, inputs)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a directory")
    if resume and not output.is_dir():
        raise UserError(f"--resume: {output} does not exist; start without --resume")
    created = [p for p in (output, *output.parents) if not p.exists()]
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output {output}: {e.strerror}") from None
    check_writable(output)
    return created


def remove_if_empty(created: list[Path]) -> None:
    """Take back the folders prepare_output made, deepest first, as long as each is empty: a folder
    that holds anything (the run wrote, or someone else did) stays, and so do those above it."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def claim_run_dir(output: Path, resume: bool, force: bool) -> list[Path]:
    """What --force replaces once the new run has passed its checks; refuses what it may not."""
    if resume:
        return []
    what = "a finished run" if (output / MANIFEST).exists() else "an unfinished run"
    refusal = (f"--output {output} already holds {what}. Pass --resume to continue it, --force to "
               "replace it, or choose another directory.")
    return entries_to_replace(output, RUN_KIND, force, refusal)


def _is_run_dir(output: Path) -> bool:
    """Whether a record peftko wrote says this is a training run: a peftko.json of peftko's shape, or a
    run.json with the run's identity. Names alone (a checkpoint-500/ from another trainer, a
    README.md) prove nothing."""
    return RunRecord.peek(output) is not None or RunIdentityRecord.marks(output)


def _run_files(output: Path):
    """The entries of a run directory that peftko wrote: its own names, the final files that
    peftko.json lists (or, for a run saved without that list, the names those files always have),
    and the checkpoints that carry the record peftko seals each one with."""
    record = RunRecord.peek(output)
    listed = record.files if record and record.files is not None else FINAL_FILES
    names = {MANIFEST, RUN_FILE, METRICS, LOCK, REPORT, BENCH, *LOG_DIRS, *listed}
    # Hidden work files of an interrupted write: staging, deletion, atomic-rename temporaries.
    hidden = (STAGE_PREFIX, TRASH_PREFIX, FINAL_STAGE, WRITE_PROBE, f".{MANIFEST}.",
              f".{RUN_FILE}.", f".{METRICS}.", f".{REPORT}.", f".{BENCH}.")
    return lambda name: name in names or sealed_checkpoint(output / name) or name.startswith(hidden)


RUN_KIND = OutputKind("a training run", _is_run_dir, _run_files, keep=(LOCK,))


def save_final(output: Path, peft_model, tokenizer, record: RunRecord) -> None:
    """Adapter and tokenizer first (staged, then renamed in), peftko.json last.

    The previous peftko.json is removed only once the new files are fully written: a failed
    write (a full disk) leaves the previous adapter complete; during the renames, which need no
    space, the directory reads as incomplete, which it is. peftko.json lists the files written
    (what a later --force may replace) and the adapter's SHA-256 (checked by merge).
    """
    output = Path(output)
    try:
        with staging_dir(output, FINAL_STAGE) as stage:
            # save_embedding_layers=False: only the marker rows, never a full embedding matrix.
            peft_model.save_pretrained(stage, save_embedding_layers=False)
            tokenizer.save_pretrained(stage)
            keep_sentencepiece_files(Path(record.base_model), stage)
            # Over the template peft's save_pretrained just wrote.
            (stage / "README.md").write_text(adapter_card(record, output.name), encoding="utf-8")
            files = sorted(f.name for f in stage.iterdir())
            publish(stage)
            seal = {**seal_files(output, RUN_EXTRA), **seal_files(stage, files)}
            (output / MANIFEST).unlink(missing_ok=True)
            move_into(stage, output, files)
        write_json_atomic(output / MANIFEST, replace(record, files=files, adapter_sha256=seal[ADAPTER_FILES[0]],
                                                     seal=seal).to_json())
    except Exception as e:
        if not is_write_failure(e):
            raise
        kept = " The previous adapter there is intact." if (output / MANIFEST).exists() else ""
        raise UserError(f"could not write the adapter to {output}: {describe_write_failure(e)} "
                        f"(disk full?).{kept} {_what_to_run(output)}") from None


def _what_to_run(output: Path) -> str:
    """After a failed final save: --resume only when a checkpoint exists to resume from."""
    checkpoint = latest_checkpoint(output)
    if checkpoint is not None:
        return f"Its checkpoints are intact: free space and run again with --resume (from {checkpoint.name})."
    return ("No checkpoint was written (see --save-steps), so there is nothing to resume: free space and "
            "run the same command again with --force, which replaces only what this run wrote.")


def keep_sentencepiece_files(base: Path, folder: Path) -> list[str]:
    """Copy the base's SentencePiece model files that the tokenizer's save left out.

    transformers 5 saves a fast tokenizer as tokenizer.json alone, even when it was loaded from a
    folder with tokenizer.model; converters that read the SentencePiece model (llama.cpp's, for a
    Gemma or Llama-2 fine-tune) then fail. The markers live in tokenizer.json as added tokens, so
    the base's file is the right one to ship beside it.
    """
    copied = []
    for name in SENTENCEPIECE_FILES:
        if (base / name).is_file() and not (folder / name).exists():
            shutil.copyfile(base / name, folder / name)
            copied.append(name)
    return copied



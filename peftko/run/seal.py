"""The seal: the SHA-256 of every file a run (or a merge) wrote, kept in its record, checked by every reader.

A run folder is read long after it was written, and any of its files may have been edited, cut
short, swapped with another run's or replaced by a link since. peftko.json alone cannot say so:
it describes the files, and an edited adapter_config.json (lora_alpha 32 -> 320) or a swapped
tokenizer file would be used as if training had written it. So the writer records each file's
SHA-256 as it publishes them (peftko.json's "seal", peftko-merge.json's for a merged model) and
`check_seal` refuses, naming the file, anything that is not byte for byte what was written, and
any file a loader would read that the seal does not list.

The seal guards against damage and against one file being changed behind the others' back; it is
no signature (whoever edits a file can recompute its hash in the record). What the files must
agree on is checked besides, from the files themselves (peftko.model.run_facts).
"""

from __future__ import annotations

from pathlib import Path

from peftko.core.errors import UserError
from peftko.run.identity import sha256_file
from peftko.run.layout import FINAL_FILES, MANIFEST, MERGE_MARK, METRICS

# Beside the final files, what a run's seal covers: the log, written before the final save.
# report.png (drawn from it afterwards) and bench.json (written by `peftko bench` later) are
# read by no loader and are not sealed.
RUN_EXTRA = (METRICS,)
# What a loader reads from a merged model folder beside the tokenizer files.
MODEL_FILES = ("config.json", "generation_config.json")
MODEL_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth")

TRAIN_AGAIN = "Restore the run folder from a copy, or train again."
MERGE_AGAIN = "Restore the folder from a copy, or merge again."


def seal_files(folder: Path, names) -> dict[str, str]:
    """{name: SHA-256} for each of NAMES that is a file in FOLDER."""
    folder = Path(folder)
    return {n: sha256_file(folder / n) for n in sorted(set(names)) if (folder / n).is_file()}


def check_run_seal(run_dir: Path, seal: dict[str, str] | None) -> None:
    """A run folder's files are the ones training wrote, and no unsealed file stands in for one."""
    _check(Path(run_dir), seal, MANIFEST, "training", TRAIN_AGAIN, _run_watched)


def check_merge_seal(merged: Path, seal: dict[str, str] | None) -> None:
    """A merged model's files are the ones the merge wrote, and no unsealed file stands in for one."""
    _check(Path(merged), seal, MERGE_MARK, "the merge", MERGE_AGAIN, _model_watched)


def check_checkpoint_seal(checkpoint: Path, seal: dict[str, str] | None) -> None:
    """A checkpoint's files are the ones training wrote. One written before checkpoints were sealed
    is taken as it is: refusing it would throw away the training it holds, and a resume only
    continues training (what it writes is sealed again)."""
    if seal is not None:
        checkpoint = Path(checkpoint)
        _check(checkpoint, seal, "checkpoint.json", "training", f"Remove {checkpoint.name} to resume from an "
               "earlier checkpoint, or start again without --resume.", lambda name: False)


def _run_watched(name: str) -> bool:
    return name in FINAL_FILES


def _model_watched(name: str) -> bool:
    return name in FINAL_FILES or name in MODEL_FILES or name.endswith(MODEL_SUFFIXES)


def _check(folder: Path, seal, record: str, writer: str, again: str, watched) -> None:
    if seal is None:
        # A folder without a seal cannot be told from a forged one: an older peftko wrote it (or
        # someone removed the seal). Accepting it with a warning would let anyone skip every check
        # by deleting one key.
        raise UserError(f"{folder / record} has no 'seal': it was written by an older peftko, which did not "
                        f"record the SHA-256 of each file it wrote, so nothing says its files are the ones "
                        f"{writer} wrote. {again.split(', or ')[-1].capitalize()}")
    for name, digest in sorted(seal.items()):
        path = folder / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise UserError(f"{folder / record} seals '{name}', which is not a file name in {folder}: "
                            f"the record was edited. {again}")
        if path.is_symlink():
            raise UserError(f"{path} is a symbolic link, not the file {writer} wrote there: {again}")
        if not path.is_file():
            raise UserError(f"{path} is missing: {writer} wrote it ({record} seals it). {again}")
        if sha256_file(path) != digest:
            raise UserError(f"{path} is not the file {writer} wrote: its SHA-256 differs from the one "
                            f"{record} seals (it was edited, cut short, damaged or replaced). {again}")
    extra = sorted(p.name for p in folder.iterdir() if p.name not in seal and watched(p.name))
    if extra:
        raise UserError(f"{folder / extra[0]} was not written by {writer} ({record} does not seal it), but "
                        f"loading the folder would read it: remove it. {again}")

"""peftko.json: what a finished run records, read back only when it is whole and consistent.

Every reader of a run folder (merge, eval, generate, ablate) goes through `read_manifest`, which
reads the manifest as a RunRecord (peftko.run.records checks its shape) and checks its seal (the
SHA-256 of every file the run wrote, peftko.run.seal), and `check_base`, which checks that the base on disk is the one the run was trained on.
"""

from __future__ import annotations

from pathlib import Path

from peftko.core.errors import UserError
from peftko.run.checkpoints import PREFIX, step_of
from peftko.run.identity import fingerprint_base, sha256_file
from peftko.run.layout import ADAPTER_FILES, MANIFEST, RUN_FILE, TOKENIZER_FILES
from peftko.run.records import RunRecord
from peftko.run.seal import check_run_seal


def read_manifest(run_dir: Path) -> RunRecord:
    """The manifest of a COMPLETE run, checked for shape and against the adapter file it lists,
    or a UserError saying what is missing or wrong."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"adapter directory not found: {run_dir}")
    missing = [n for n in (MANIFEST, *ADAPTER_FILES, *TOKENIZER_FILES) if not (run_dir / n).is_file()]
    if missing and not _started(run_dir):
        raise UserError(f"{run_dir} is not a `peftko lora-train` output (it holds no {MANIFEST}): pass the "
                        "--output folder of a training run.")
    if MANIFEST in missing:  # peftko.json is written last: without it the run did not finish
        raise UserError(
            f"{run_dir} is incomplete (missing {', '.join(missing)}): the training run did not finish. "
            f"Resume it with `peftko lora-train --output {run_dir} --resume`, or train again."
        )
    record = RunRecord.read(run_dir)
    check_run_seal(run_dir, record.seal)  # a file of a finished run removed since: named there
    if missing:  # only without a seal that lists them (refused above) could these be left out
        raise UserError(f"{run_dir} lacks {', '.join(missing)}, which a finished run holds: train again.")
    return record


def _started(run_dir: Path) -> bool:
    """Whether a training run began here: its run record or a checkpoint of it is there."""
    return (run_dir / MANIFEST).is_file() or (run_dir / RUN_FILE).is_file() or any(
        step_of(p) is not None for p in run_dir.glob(f"{PREFIX}*") if p.is_dir())


def check_adapter_file(run_dir: Path, record: RunRecord) -> None:
    """The adapter file is the one training wrote (runs saved before the hash was kept pass)."""
    expected = record.adapter_sha256
    path = Path(run_dir) / ADAPTER_FILES[0]
    if expected and sha256_file(path) != expected:
        raise UserError(f"{path} is not the file training wrote (its SHA-256 differs from the one in "
                        f"{MANIFEST}): it was cut short, damaged or replaced. Restore it, or train again.")


def check_base(record: RunRecord, base: str | None) -> Path:
    """The base the run was trained on (or `base`, when given), checked against its fingerprint."""
    path = Path(base or record.base_model).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"base model not found at {path}; pass its local folder with --base")
    if fingerprint_base(path) != record.base_fingerprint:
        raise UserError(
            f"the base at {path} does not match the one this adapter was trained on "
            f"({record.base_model}): its config or weights differ. Pass the original base with --base."
        )
    return path

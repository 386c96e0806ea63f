"""peftko.json: what a finished run records, read back only when it is whole and consistent.

Every reader of a run folder (merge, eval, generate, ablate) goes through `read_manifest`, which
reads the manifest as a RunRecord (peftko.run.records checks its shape) and checks its seal (the
SHA-256 of every file the run wrote, peftko.run.seal), and `check_base`, which checks that the base on disk is the one the run was trained on.
"""

from __future__ import annotations

from pathlib import Path

from peftko.core.errors import UserError
from peftko.run.checkpoints import PREFIX, step_of
from peftko.core.progress import say
from peftko.run.identity import (FULL, PendingFingerprint, base_differences, sampled_fingerprint,
                                   start_fingerprint)
from peftko.run.layout import ADAPTER_FILES, MANIFEST, RUN_FILE, TOKENIZER_FILES
from peftko.run.records import BaseFingerprint, RunRecord
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


def check_base(record: RunRecord, base: str | None) -> Path:
    """The base the run was trained on (or `base`, when given), checked against its fingerprint."""
    return start_base_check(record, base).confirm()


def start_base_check(record: RunRecord, base: str | None) -> BaseCheck:
    """Check at once what is cheap (the base is there, config.json and the weight files' names are
    the recorded ones) and start hashing every weight byte in the background; `confirm()` waits
    for it, so a merge refuses a changed base before it publishes anything."""
    path = Path(base or record.base_model).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"base model not found at {path}; pass its local folder with --base")
    recorded = record.base_fingerprint
    if recorded.scheme != FULL:
        say(f"note: this run recorded its base by sampled parts of each weight file (peftko before "
            f"whole-file hashing), so only those parts of {path} can be checked; train again to have "
            "every byte of the base checked.")
        return BaseCheck(path, record, None)
    pending = start_fingerprint(path)
    cheap = BaseFingerprint(pending.config_sha256, {n: "" for n in pending.names})
    early = base_differences(BaseFingerprint(recorded.config_sha256, {n: "" for n in recorded.weights or {}}), cheap)
    if early:
        raise _changed(path, record, early)
    return BaseCheck(path, record, pending)


class BaseCheck:
    def __init__(self, path: Path, record: RunRecord, pending: PendingFingerprint | None):
        self.path, self._record, self._pending = path, record, pending

    def confirm(self) -> Path:
        recorded = self._record.base_fingerprint
        current = self._pending.result() if self._pending else sampled_fingerprint(self.path)
        changed = base_differences(recorded, current)
        if changed:
            raise _changed(self.path, self._record, changed)
        return self.path


def _changed(path: Path, record: RunRecord, changed: list[str]) -> UserError:
    return UserError(
        f"the base at {path} does not match the one this adapter was trained on ({record.base_model}): "
        f"the base changed since training: {', '.join(changed)} differ{'s' if len(changed) == 1 else ''}; "
        "use the base the run was trained on (pass it with --base)."
    )

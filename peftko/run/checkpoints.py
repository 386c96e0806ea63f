"""Checkpoints: what `--resume` continues from, written so that none is ever half there.

A checkpoint is OUTPUT/checkpoint-N/ holding
  adapter_model.safetensors, adapter_config.json   LoRA + the marker rows (never whole matrices)
  optimizer.pt, scheduler.pt, rng_state.pth         optimizer moments, LR schedule, RNG states
                                                    (rng_state_K.pth, one per rank, data-parallel)
  trainer_state.json                                the step, hence the position in the data
  checkpoint.json                                   written last: the checkpoint is complete; it
                                                    seals the others (their SHA-256, checked by --resume)
It is written into a hidden staging folder and renamed into place, and an old one is renamed
away before it is deleted, so a crash, a full disk or a second Ctrl-C can leave a stray hidden
folder but never a `checkpoint-N` that looks complete and is not.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from peftko.core import distributed
from peftko.core.atomic import (TRASH_PREFIX, fsync_path, read_json_object, remove_dir, replace_dir,
                                replaced_on_success, staging_dir, write_json_atomic)
from peftko.run.layout import METRICS
from peftko.run.seal import seal_files

PREFIX = "checkpoint-"
DONE_FILE = "checkpoint.json"
REQUIRED_FILES = ("adapter_model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt")
STAGE_PREFIX = ".staging-"


def step_of(path: Path) -> int | None:
    name = Path(path).name
    if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
        return int(name[len(PREFIX):])
    return None


def sealed_checkpoint(path: Path) -> bool:
    """A checkpoint-N folder that peftko sealed: its checkpoint.json, written last, names step N."""
    step = step_of(path)
    if step is None or not path.is_dir():
        return False
    return read_json_object(path / DONE_FILE).get("step") == step


def is_complete(path: Path) -> bool:
    """Sealed by peftko, every file a resume loads is there, and the Trainer's state reads as JSON."""
    return (sealed_checkpoint(path) and all((path / f).is_file() for f in REQUIRED_FILES)
            and bool(read_json_object(path / "trainer_state.json")))


def complete_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in Path(output).glob(PREFIX + "*") if p.is_dir() and step_of(p) is not None]
    return sorted((p for p in found if is_complete(p)), key=step_of)


def latest_checkpoint(output: Path) -> Path | None:
    done = complete_checkpoints(output)
    return done[-1] if done else None


@contextlib.contextmanager
def staged_checkpoint(output: Path, step: int, info: dict):
    """Yield a hidden folder; whatever is written to FOLDER/checkpoint-N is sealed and renamed in.

    On any failure the staging folder is removed and every existing checkpoint is untouched.
    Data-parallel: rank 0 makes the folder and every rank writes into it (its RNG state); once all
    have written, rank 0 seals and renames it. A failure on rank 0 stops every rank.
    """
    with contextlib.ExitStack() as cleanup:
        # Only rank 0 holds the folder (and removes it at the end); every rank gets its path.
        stage = distributed.on_main(
            lambda: cleanup.enter_context(staging_dir(Path(output), f"{STAGE_PREFIX}{PREFIX}{step}-")))
        yield stage
        distributed.barrier()  # every rank's files are in
        distributed.on_main(lambda: _seal(stage / f"{PREFIX}{step}", Path(output), step, info))


def _seal(written: Path, output: Path, step: int, info: dict) -> None:
    # The SHA-256 of each file, checked when --resume takes the checkpoint (peftko.run.seal).
    seal = seal_files(written, [f.name for f in written.iterdir() if f.name != DONE_FILE])
    write_json_atomic(written / DONE_FILE, {"step": step, **info, "seal": seal})
    for f in written.iterdir():
        fsync_path(f)
    # The same step saved again (e.g. after a resume) replaces the old one, which is moved away first.
    replace_dir(written, output / written.name)
    fsync_path(output)  # the rename itself survives a power cut


def rotate(output: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (0: keep all)."""
    if keep > 0:
        for old in complete_checkpoints(output)[:-keep]:
            remove_dir(old)


def clean_leftovers(output: Path) -> None:
    """Staging and deletion folders of a process that was killed mid-write."""
    for p in Path(output).glob(".*"):
        if p.is_dir() and p.name.startswith((STAGE_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)


def trim_metrics(output: Path, step: int) -> None:
    """Drop log lines past the resumed step: those steps run again and log again."""
    path = Path(output) / METRICS
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = [ln for ln in lines if _logged_step(ln) <= step]
    if len(kept) != len(lines):
        with replaced_on_success(path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")


def _logged_step(line: str) -> float:
    """The step of a log line; a line cut short by a kill counts as past every step."""
    try:
        step = json.loads(line).get("step", 0)
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        return float("inf")
    return step if isinstance(step, (int, float)) else float("inf")




def checkpoint_seal(path: Path) -> dict | None:
    """The seal checkpoint.json records (None for a checkpoint written before peftko kept one)."""
    seal = read_json_object(Path(path) / DONE_FILE).get("seal")
    return seal if isinstance(seal, dict) else None

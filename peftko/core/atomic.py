"""Writes that a reader never sees half done, and removals that never leave half a folder.

Every file or folder peftko publishes is built beside its target and renamed in: a rename within
one filesystem is atomic, so a crash, a full disk or a second Ctrl-C leaves either the old result
or the new one, plus at most a hidden work folder that the next run recognises by its name.
Results get the permissions an ordinary write would give them (the user's umask), not the private
ones that tempfile and safetensors use for work files, so a model server run as another user can
read them. `read_json_object` reads such a record back: damaged or missing, it reads as empty,
never as a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from peftko.core.errors import UserError

TRASH_PREFIX = ".deleting-"  # a folder being removed: renamed here first, then deleted
WRITE_PROBE = ".write-test-"


def umask_mode(mode: int) -> int:
    """`mode` as the user's umask would leave it for a newly created file or folder."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def replaced_on_success(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary file beside `path` to write into; renamed over `path` when the block succeeds,
    removed when it does not. Its name starts with ".NAME.", so an owner check can tell it apart."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_mode(0o666))  # mkstemp makes 0600: others could not read the result
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json_atomic(path: Path, data) -> None:
    """JSON written to a temporary file in the same folder, fsynced, then renamed over the target."""
    with replaced_on_success(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_json_object(path: Path) -> dict:
    """A JSON file's object, or {} when the file is missing, unreadable or holds no object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def staging_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh hidden folder in `parent` to build a result in; removed at the end whatever happens
    (what was moved out of it by then stays where it went)."""
    stage = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(folder: Path) -> None:
    """Give a staged folder and its files the permissions of an ordinary write."""
    folder.chmod(umask_mode(0o777))
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(umask_mode(0o666))


def move_into(stage: Path, target: Path, names: list[str]) -> None:
    """Rename each of `names` from `stage` into `target`, replacing what is there."""
    for name in names:
        os.replace(stage / name, target / name)


def replace_dir(new: Path, target: Path, trash_prefix: str = TRASH_PREFIX) -> None:
    """Put the folder `new` where `target` is: the old one is renamed away first and deleted last,
    so `target` is never half of either (between the two renames it is briefly absent; if the
    second rename fails, the old folder goes back)."""
    if not target.exists():
        os.replace(new, target)
        return
    with staging_dir(target.parent, trash_prefix) as trash:
        os.replace(target, trash / target.name)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(trash / target.name, target)  # the old folder goes back, whole
            raise


def remove_dir(path: Path, trash_prefix: str = TRASH_PREFIX) -> None:
    """Rename away, then delete: an interrupted delete never leaves half of `path` under its name."""
    with staging_dir(path.parent, trash_prefix) as trash:
        os.replace(path, trash / path.name)


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(folder: Path, flag: str = "--output") -> None:
    """Fail now, not after an hour of training (or benchmarking), if `folder` cannot take a file."""
    try:
        fd, probe = tempfile.mkstemp(prefix=WRITE_PROBE, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to {flag} {folder}: {e.strerror or e}") from None


def is_write_failure(e: BaseException) -> bool:
    """A failed file write, as each writer reports it: OSError from Python, SafetensorError
    ("I/O error") from safetensors, RuntimeError ("unexpected pos", "file write failed") from
    torch.save's C++ writer, which does not say why."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    if type(e).__name__ == "SafetensorError":
        return "I/O error" in text or "os error" in text
    return isinstance(e, RuntimeError) and any(s in text for s in ("unexpected pos", "file write failed",
                                                                    "PytorchStreamWriter"))


def describe_write_failure(e: BaseException) -> str:
    return (e.strerror or str(e)) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"


def process_alive(pid) -> bool:
    """Whether a process with this pid runs on this host (signal 0 checks, it sends nothing)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True

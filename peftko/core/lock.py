"""One peftko process per output: a lock file that names its holder (pid and host).

The lock itself is an flock on the file, which the kernel drops when the process ends however it
ends (kill -9 included); a file left behind by a dead process is therefore taken over, with a
note. On a filesystem without flock the pid decides: a holder whose pid is dead on this host is
taken over, any other holder is respected.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from peftko.core.atomic import process_alive
from peftko.core.errors import UserError
from peftko.core.progress import say

try:
    import fcntl
except ImportError:  # Windows: the pid check alone
    fcntl = None

_held: dict[Path, int] = {}


@contextlib.contextmanager
def hold(path: Path, what: str):
    """Hold the lock file `path` for the block; refuse (exit 2) if a live process holds it."""
    path = Path(path)
    fd = _acquire(path, what)
    try:
        yield
    finally:
        _release(path, fd)


def release_all() -> None:
    """For a process about to end with os._exit: remove its lock files (the kernel frees the rest)."""
    for path, fd in list(_held.items()):
        _release(path, fd)


def _acquire(path: Path, what: str) -> int:
    try:
        for _ in range(5):  # another process may remove the file between our open and our lock
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            holder = _read(fd)
            if not _lock(fd, holder):
                os.close(fd)
                raise UserError(f"{what} is in use by another peftko process ({_describe(holder)}). Wait "
                                f"for it to finish or stop it; if it is not running, delete {path}.")
            if _same_file(fd, path):
                break
            os.close(fd)
        else:
            raise UserError(f"could not take the lock {path}: other processes keep replacing it")
        if holder:
            say(f"note: took over the lock left by a process that has ended ({_describe(holder)})")
        _write(fd)
    except OSError as e:
        raise UserError(f"cannot create the lock file {path}: {e.strerror or e}") from None
    _held[path] = fd
    return fd


def _lock(fd: int, holder: dict) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:
            pass  # no flock on this filesystem
    return not holder or (holder.get("host") == socket.gethostname() and not process_alive(holder.get("pid")))


def _release(path: Path, fd: int) -> None:
    _held.pop(path, None)
    with contextlib.suppress(OSError):
        if _same_file(fd, path):
            os.unlink(path)
    with contextlib.suppress(OSError):
        os.close(fd)


def _write(fd: int) -> None:
    data = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"

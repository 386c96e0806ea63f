"""Whole-file SHA-256 of large files, read once per process and computed beside other work.

A base's weight files are hashed whole (peftko.run.identity) while training loads the model and
while the merge streams it: the hashing thread and the loader read the same pages (safetensors
are memory-mapped), so the disk is read once, and hashlib releases the GIL for each 64 MB slice,
so the hash runs on a core the main thread leaves free even while that thread holds the GIL for
seconds (parsing a 33 MB tokenizer.json does). A file is hashed once per process: the built base's
own check (peftko.model.built_base) and the run's fingerprint share one result. The memo is keyed
on the file's identity and modification time, so a file changed in between is read again.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

CHUNK = 8 << 20  # where a file cannot be mapped: large reads, and a large file never sits in memory
SLICE = 64 << 20  # hashed per GIL release; at most this much of the file mapped (and resident) at once

_memo: dict[tuple, Future] = {}
_lock = threading.Lock()


def _key(path: Path) -> tuple:
    st = os.stat(path)  # not the name: a file renamed into place keeps its hash
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def sha256_of(path: Path) -> str:
    """The file's SHA-256, hashed from a memory mapping of it in large slices: each `update` releases
    the GIL for a whole slice (a loop of 8 MB reads needed it back 70 times a 570 MB file, and a main
    thread inside one long C call, such as json's parser loading a tokenizer, holds it for seconds).
    The mapping shares the page cache with the loader's own mapping of the file; each slice is
    unmapped again once hashed, so the process's resident size does not count the file twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # an empty file, or a file system that cannot map
            while chunk := f.read(CHUNK):
                h.update(chunk)
            return h.hexdigest()
        with mapped, memoryview(mapped) as view:
            for start in range(0, len(mapped), SLICE):
                with view[start:start + SLICE] as part:
                    h.update(part)
                if hasattr(mapped, "madvise"):  # not on Windows
                    mapped.madvise(mmap.MADV_DONTNEED, start, min(SLICE, len(mapped) - start))
    return h.hexdigest()


def hash_later(paths: list[Path]) -> dict[Path, Future]:
    """Futures of each file's SHA-256, computed in order by one background thread; a file this
    process hashed (or is hashing) already is not read again. A file that cannot be read gives its
    OSError from `.result()`."""
    out: dict[Path, Future] = {}
    todo: list[tuple[Path, Future]] = []
    with _lock:
        for p in paths:
            try:
                key = _key(p)
            except OSError as e:
                failed: Future = Future()
                failed.set_exception(e)
                out[p] = failed
                continue
            if key not in _memo:
                _memo[key] = Future()
                todo.append((p, _memo[key]))
            out[p] = _memo[key]
    if todo:
        # A daemon thread: a run stopped early does not wait for the hash of a file it no longer needs.
        threading.Thread(target=_work, args=(todo,), name="peftko-hash", daemon=True).start()
    return out


def _work(todo: list[tuple[Path, Future]]) -> None:
    _yield_to_compute()
    for path, future in todo:
        try:
            future.set_result(sha256_of(path))
        except BaseException as e:  # handed to whoever waits for it
            future.set_exception(e)
            with _lock:
                _memo.pop(next((k for k, f in _memo.items() if f is future), None), None)


def _yield_to_compute() -> None:
    """Lower this thread's priority (Linux only: there a thread id names the thread alone; elsewhere it
    could name another process). torch keeps one thread per core busy while a base loads or a batch
    runs; a hash competing with them at the same priority stalls their parallel regions and cost
    about twice its own CPU time in wall time (benchmarks/RESULTS.md); niced, it runs on what they leave."""
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


def file_sha256(path: Path) -> str:
    """The file's SHA-256, reusing this process's earlier hash of the unchanged file."""
    return hash_later([Path(path)])[Path(path)].result()

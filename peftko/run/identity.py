"""A run's identity: what it trains (config, corpus, tokenizer, base), as fingerprints.

`--resume` compares them with the run record (peftko.run.resume) and `peftko merge` compares
the base's with the adapter's manifest (peftko.run.manifest); a base is hashed whole; the packed-data cache keys on the
tokenizer's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from peftko.core.errors import UserError
from peftko.core.hashing import hash_later, sha256_of
from peftko.run.records import BaseFingerprint, RunIdentity


FULL = "sha256"  # BaseFingerprint.scheme of a whole-file hash; runs before it recorded sampled hashes (None)


def base_weight_files(path: Path) -> list[Path]:
    path = Path(path)
    return sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))


class PendingFingerprint:
    """A base's fingerprint being computed in the background: config.json at once, each weight
    file's SHA-256 (every byte) by peftko.core.hashing's thread, while the caller loads or merges."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config_sha256 = sha256_file(self.path / "config.json")
        self.weights = base_weight_files(self.path)
        self._futures = hash_later(self.weights)

    @property
    def names(self) -> set[str]:
        return {w.name for w in self.weights}

    def result(self) -> BaseFingerprint:
        """The fingerprint, once every weight file is hashed (waits for the thread)."""
        try:
            weights = {w.name: self._futures[w].result() for w in self.weights}
        except OSError as e:
            raise UserError(f"cannot read the base's weights in {self.path}: {e}") from None
        return BaseFingerprint(self.config_sha256, weights, FULL)


def start_fingerprint(path: Path) -> PendingFingerprint:
    return PendingFingerprint(path)


def fingerprint_base(path: Path) -> BaseFingerprint:
    """Identify a base by every byte: config.json and each weight file hashed whole, so any edit
    of a weight, wherever it is, changes it (about 0.3 s a GB, in the background where possible)."""
    return start_fingerprint(path).result()


def sampled_fingerprint(path: Path) -> BaseFingerprint:
    """The fingerprint runs recorded before whole-file hashing, to check a base against such a run:
    size, header and 64 chunks sampled across each weight file (an edit between chunks passes)."""
    path = Path(path)
    return BaseFingerprint(sha256_file(path / "config.json"),
                           {w.name: _sampled_hash(w) for w in base_weight_files(path)})


def base_differences(recorded: BaseFingerprint, current: BaseFingerprint) -> list[str]:
    """config.json and the weight files whose hashes differ, added or missing, by name."""
    old, new = recorded.weights or {}, current.weights or {}
    changed = ["config.json"] if recorded.config_sha256 != current.config_sha256 else []
    return changed + sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def sha256_file(path: Path) -> str:
    """Whole-file SHA-256, read in large chunks so a large file never sits in memory."""
    return sha256_of(path)


def _sampled_hash(path: Path, chunks: int = 64, chunk_size: int = 1 << 16) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        h.update(head)
        for i in range(chunks):
            f.seek(size * i // chunks)
            h.update(f.read(chunk_size))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [tokenizer.bos_token_id, tokenizer.eos_token_id, type(tokenizer).__name__]
    return hashlib.sha256((text + json.dumps(extra)).encode()).hexdigest()[:16]


def corpus_fingerprint(files) -> list[list]:
    """Name, size and content hash of each file, in reading order (the order packs the data).

    The whole content is hashed (about 1 s a GB): a same-length edit changes what is trained on,
    and a copy to another machine changes mtimes but not the data.
    """
    return [[Path(f.path).name, os.path.getsize(f.path), sha256_file(Path(f.path))] for f in files]


def run_identity(config: dict, files, tokenizer, base_fingerprint: BaseFingerprint, processes: int) -> RunIdentity:
    """What a run trains on: its whole resolved config, the corpus, the tokenizer and the base; and
    over how many processes (data-parallel runs resume on another count only with the same global batch)."""
    return RunIdentity(config, corpus_fingerprint(files), tokenizer_fingerprint(tokenizer), base_fingerprint,
                       processes)

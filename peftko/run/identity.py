"""A run's identity: what it trains (config, corpus, tokenizer, base), as fingerprints.

`--resume` compares them with the run record (peftko.run.resume) and `peftko merge` compares
the base's with the adapter's manifest (peftko.run.manifest); the packed-data cache keys on the
tokenizer's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from peftko.run.records import BaseFingerprint, RunIdentity


def fingerprint_base(path: Path) -> BaseFingerprint:
    """Identify a base without reading every byte of a 16 GB checkpoint.

    config.json is hashed whole; each weight file contributes its size, its header (tensor names,
    shapes, dtypes) and 64 chunks sampled across its body, so two fine-tunes of one architecture,
    which share every shape, still differ.
    """
    path = Path(path)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return BaseFingerprint(sha256_file(path / "config.json"), {w.name: _sampled_hash(w) for w in weights})


def sha256_file(path: Path) -> str:
    """Whole-file SHA-256, read in 1 MB chunks so a large file never sits in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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

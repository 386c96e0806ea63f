"""From corpus files to packed token blocks, split by whole documents, cached on disk.

The pipeline streams: documents are read file by file and line by line, written to Arrow by
`datasets`, tokenised with `Dataset.map`, and packed by a generator; the result is saved with
`save_to_disk` and memory-mapped on reuse, so a 2 GB corpus never has to fit in RAM.

The cache key covers every file's path, size and mtime, the tokenizer (markers included) and
the settings that shape blocks. If neither corpus nor tokenizer changed, a second run reuses
the blocks instead of tokenising again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peftko.errors import UserError
from peftko.fingerprints import tokenizer_fingerprint

CACHE_VERSION = "3"


@dataclass
class PackedData:
    train: "datasets.Dataset"  # noqa: F821 - columns input_ids, position_ids
    val: "datasets.Dataset | None"  # noqa: F821
    val_text: "datasets.Dataset | None"  # noqa: F821 - column text: the held-out documents
    train_docs: int
    val_docs: int
    val_chars: int
    train_tokens: int
    real_token_fraction: float
    block_len: int
    cache_dir: Path
    from_cache: bool


def cache_key(files, tokenizer, seq_len, doc_end_marker, jsonl_field, val_fraction, seed) -> str:
    stats = []
    for f in files:
        st = os.stat(f.path)
        stats.append([str(Path(f.path).resolve()), st.st_size, st.st_mtime_ns, f.encoding])
    payload = [CACHE_VERSION, stats, tokenizer_fingerprint(tokenizer), seq_len, doc_end_marker,
               jsonl_field, val_fraction, seed]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:20]


def _documents(files: list[tuple[str, str]], jsonl_field: str, doc_end_marker: str):
    from peftko.textfiles import iter_documents

    for path, encoding in files:
        for text in iter_documents(Path(path), encoding, jsonl_field, doc_end_marker):
            yield {"text": text}


def choose_val_docs(n_docs: int, val_fraction: float, seed: int) -> set[int]:
    """Whole documents, chosen by the seed; at least one when there are two or more."""
    if val_fraction <= 0 or n_docs < 2:
        return set()
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    return set(random.Random(seed).sample(range(n_docs), n_val))


def _rebase(pos: np.ndarray) -> np.ndarray:
    """A document cut at a block edge restarts at position 0 in the next block."""
    if pos.size and pos[0] != 0:
        zeros = np.flatnonzero(pos == 0)
        end = zeros[0] if zeros.size else pos.size
        pos = pos.copy()
        pos[:end] -= pos[0]
    return pos


def pack_blocks(token_ds, seq_len: int):
    """Concatenate documents and cut every seq_len tokens; only the last block is short.

    token_ds: a Dataset with an input_ids column, or any iterable of {"input_ids": [...]} batches.
    """
    token_batches = token_ds.iter(batch_size=512) if hasattr(token_ds, "iter") else token_ds
    ids_buf = np.empty(0, dtype=np.int64)
    pos_buf = np.empty(0, dtype=np.int32)
    for batch in token_batches:
        for ids in batch["input_ids"]:
            ids_buf = np.concatenate([ids_buf, np.asarray(ids, dtype=np.int64)])
            pos_buf = np.concatenate([pos_buf, np.arange(len(ids), dtype=np.int32)])
            while ids_buf.size >= seq_len:
                yield {"input_ids": ids_buf[:seq_len].tolist(), "position_ids": pos_buf[:seq_len].tolist()}
                ids_buf, pos_buf = ids_buf[seq_len:], _rebase(pos_buf[seq_len:])
    if ids_buf.size:
        yield {"input_ids": ids_buf.tolist(), "position_ids": pos_buf.tolist()}


def _tokenize_fn(tokenizer, eos_id: int):
    def tokenize(batch):
        enc = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
        ids = [e + [eos_id] if not e or e[-1] != eos_id else e for e in enc]
        return {"input_ids": ids, "chars": [len(t) for t in batch["text"]], "n_tokens": [len(i) for i in ids]}

    return tokenize


def pack_texts(texts, tokenizer, seq_len: int) -> list[dict]:
    """Blocks for a small set of documents under another tokenizer, the same way as training."""
    tokenized = _tokenize_fn(tokenizer, tokenizer.eos_token_id)({"text": list(texts)})
    return list(pack_blocks([{"input_ids": tokenized["input_ids"]}], seq_len))


def build_packed(files, tokenizer, cfg, workdir: Path) -> dict:
    """Read, split, tokenise and pack into workdir/{train,val}; returns the stats."""
    import datasets

    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise UserError("the tokenizer has no eos_token, which peftko puts between documents; "
                        "set eos_token in the model's tokenizer_config.json")
    docs = datasets.Dataset.from_generator(
        _documents,
        gen_kwargs={"files": [(str(f.path), f.encoding) for f in files],
                    "jsonl_field": cfg.jsonl_field, "doc_end_marker": cfg.doc_end_marker},
        cache_dir=str(workdir / "raw"),
        features=datasets.Features({"text": datasets.Value("string")}),
    )
    if len(docs) == 0:
        raise UserError("the corpus holds no text: every file is empty")
    tokens = docs.map(_tokenize_fn(tokenizer, eos_id), batched=True, remove_columns=["text"],
                      num_proc=cfg.num_proc if cfg.num_proc > 1 else None, desc="tokenising")
    val_ids = choose_val_docs(len(tokens), cfg.val_fraction, cfg.seed)
    if val_ids:  # the held-out texts, for measuring the untouched base with its own tokenizer
        docs.select(sorted(val_ids)).save_to_disk(str(workdir / "val_text"))
    train_tok = tokens.select([i for i in range(len(tokens)) if i not in val_ids])
    val_tok = tokens.select(sorted(val_ids))
    train_tokens = int(sum(train_tok["n_tokens"]))
    stats = {"train_docs": len(train_tok), "val_docs": len(val_tok),
             "val_chars": int(sum(val_tok["chars"])) if len(val_tok) else 0,
             "train_tokens": train_tokens, "block_len": even_block_len(train_tokens, cfg.seq_len)}
    for name, part in (("train", train_tok), ("val", val_tok)):
        if len(part) == 0:
            continue
        block_len = stats["block_len"] if name == "train" else cfg.seq_len
        blocks = datasets.Dataset.from_generator(
            pack_blocks, gen_kwargs={"token_ds": part, "seq_len": block_len},
            cache_dir=str(workdir / f"raw-{name}"),
        )
        blocks.save_to_disk(str(workdir / name))
    return stats


def even_block_len(total_tokens: int, seq_len: int) -> int:
    """The block length, at most seq_len, that splits the stream into equal blocks.

    Cutting at exactly seq_len leaves one short last block, padded in its batch: on a small corpus
    that is over 1% padding. The same number of blocks, each a few tokens shorter, leaves at most
    one token of padding per block.
    """
    blocks = max(1, math.ceil(total_tokens / seq_len))
    return max(1, math.ceil(total_tokens / blocks))


def prepare_data(files, tokenizer, cfg, cache_root: Path) -> PackedData:
    """Packed train/val blocks for this corpus and tokenizer, from the cache when possible."""
    import datasets

    datasets.disable_progress_bars()  # peftko prints one summary line instead
    key = cache_key(files, tokenizer, cfg.seq_len, cfg.doc_end_marker, cfg.jsonl_field,
                    cfg.val_fraction, cfg.seed)
    target = cache_root / key
    from_cache = (target / "stats.json").exists()
    if not from_cache:
        cache_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_root))
        try:
            stats = build_packed(files, tokenizer, cfg, work)
            (work / "stats.json").write_text(json.dumps(stats))
            for scratch in work.glob("raw*"):
                shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    stats = json.loads((target / "stats.json").read_text())
    train = datasets.load_from_disk(str(target / "train"))
    val = datasets.load_from_disk(str(target / "val")) if (target / "val").exists() else None
    val_text = datasets.load_from_disk(str(target / "val_text")) if (target / "val_text").exists() else None
    total = stats["train_tokens"]
    fraction = total / (len(train) * stats["block_len"])  # every batch pads to the longest block
    return PackedData(train, val, val_text, stats["train_docs"], stats["val_docs"], stats["val_chars"],
                      total, fraction, stats["block_len"], target, from_cache)

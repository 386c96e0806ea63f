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
import socket
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError

from peftko.core.atomic import process_alive, replace_dir, staging_dir
from peftko.core.config import BlockSettings
from peftko.core.errors import UserError
from peftko.core.progress import Tracker, phase
from peftko.corpus.documents import MAX_DOC_CHARS, iter_located_documents
from peftko.run.identity import tokenizer_fingerprint

CACHE_VERSION = "5"  # 5: the held-out documents' names and each part's characters and tokens in stats.json
# Characters handed to the tokenizer in one call: a fast tokenizer holds some 100-350 bytes per
# character while it works, so this, not the corpus, sets the peak (see benchmarks/RESULTS.md).
TOKENIZE_BATCH_CHARS = 1 << 18
# Rows the Arrow writers buffer before flushing (datasets' default is 1000, which for 256k-character
# documents and their tokens held ~250 MiB). A document or token row holds up to MAX_DOC_CHARS'
# worth; a block row seq_len tokens.
DOC_WRITER_ROWS = 16
WRITER_BATCH_ROWS = 64
# A build happens in CACHE/.build-HOST-PID-RANDOM and is renamed into place when complete. The host
# and pid say whose it is: one left by a process that no longer runs is removed by the next run.
BUILD_PREFIX = ".build-"


@dataclass
class PackedData:
    train: "datasets.Dataset"  # noqa: F821 - columns input_ids, position_ids
    val: "datasets.Dataset | None"  # noqa: F821
    val_text: "datasets.Dataset | None"  # noqa: F821 - column text: the held-out documents
    train_docs: int
    val_docs: int
    train_chars: int
    val_chars: int
    train_tokens: int
    val_tokens: int
    held_out: list[str]  # the held-out documents as FILE:LINE (the line the document starts on)
    real_token_fraction: float
    block_len: int
    cache_dir: Path
    from_cache: bool


def real_token_fraction(tokens: int, blocks: int, block_len: int) -> float:
    """Share of the padded batch positions that hold real tokens (every batch pads to block_len)."""
    return tokens / (blocks * block_len) if blocks else 0.0


def cache_key(files, tokenizer, seq_len, doc_end_marker, jsonl_field, val_fraction, seed) -> str:
    stats = []
    for f in files:
        st = os.stat(f.path)
        stats.append([str(Path(f.path).resolve()), st.st_size, st.st_mtime_ns, f.encoding])
    payload = [CACHE_VERSION, stats, tokenizer_fingerprint(tokenizer), seq_len, doc_end_marker,
               jsonl_field, val_fraction, seed]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:20]


def _documents(files: list[tuple[str, str, str]], jsonl_field: str, doc_end_marker: str):
    """Each document's text, and where it starts (NAME:LINE), which names it when it is held out."""
    for path, encoding, name in files:
        try:
            for doc in iter_located_documents(Path(path), encoding, jsonl_field, doc_end_marker, MAX_DOC_CHARS):
                yield {"text": doc.text, "source": f"{name}:{doc.line}"}
        except OSError as e:  # scanned a moment ago, so it was moved or changed since
            raise UserError(f"cannot read {path}: {e.strerror or e}; did it change?") from None


def short_names(files) -> list[str]:
    """Each file's path below the folder that holds them all: what names a document in the log and
    peftko.json without this machine's directories."""
    paths = [Path(f.path).resolve() for f in files]
    root = os.path.commonpath([str(p.parent) for p in paths])
    return [os.path.relpath(p, root) for p in paths]


def choose_val_docs(n_docs: int, val_fraction: float, seed: int) -> set[int]:
    """Whole documents, chosen by the seed; at least one when there are two or more."""
    if val_fraction <= 0 or n_docs < 2:
        return set()
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    return set(random.Random(seed).sample(range(n_docs), n_val))


def pack_blocks(token_ds, seq_len: int):
    """Concatenate documents and cut every seq_len tokens; only the last block is short.

    Positions count from 0 at each document start and again at each block start (a document cut at
    a block edge goes on at 0 in the next block). Each token is copied once into a block buffer, so
    time is linear in the corpus however long its documents are.

    token_ds: a Dataset with an input_ids column, or any iterable of {"input_ids": [...]} batches.
    """
    for block in _packed_arrays(token_ds, seq_len):
        yield {name: values.tolist() for name, values in block.items()}


def _packed_arrays(token_ds, seq_len: int):
    """pack_blocks as numpy arrays, which datasets writes to Arrow without a Python loop."""
    ids_block = np.empty(seq_len, dtype=np.int64)
    pos_block = np.empty(seq_len, dtype=np.int64)
    counting = np.arange(seq_len, dtype=np.int64)
    fill = 0
    for ids in _token_rows(token_ds):
        start = 0
        while start < ids.size:
            take = min(seq_len - fill, ids.size - start)
            ids_block[fill : fill + take] = ids[start : start + take]
            pos_block[fill : fill + take] = counting[:take]
            fill, start = fill + take, start + take
            if fill == seq_len:
                yield {"input_ids": ids_block.copy(), "position_ids": pos_block.copy()}
                fill = 0
    if fill:
        yield {"input_ids": ids_block[:fill].copy(), "position_ids": pos_block[:fill].copy()}


def _token_rows(token_ds):
    """Each document's ids as an int64 array. A Dataset is read as Arrow, a few rows at a time and
    without copying to Python lists, so a long document costs its size once, not ~5x."""
    if not hasattr(token_ds, "with_format"):
        for batch in token_ds:
            for ids in batch["input_ids"]:
                yield np.asarray(ids, dtype=np.int64)
        return
    for table in token_ds.with_format("arrow", columns=["input_ids"]).iter(batch_size=DOC_WRITER_ROWS):
        column = table.column("input_ids").combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        for k in range(len(column)):
            yield values[offsets[k] : offsets[k + 1]]


def _tokenize_fn(tokenizer, eos_id: int):
    def tokenize(batch):
        enc = tokenizer(batch["text"], add_special_tokens=True, return_attention_mask=False)["input_ids"]
        ids = [e + [eos_id] if not e or e[-1] != eos_id else e for e in enc]
        return {"input_ids": ids, "chars": [len(t) for t in batch["text"]], "n_tokens": [len(i) for i in ids]}

    return tokenize


def _token_features():
    return datasets.Features({"input_ids": datasets.List(datasets.Value("int64")),
                              "chars": datasets.Value("int64"), "n_tokens": datasets.Value("int64")})


def _block_features():
    # Stated, not inferred: inference walks every token in Python (most of the packing time).
    return datasets.Features({"input_ids": datasets.List(datasets.Value("int64")),
                              "position_ids": datasets.List(datasets.Value("int64"))})


def _shards(n_docs: int, num_proc: int) -> list[tuple[int, int]]:
    """Contiguous document ranges, in order: at least one per process."""
    n = max(1, min(n_docs, num_proc * 4 if num_proc > 1 else 1))
    bounds = [round(i * n_docs / n) for i in range(n + 1)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def _tokenized(shards: list[tuple[int, int]], docs, tokenizer, eos_id: int, progress: Tracker):
    """Token rows of docs[lo:hi] for each shard, in order. Documents go to the tokenizer in groups
    of at most TOKENIZE_BATCH_CHARS characters (a longer one alone), so its memory stays bounded
    whatever the documents' lengths."""
    tokenize = _tokenize_fn(tokenizer, eos_id)
    for lo, hi in shards:
        texts = docs.select(range(lo, hi)).with_format("arrow").iter(batch_size=DOC_WRITER_ROWS)
        for group in _char_groups(v.as_py() for table in texts for v in table.column("text")):
            out = tokenize({"text": group})
            for ids, chars, n in zip(out["input_ids"], out["chars"], out["n_tokens"]):
                yield {"input_ids": np.asarray(ids, dtype=np.int64), "chars": chars, "n_tokens": n}
            progress.advance(len(group))  # in this process only: workers of num_proc > 1 report nothing


def _char_groups(texts, budget: int | None = None):
    budget = budget or TOKENIZE_BATCH_CHARS
    group: list[str] = []
    size = 0
    for text in texts:
        if group and size + len(text) > budget:
            yield group
            group, size = [], 0
        group.append(text)
        size += len(text)
    if group:
        yield group


def pack_texts(texts, tokenizer, seq_len: int) -> list[dict]:
    """Blocks for a small set of documents under another tokenizer, the same way as training."""
    tokenized = _tokenize_fn(tokenizer, tokenizer.eos_token_id)({"text": list(texts)})
    return list(pack_blocks([{"input_ids": tokenized["input_ids"]}], seq_len))


def build_packed(files, tokenizer, blocks: BlockSettings, workdir: Path) -> dict:
    """Read, split, tokenise and pack into workdir/{train,val}; returns the stats."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise UserError("the tokenizer has no eos_token, which peftko puts between documents; "
                        "set eos_token in the model's tokenizer_config.json")
    docs = _from_generator(
        _documents,
        gen_kwargs={"files": [(str(f.path), f.encoding, name) for f, name in zip(files, short_names(files))],
                    "jsonl_field": blocks.jsonl_field, "doc_end_marker": blocks.doc_end_marker},
        cache_dir=str(workdir / "raw"),
        features=datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string")}),
        writer_batch_size=DOC_WRITER_ROWS,
    )
    if len(docs) == 0:
        raise UserError("the corpus holds no text: every file is empty")
    shards = _shards(len(docs), blocks.num_proc)
    with phase("tokenise", len(docs), "documents") as progress:
        tokens = _from_generator(
            _tokenized,
            gen_kwargs={"shards": shards, "docs": docs, "tokenizer": tokenizer, "eos_id": eos_id, "progress": progress},
            cache_dir=str(workdir / "raw-tokens"),
            features=_token_features(),
            writer_batch_size=DOC_WRITER_ROWS,
            num_proc=min(blocks.num_proc, len(shards)) if blocks.num_proc > 1 else None,
        )
    val_ids = choose_val_docs(len(tokens), blocks.val_fraction, blocks.seed)
    if val_ids:  # the held-out texts, for measuring the untouched base with its own tokenizer
        docs.select(sorted(val_ids)).save_to_disk(str(workdir / "val_text"))
    train_tok = tokens.select([i for i in range(len(tokens)) if i not in val_ids])
    val_tok = tokens.select(sorted(val_ids))
    train_tokens = int(sum(train_tok["n_tokens"]))
    stats = {"train_docs": len(train_tok), "val_docs": len(val_tok),
             "train_chars": int(sum(train_tok["chars"])), "val_chars": int(sum(val_tok["chars"])),
             "train_tokens": train_tokens, "val_tokens": int(sum(val_tok["n_tokens"])),
             "held_out": list(docs.select(sorted(val_ids))["source"]),
             "block_len": even_block_len(train_tokens, blocks.seq_len)}
    for name, part in (("train", train_tok), ("val", val_tok)):
        if len(part) == 0:
            continue
        block_len = stats["block_len"] if name == "train" else blocks.seq_len
        packed = _from_generator(
            _packed_arrays, gen_kwargs={"token_ds": part, "seq_len": block_len},
            cache_dir=str(workdir / f"raw-{name}"), features=_block_features(),
            writer_batch_size=WRITER_BATCH_ROWS,
        )
        packed.save_to_disk(str(workdir / name))
    return stats


def _from_generator(generator, cache_dir: str, **kwargs):
    """Dataset.from_generator, with a UserError raised inside the generator passed on as itself
    (datasets wraps every error in DatasetGenerationError, which would show as a traceback).

    The fingerprint is named from cache_dir, a fresh folder of this build: without one, datasets
    hashes gen_kwargs with dill to name its cache, tokenizer included, which took 8 s a call for
    Gemma's 262k-token vocabulary (24 s of a run); peftko's own cache key already says what the
    build depends on.
    """
    fingerprint = hashlib.sha256(str(cache_dir).encode()).hexdigest()[:32]
    try:
        return datasets.Dataset.from_generator(generator, cache_dir=cache_dir, fingerprint=fingerprint, **kwargs)
    except DatasetGenerationError as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def even_block_len(total_tokens: int, seq_len: int) -> int:
    """The block length, at most seq_len, that splits the stream into equal blocks.

    Cutting at exactly seq_len leaves one short last block, padded in its batch: on a small corpus
    that is over 1% padding. The same number of blocks, each a few tokens shorter, leaves at most
    one token of padding per block.
    """
    blocks = max(1, math.ceil(total_tokens / seq_len))
    return max(1, math.ceil(total_tokens / blocks))


def prepare_data(files, tokenizer, blocks: BlockSettings, cache_root: Path) -> PackedData:
    """Packed train/val blocks for this corpus and tokenizer, from the cache when possible."""
    datasets.disable_progress_bars()  # peftko prints one summary line instead
    key = cache_key(files, tokenizer, blocks.seq_len, blocks.doc_end_marker, blocks.jsonl_field,
                    blocks.val_fraction, blocks.seed)
    target = cache_root / key
    stats = _cached_stats(target)
    from_cache = stats is not None
    if not from_cache:
        cache_root.mkdir(parents=True, exist_ok=True)
        remove_stale_builds(cache_root)
        # Every file datasets writes for the build (Arrow shards, map caches, index mappings, lock
        # files) goes under cache_dir, i.e. inside `work`; nothing lands in ~/.cache or /tmp.
        with staging_dir(cache_root, _build_prefix()) as work:
            stats = build_packed(files, tokenizer, blocks, work)
            (work / "stats.json").write_text(json.dumps(stats))
            for scratch in work.glob("raw*"):
                shutil.rmtree(scratch, ignore_errors=True)
            # A build of the same key by another process is replaced whole; a replaced folder
            # left by a kill is named like a build, so the next run removes it.
            replace_dir(work, target, _build_prefix())
    stats = json.loads((target / "stats.json").read_text())  # as just written
    train = datasets.load_from_disk(str(target / "train"))
    val = datasets.load_from_disk(str(target / "val")) if (target / "val").exists() else None
    val_text = datasets.load_from_disk(str(target / "val_text")) if (target / "val_text").exists() else None
    fraction = real_token_fraction(stats["train_tokens"], len(train), stats["block_len"])
    return PackedData(train, val, val_text, stats["train_docs"], stats["val_docs"], stats["train_chars"],
                      stats["val_chars"], stats["train_tokens"], stats["val_tokens"], stats["held_out"], fraction,
                      stats["block_len"], target, from_cache)


def _cached_stats(target: Path) -> dict | None:
    """The stats of a finished build of this key, or None (none yet, or its stats.json is damaged:
    then it is built again and replaced)."""
    try:
        stats = json.loads((target / "stats.json").read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def _build_prefix(pid: int | None = None) -> str:
    return f"{BUILD_PREFIX}{socket.gethostname()}-{pid or os.getpid()}-"


def remove_stale_builds(cache_root: Path) -> list[Path]:
    """Remove build folders whose process is gone (killed mid-build); return what was removed.

    Only folders named by this host's builds are judged: a folder of another host sharing the cache
    (NFS) or of a process that still runs is left alone, and so is anything not named like a build.
    """
    removed = []
    host_prefix = f"{BUILD_PREFIX}{socket.gethostname()}-"
    for folder in cache_root.glob(f"{BUILD_PREFIX}*"):
        rest = folder.name[len(host_prefix):] if folder.name.startswith(host_prefix) else ""
        pid = rest.split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed

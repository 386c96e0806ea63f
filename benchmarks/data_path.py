#!/usr/bin/env python
"""Speed and memory of the whole data path, corpus file -> packed token blocks, against corpus size.

    python benchmarks/data_path.py                         # 1, 10, 100 MB; lines and one-line
    python benchmarks/data_path.py --sizes 1 10 --shapes one-line

What is timed is what `peftko lora-train` does before the model loads, in the same order: the
corpus scan (encoding detection, character count, marker lint: `scan_corpus`), then
`prepare_data` (split into documents, tokenise, hold out, pack, save; the cache starts empty).
The tokenizer is the built-in demo's (a byte-level BPE trained on the bundled stories, see
peftko/model/tiny_base.py), with the markers the scan found registered, as training registers them.

Each (size, shape) runs in a fresh process (this script with --child), so its peaks belong to that
size alone. Two peaks are reported:
  peak RSS   `resource.getrusage` high-water mark. It includes pages of the memory-mapped Arrow
             files that were read (clean page cache, given back under pressure), so it grows with
             the corpus even when the process holds nothing more.
  peak anon  the largest RssAnon in /proc/self/status, sampled every 20 ms: memory the process
             itself allocated (Python objects, tokenizer buffers). This is the figure that must
             not grow with the corpus. `base` is its value before the scan (imports, tokenizer).
MiB/s is given for wall time and for CPU time (all threads of the process): the machine is shared,
so wall time depends on the load (printed with each run), CPU time much less.

Corpora are generated from the bundled Korean stories (peftko/sample_corpus), markers included:
  lines     books of lines as written (|START_OF_BOOK|> ... |END_OF_BOOK|>, a line per paragraph)
  one-line  the same text with every line break turned into a space and no |END_OF_BOOK|>: the
            file is one line and one document, the worst case for reading and packing
Lines are drawn at random from all stories and one word in ten is replaced by a made-up Hangul
word, so the corpus is not the same 100 kB repeated (the tokenizer caches words it has seen).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

MIB = 1 << 20


def generate(path: Path, size_mb: float, shape: str, seed: int = 0) -> Path:
    """Write a corpus of about size_mb MiB of UTF-8 Korean text with markers."""
    from peftko.core.paths import sample_corpus_dir

    rng = random.Random(seed)
    stories = [p.read_text(encoding="utf-8") for p in sorted(sample_corpus_dir().glob("*.txt"))]
    body = [ln for s in stories for ln in s.splitlines() if ln.strip() and "_OF_BOOK|>" not in ln]
    target = int(size_mb * MIB)
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            lines = [_vary(rng.choice(body), rng) for _ in range(rng.randint(20, 80))]
            if shape == "lines":
                text = "|START_OF_BOOK|>\n" + "\n".join(lines) + "\n|END_OF_BOOK|>\n"
            else:
                text = " ".join(lines) + " "
            f.write(text)
            written += len(text.encode("utf-8"))
    return path


def _vary(line: str, rng: random.Random) -> str:
    words = line.split(" ")
    for i, word in enumerate(words):
        if rng.random() < 0.1 and re.fullmatch("[가-힣]+", word):
            words[i] = "".join(chr(rng.randint(0xAC00, 0xD7A3)) for _ in range(len(word)))
    return " ".join(words)


def _rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _AnonPeak:
    """Samples RssAnon in a thread; peak is the largest value seen."""

    def __init__(self):
        import threading

        self.peak = _rss_anon_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_anon_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_anon_mib())


def child(path: Path) -> dict:
    """Scan + prepare_data on one corpus file; run in a fresh process."""
    import resource

    from peftko.core.config import DEFAULT_MARKER_PATTERN, TrainConfig
    from peftko.corpus.scan import scan_corpus
    from peftko.data.packing import prepare_data
    from peftko.model.tiny_base import sample_texts, train_tokenizer
    from peftko.model.token_rows import register_markers

    tokenizer = train_tokenizer(sample_texts())
    cfg = TrainConfig(data=[str(path)], seq_len=2048)  # what auto gives a base with a 2k+ context
    base_anon = _rss_anon_mib()
    anon = _AnonPeak()
    load = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    report = scan_corpus([path], DEFAULT_MARKER_PATTERN, cfg.jsonl_field, doc_end_marker=cfg.doc_end_marker)
    t1 = time.perf_counter()
    register_markers(tokenizer, sorted(report.marker_counts))
    files = [f for f in report.files if f.status == "ok"]
    with tempfile.TemporaryDirectory() as cache:
        data = prepare_data(files, tokenizer, cfg.blocks(), Path(cache))
        blocks = len(data.train)
    t2, c2 = time.perf_counter(), time.process_time()
    peak_anon = anon.stop()
    tok_cpu_mib_per_s = _tokenizer_alone(tokenizer, path)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mb = path.stat().st_size / MIB
    return {
        "mib": round(mb, 1), "load": round(load, 1), "scan_s": round(t1 - t0, 2), "prepare_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2), "cpu_s": round(c2 - c0, 2), "mib_per_s": round(mb / (t2 - t0), 2),
        "cpu_mib_per_s": round(mb / (c2 - c0), 2), "tokenizer_cpu_mib_per_s": tok_cpu_mib_per_s, "peak_rss_mib": round(peak_kib / 1024),
        "base_anon_mib": round(base_anon), "peak_anon_mib": round(peak_anon),
        "docs": data.train_docs + data.val_docs, "train_tokens": data.train_tokens, "blocks": blocks,
        "seq_len": cfg.seq_len,
    }


def _tokenizer_alone(tokenizer, path: Path, mib: float = 2.0) -> float:
    """CPU MiB/s of the tokenizer by itself on the first `mib` MiB of the corpus, in the same
    groups prepare_data hands it: the ceiling for the whole path."""
    from peftko.data.packing import TOKENIZE_BATCH_CHARS

    with path.open(encoding="utf-8") as f:
        text = f.read(int(mib * MIB / 3))  # Hangul is 3 bytes in UTF-8
    size = len(text.encode("utf-8")) / MIB
    groups = [text[i : i + TOKENIZE_BATCH_CHARS] for i in range(0, len(text), TOKENIZE_BATCH_CHARS)]
    c0 = time.process_time()
    for group in groups:
        tokenizer([group], add_special_tokens=True, return_attention_mask=False, verbose=False)
    return round(size / (time.process_time() - c0), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 100], help="corpus sizes in MiB")
    parser.add_argument("--shapes", nargs="+", default=["lines", "one-line"], choices=["lines", "one-line"])
    parser.add_argument("--workdir", type=Path, default=None, help="where corpora are written (default: a temp dir)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)), flush=True)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="peftko-datapath-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PEFTKO_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for shape in args.shapes:
        for size in args.sizes:
            corpus = generate(work / f"{shape}-{size:g}mb.txt", size, shape)
            out = subprocess.run([sys.executable, __file__, "--child", str(corpus)], env=env,
                                 capture_output=True, text=True, check=True)
            row = {"shape": shape, **json.loads(out.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            rows.append(row)
            corpus.unlink()
    print(f"\npython {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| shape | MiB | load | scan s | prepare s | total s | MiB/s wall | CPU s | MiB/s CPU "
          "| tokenizer alone MiB/s CPU | peak RSS MiB | anon base -> peak MiB | docs | train tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['mib']} | {r['load']} | {r['scan_s']} | {r['prepare_s']} | {r['total_s']} "
              f"| {r['mib_per_s']} | {r['cpu_s']} | {r['cpu_mib_per_s']} | {r['tokenizer_cpu_mib_per_s']} | {r['peak_rss_mib']} "
              f"| {r['base_anon_mib']} -> {r['peak_anon_mib']} | {r['docs']:,} | {r['train_tokens']:,} |")


if __name__ == "__main__":
    main()

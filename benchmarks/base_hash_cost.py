#!/usr/bin/env python
"""What hashing every byte of the base costs: training's load and `peftko merge`, on the real base.

    PEFTKO_HOME=/tmp/bench-home python benchmarks/base_hash_cost.py --reps 3

The base is builtin:gemma-3-270m (built into $PEFTKO_HOME first if needed: about a minute). In one
process, alternating, each repetition times:
  load, sampled     what training did before: the sampled fingerprint (64 chunks of 64 KB a weight
                    file), then the base loaded as lora-train loads it (peftko.model.builder.load).
  load, whole       what it does now: the built base checked against its record at once (sizes,
                    headers) and every file hashed in the background (peftko.model.built_base), the
                    run's fingerprint started (reusing those hashes), the base loaded, the hashes
                    compared with the record (confirm), the fingerprint awaited.
  load, whole, local the same for a base that is a plain folder (no build record): the hash runs
                    in the background while the base loads.
  until step 1, sampled / whole
                    `peftko lora-train` from the command's start until its first training step (the
                    base checked, the corpus read, tokenizer, data, the base loaded and measured, the
                    markers' bits per character): training's whole load phase, with the old sampled
                    fingerprint and no built-base hash, and as it is now.
  merge, sampled    `peftko merge` of a one-step adapter with the old base check (sampled).
  merge, whole      `peftko merge` as it is now: every byte hashed while the merge streams.
The per-process hash memo is cleared before each timing, so each one hashes afresh. Every file is
in the page cache (read once before timing), so the numbers are CPU cost, not disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def clear_memo() -> None:
    from peftko.core import hashing

    with hashing._lock:
        hashing._memo.clear()


def timed(fn) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads)."""
    clear_memo()
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--quant", default="4bit", help="as lora-train loads the base (default 4bit)")
    ap.add_argument("--only", default="", help="time only the cases whose name contains this (e.g. 'until step')")
    args = ap.parse_args()

    import torch
    from click.testing import CliRunner

    from peftko.cli import main as cli
    from peftko.core.config import TrainConfig
    from peftko.model import gemma_base
    from peftko.model.base import pick_precision
    from peftko.model.builder import load
    from peftko.model.built_base import confirm
    from peftko.run import manifest
    from peftko.run.identity import sampled_fingerprint, start_fingerprint

    torch.set_num_threads(os.cpu_count() or 1)
    base = gemma_base.gemma_base()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hash-cost-"))
    local = work / "local-base"
    if not local.exists():
        shutil.copytree(base, local, ignore=shutil.ignore_patterns("peftko-built.json"))
    for f in [*base.iterdir(), *local.iterdir()]:  # into the page cache
        f.read_bytes()
    precision = pick_precision("cpu")
    loading = dataclasses.replace(TrainConfig().base_loading(), quant=args.quant)

    def load_sampled():
        sampled_fingerprint(base)
        load(base, loading, precision)

    def load_whole():
        path = gemma_base.gemma_base()
        pending = start_fingerprint(path)
        load(path, loading, precision)
        confirm(path)
        pending.result()

    def load_local():
        pending = start_fingerprint(local)
        load(local, loading, precision)
        pending.result()

    run = work / "run"
    corpus = ROOT / "tests" / "fixtures" / "short_books"
    if not (run / "peftko.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        r = CliRunner().invoke(cli, ["lora-train", "--model", "builtin:gemma-3-270m", "--data", str(corpus),
                                     "--output", str(run), "--seq-len", "64", "--batch-size", "1", "--max-steps",
                                     "1", "--eval-steps", "0", "--device", "cpu", "--quant", args.quant])
        assert r.exit_code == 0, r.output

    class SampledCheck:  # the check before whole-file hashing: sampled, synchronous
        def __init__(self, path):
            self.config_sha256 = sampled_fingerprint(path).config_sha256
            self.names = set(manifest.read_manifest(run).base_fingerprint.weights)

        def result(self):
            return manifest.read_manifest(run).base_fingerprint

    real_start = manifest.start_fingerprint

    def merge(mode):
        out = work / f"merged-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        manifest.start_fingerprint = SampledCheck if mode == "sampled" else real_start
        try:
            r = CliRunner().invoke(cli, ["merge", str(run), "--output", str(out)])
            assert r.exit_code == 0, r.output
        finally:
            manifest.start_fingerprint = real_start
            shutil.rmtree(out, ignore_errors=True)

    from peftko.model import built_base
    from peftko.train import session

    class ReachedStep(Exception):
        pass

    class SampledPending:  # the fingerprint before whole hashing, computed when asked for
        def __init__(self, path):
            self._fingerprint = sampled_fingerprint(path)

        def result(self):
            return self._fingerprint

    def until_first_step(mode):
        patches = [(session, "train", lambda *a, **k: (_ for _ in ()).throw(ReachedStep()))]
        if mode == "sampled":  # no built-base hash, the sampled fingerprint
            patches += [(session, "start_fingerprint", SampledPending),
                        (built_base, "quick_damage", lambda folder: None if built_base.recorded_files(folder) else "?"),
                        (built_base, "_hash_damage", lambda folder: None),
                        (built_base, "hash_later", lambda paths: {})]
        saved = [(m, n, getattr(m, n)) for m, n, _ in patches]
        for m, n, v in patches:
            setattr(m, n, v)
        try:
            r = CliRunner().invoke(cli, ["lora-train", "--model", "builtin:gemma-3-270m", "--data", str(corpus),
                                         "--output", str(work / "until-step"), "--seq-len", "64", "--batch-size",
                                         "1", "--max-steps", "1", "--eval-steps", "0", "--device", "cpu", "--quant",
                                         args.quant, "--force"])
            assert isinstance(r.exception, ReachedStep), r.output
        finally:
            for m, n, v in saved:
                setattr(m, n, v)

    def hash_alone():
        pending = start_fingerprint(base)
        pending.result()

    cases = {"hash alone (every weight byte)": hash_alone, "load, sampled": load_sampled, "load, whole (built base)": load_whole,
             "load, whole (local folder)": load_local,
             "until step 1, sampled": lambda: until_first_step("sampled"),
             "until step 1, whole": lambda: until_first_step("whole"),
             "merge, sampled": lambda: merge("sampled"), "merge, whole": lambda: merge("whole")}
    cases = {k: fn for k, fn in cases.items() if args.only in k}
    times = {k: [] for k in cases}
    for k, fn in cases.items():  # one warm-up each, not counted
        fn()
    for _ in range(args.reps):
        for k, fn in cases.items():
            times[k].append(timed(fn))
    size = sum(f.stat().st_size for f in base.iterdir())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; base {base} "
          f"({size / 1e6:.0f} MB); quant {args.quant}; {args.reps} repetitions after one warm-up")
    print("| case | wall, median s | wall, min s | wall, runs (s) | CPU, median s |")
    print("|---|---:|---:|---|---:|")
    for k, v in times.items():
        wall, cpu = [w for w, _ in v], [c for _, c in v]
        print(f"| {k} | {statistics.median(wall):.2f} | {min(wall):.2f} | {', '.join(f'{x:.2f}' for x in wall)} "
              f"| {statistics.median(cpu):.2f} |")
    for a, b in (("load, sampled", "load, whole (built base)"), ("load, sampled", "load, whole (local folder)"),
                 ("until step 1, sampled", "until step 1, whole"), ("merge, sampled", "merge, whole")):
        if not (times.get(a) and times.get(b)):
            continue
        for i, what in ((0, "wall"), (1, "CPU")):
            ma, mb = (statistics.median(x[i] for x in times[k]) for k in (a, b))
            na, nb = (min(x[i] for x in times[k]) for k in (a, b))
            # Each repetition times a and b one after the other: their difference cancels the machine's slow drift.
            paired = statistics.median(100 * (y[i] - x[i]) / x[i] for x, y in zip(times[a], times[b]))
            print(f"{b} vs {a}, {what}: median {100 * (mb - ma) / ma:+.1f} %, min {100 * (nb - na) / na:+.1f} %, "
                  f"paired median {paired:+.1f} %")


if __name__ == "__main__":
    main()

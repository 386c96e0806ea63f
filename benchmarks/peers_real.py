#!/usr/bin/env python
"""peftko beside the peers' recipes for new marker tokens, on the same real weights (issue 33, item 5).

    python benchmarks/peers_real.py                      # all four on builtin:gemma-3-270m, 40 steps
    python benchmarks/peers_real.py --max-steps 2 --samples 1 --max-new-tokens 20   # a quick check
    python benchmarks/peers_real.py --recipe unsloth --out DIR                     # one recipe alone

The demo's recipe for all four (configs/demo.yaml): the bundled sample corpus, the same 13 training
books and 2 held-out books (HELD_OUT: what the demo's split chose), the base in 4-bit NF4 on the CPU
computing in float32, seq_len 256, batch 2, 40 steps, lr 1e-3, warmup 5%, cosine, LoRA r16/alpha 32
on all linear layers, seed 42.

  peftko       `peftko lora-train --config configs/demo.yaml` (its marker rows at embedding_lr 5e-4),
               with --no-keep-best so that it, like the peers, is measured at its last step, and
               --logging-steps 1 for the step times; then `peftko merge`.
  peft-tokens  PEFT's trainable_token_indices on a resized embedding (PEFT, TRL, Axolotl);
  unsloth      Unsloth's advice: the whole embedding and lm_head trained, their lr a tenth;
  as-text      the markers left as text, plain LoRA.
The three peers are benchmarks/peer_recipes.py: plain transformers + PEFT, written from the peers'
documentation, which never imports peftko. Each peer's adapter is merged into the float32 base by
PEFT's merge_and_unload.

Each recipe runs in its own process (this script with --recipe), which trains in a child process,
merges in a second one, then measures the merged model, the same way for all four, with peftko's
measuring code (not its training code): bits per character of the held-out books, whole and story
text (peftko.evaluate.scoring: the markers' characters and tokens left out of the story text), in
float32 windows of 256 tokens; the structure of --samples books sampled from `|START_OF_BOOK|>`
(temperature 0.8, top-p 0.95, seed 42, --max-new-tokens, --structure free: the model is measured,
not peftko's processor), scored by peftko.evaluate.structure.structure_ok (pairs closed, ends with
the book end) and whole markers only. Also: the adapter's size on disk (the adapter folder, all its
files), the median seconds per training step (the first two left out), the training child's peak RSS.

Output: one JSON line per recipe, a markdown table, and one JSON line with everything at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

CORPUS = ROOT / "peftko" / "sample_corpus"
CONFIG = ROOT / "configs" / "demo.yaml"
PEERS = Path(__file__).resolve().parent / "peer_recipes.py"
# The demo's split (val_fraction 0.1, seed 42: peftko.data.packing.choose_val_docs over the 15 books in
# name order), as its peftko.json records it; tests/test_peers_benchmark.py checks they agree.
HELD_OUT = ("02_grandmothers_kitchen.txt", "11_new_baby_sister.txt")
RECIPES = ("peftko", "peft-tokens", "unsloth", "as-text")
PROMPT = "|START_OF_BOOK|>"
WARMUP_STEPS = 2  # left out of the median step: optimizer state creation, first-call overheads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:gemma-3-270m", help="the base, as lora-train --model takes it")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--recipe", choices=RECIPES, help="run this one recipe in this process (with --out)")
    p.add_argument("--out", help="--recipe: its folder; otherwise keep every recipe's folder here (default: "
                   "a temporary folder, removed at the end)")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--samples", type=int, default=8, help="books sampled for the structure score")
    p.add_argument("--max-new-tokens", type=int, default=300)
    args = p.parse_args(argv)
    args.recipe_list = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not args.recipe_list or any(r not in RECIPES for r in args.recipe_list):
        p.error(f"--recipes: choose from {', '.join(RECIPES)} (got {args.recipes!r})")
    if args.recipe and not args.out:
        p.error("--recipe needs --out DIR")
    return args


def training_files() -> list[Path]:
    return [f for f in sorted(CORPUS.glob("*.txt")) if f.name not in HELD_OUT]


def run(cmd: list[str], log: Path) -> None:
    """A child process, its output to a file; a failure ends this recipe with the log's tail."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        rc = subprocess.run(cmd, check=False, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    if rc != 0:
        raise SystemExit(f"{cmd[1:4]} failed (exit {rc}); its output:\n{log.read_text()[-6000:]}")


def train_and_merge(args, out: Path, base: Path) -> tuple[Path, Path, list[float], int]:
    """(adapter folder, merged folder, seconds of each training step) of one recipe."""
    log = out / "log.txt"
    merged = out / "merged"
    if args.recipe == "peftko":
        adapter = out / "run"
        run([sys.executable, "-m", "peftko", "lora-train", "--config", str(CONFIG), "--model", args.model,
             "--output", str(adapter), "--force", "--max-steps", str(args.max_steps), "--no-keep-best",
             "--logging-steps", "1"], log)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        run([sys.executable, "-m", "peftko", "merge", str(adapter), "--output", str(merged), "--dtype", "float32",
             "--force"], log)
        return adapter, merged, peftko_step_seconds(adapter / "metrics.jsonl"), peak_kib
    run([sys.executable, str(PEERS), "train", "--recipe", args.recipe, "--base", str(base), "--out", str(out),
         "--max-steps", str(args.max_steps), *[a for f in training_files() for a in ("--train-file", str(f))]], log)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    adapter = out / "adapter"
    run([sys.executable, str(PEERS), "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(merged)],
        log)
    return adapter, merged, json.loads((out / "train.json").read_text())["step_s"], peak_kib


def peftko_step_seconds(metrics: Path) -> list[float]:
    """Each step's seconds from metrics.jsonl's running train_runtime (logged every step), from step 1."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    times = {0: 0.0, **{r["step"]: r["train_runtime"] for r in rows if "train_runtime" in r and "loss" in r}}
    steps = sorted(times)
    return [round(times[b] - times[a], 3) for a, b in itertools.pairwise(steps) if b == a + 1]


def median_step(step_s: list[float]) -> float | None:
    """The median step, the first WARMUP_STEPS left out when there are more: robust to a neighbour's
    process taking a core for a step."""
    kept = step_s[WARMUP_STEPS:] if len(step_s) > WARMUP_STEPS else step_s
    return round(statistics.median(kept), 2) if kept else None


def folder_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 2)


def measure(args, merged: Path) -> dict:
    """Held-out bits per character and the structure of sampled books, for a merged float32 folder."""
    import transformers

    from peftko.core.config import DEFAULT_DOC_END, DEFAULT_MARKER_PATTERN
    from peftko.corpus.lint import marker_fragments
    from peftko.corpus.reading import read_documents
    from peftko.evaluate.scoring import evaluate_texts
    from peftko.evaluate.structure import structure_ok
    from peftko.model.generation import GenerateOptions, sample
    from peftko.model.inference import load_for_inference

    sys.path.insert(0, str(PEERS.parent))
    from peer_recipes import MARKERS

    model, tokenizer, info = load_for_inference(merged, quant="none", device="cpu", dtype="float32")
    docs, _ = read_documents([str(CORPUS / name) for name in HELD_OUT], DEFAULT_MARKER_PATTERN,
                             doc_end_marker=DEFAULT_DOC_END)
    scores = evaluate_texts(model, tokenizer, docs, MARKERS, 256, 4, next(model.parameters()).device).to_json()
    opts = GenerateOptions(max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95, seed=42, structure="free")
    transformers.set_seed(42)
    books = []
    for _ in range(args.samples):
        s = sample(model, tokenizer, info, PROMPT, opts)
        balanced, ended = structure_ok(PROMPT + s.text, MARKERS, DEFAULT_DOC_END, DEFAULT_MARKER_PATTERN)
        whole = not marker_fragments(s.text, MARKERS)
        books.append({"balanced": balanced, "ended": ended, "whole": whole, "tokens": s.new_tokens, "text": s.text})
    return {"bpc": scores["bits_per_char"], "bpc_text": scores["bits_per_char_text"],
            "tokens_per_char": scores["tokens_per_char"],
            "structure": sum(b["balanced"] and b["ended"] and b["whole"] for b in books),
            "balanced": sum(b["balanced"] for b in books), "ended": sum(b["ended"] for b in books),
            "whole_markers_only": sum(b["whole"] for b in books), "samples": len(books),
            "first_book": books[0]["text"][:300] if books else None}


def run_recipe(args) -> dict:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not (out / "log.txt").is_file():  # not a folder of this script's: never removed
            print(f"--out {out}: not empty and not an earlier output of this script (no log.txt); "
                  "choose a new folder", file=sys.stderr)
            raise SystemExit(2)
        shutil.rmtree(out)  # an earlier run of this recipe, written here
    out.mkdir(parents=True, exist_ok=True)
    from peftko.model.base import resolve_model_path  # after the check: a refusal costs no torch import

    base = Path(resolve_model_path(args.model))
    started = time.perf_counter()
    adapter, merged, step_s, peak_kib = train_and_merge(args, out, base)
    trained_s = time.perf_counter() - started
    adapter_files = [f for f in ("adapter_model.safetensors", "adapter_config.json") if (adapter / f).is_file()]
    result = {"recipe": args.recipe, "model": args.model, "steps": args.max_steps,
              **measure(args, merged),
              "adapter_mb": round(sum((adapter / f).stat().st_size for f in adapter_files) / 1e6, 2),
              "adapter_folder_mb": folder_mb(adapter),
              "s_per_step": median_step(step_s), "step_s": step_s,
              "peak_rss_gib": round(peak_kib * 1024 / 2**30, 2),
              "train_and_merge_s": round(trained_s, 1)}
    (out / "result.json").write_text(json.dumps(result, ensure_ascii=False))
    return result


def fmt(x, spec="{:.3f}") -> str:
    return "n/a" if x is None else spec.format(x)


def table(results: list[dict]) -> str:
    lines = ["| recipe | held-out bpc, whole | story text | structure | adapter MB | s/step | peak RSS GiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['recipe']} | {fmt(r['bpc'])} | {fmt(r['bpc_text'])} | {r['structure']}/{r['samples']} | "
                     f"{fmt(r['adapter_mb'], '{:,.1f}')} | {fmt(r['s_per_step'], '{:.2f}')} | "
                     f"{fmt(r['peak_rss_gib'], '{:.2f}')} |")
    return "\n".join(lines)


def drive(args) -> list[dict]:
    """Each recipe in its own process, one after another (none shares the CPU cores with another)."""
    keep = Path(args.out) if args.out else None
    root = keep or Path(tempfile.mkdtemp(prefix="peftko-peers-"))
    results = []
    try:
        for recipe in args.recipe_list:
            out = root / recipe
            cmd = [sys.executable, str(Path(__file__).resolve()), "--recipe", recipe, "--out", str(out),
                   "--model", args.model, "--max-steps", str(args.max_steps), "--samples", str(args.samples),
                   "--max-new-tokens", str(args.max_new_tokens)]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                raise SystemExit(f"recipe {recipe} failed (exit {proc.returncode})")
            results.append(json.loads((out / "result.json").read_text()))
            print(json.dumps(results[-1], ensure_ascii=False), flush=True)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.recipe:
        print(json.dumps(run_recipe(args), ensure_ascii=False))
        return 0
    results = drive(args)
    print()
    print(table(results))
    print(json.dumps({"model": args.model, "steps": args.max_steps, "samples": args.samples,
                      "max_new_tokens": args.max_new_tokens, "cpus": os.cpu_count(),
                      "date": time.strftime("%Y-%m-%d"), "results": results}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

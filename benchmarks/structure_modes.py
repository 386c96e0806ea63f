"""Strict against free generation on one model: N sampled books from the same prompt and seed in each mode.

    python benchmarks/structure_modes.py MODEL [--samples 8] [--max-new-tokens 400] [--temperature 0.8]

MODEL: a lora-train or merge output that records a marker grammar. Three modes: free (the model as
it is), forbid-markers (misplaced markers get no probability, renormalised over the rest, and nothing
else: what a plain grammar does, as the issue's llama.cpp GBNF did) and strict (peftko's
--structure strict: marker pieces forbidden too, the forbidden probability given to the open block's
closer, closers forced at the token limit). For each mode: the share of
well-formed books (START/END pairs closed, ends with the book end, whole markers only), each part
alone, marker fragments per book, "marker words as text" per book (runs of the markers' letters
and bars outside whole markers, such as `OF`, `ENDOF`, `|`: the escape route issue 33 measured in
llama.cpp), closers strict had to force at the token limit, and seconds per book. One JSON line
at the end for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch
import transformers

from peftko.core.config import DEFAULT_DOC_END, DEFAULT_MARKER_PATTERN
from peftko.corpus.lint import marker_fragments, marker_regex
from peftko.evaluate.structure import structure_ok
from peftko.model import generation
from peftko.model.generation import GenerateOptions, sample
from peftko.model.inference import load_for_inference
from peftko.model.structure import StructureProcessor


class ForbidMarkersOnly(StructureProcessor):
    """Only misplaced markers are masked; no piece rule, no redirect, no forcing (a plain grammar)."""

    def __init__(self, guide, prompt, prompt_tokens, budget, greedy=False):
        super().__init__(guide, prompt, prompt_tokens, budget=10**9, greedy=greedy)

    def forbidden(self, state, width, device):
        mask = torch.zeros(width, dtype=torch.bool, device=device)
        for marker, i in self.guide.marker_ids.items():
            mask[i] = i < width and not state.allowed(marker)
        return mask

    def _redirect(self, logits, mask, need_id):
        return super()._redirect(logits, mask, None)


def marker_words(text: str, markers: list[str]) -> list[str]:
    """Runs of the markers' own characters left once the whole markers are taken out."""
    alphabet = "".join(sorted({c for m in markers for c in m}))
    rest = marker_regex(markers).sub(" ", text)
    return re.findall(f"[{re.escape(alphabet)}]{{2,}}|[|<>]", rest)


def run_mode(model, tokenizer, info, mode: str, args) -> dict:
    generation.StructureProcessor = ForbidMarkersOnly if mode == "forbid-markers" else StructureProcessor
    opts = GenerateOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                           structure="free" if mode == "free" else "strict",
                           repetition_penalty=args.repetition_penalty)
    transformers.set_seed(args.seed)
    end = info.doc_end_marker or DEFAULT_DOC_END
    rows = []
    for _ in range(args.samples):
        start = time.perf_counter()
        s = sample(model, tokenizer, info, args.prompt, opts)
        balanced, ended = structure_ok(args.prompt + s.text, info.markers, end, DEFAULT_MARKER_PATTERN)
        pieces = marker_fragments(s.text, info.markers)
        words = marker_words(s.text, info.markers)
        rows.append({"balanced": balanced, "ended": ended, "whole": not pieces, "fragments": len(pieces),
                     "words": len(words), "forced": s.forced_closers, "tokens": s.new_tokens,
                     "seconds": time.perf_counter() - start, "text": s.text})
    n = len(rows)
    return {"mode": mode, "samples": n,
            "well_formed": sum(r["balanced"] and r["ended"] and r["whole"] for r in rows),
            "balanced": sum(r["balanced"] for r in rows), "ended": sum(r["ended"] for r in rows),
            "whole_markers_only": sum(r["whole"] for r in rows),
            "fragments_per_book": sum(r["fragments"] for r in rows) / n,
            "marker_words_per_book": sum(r["words"] for r in rows) / n,
            "forced_closers": sum(r["forced"] for r in rows), "tokens_per_book": sum(r["tokens"] for r in rows) / n,
            "seconds_per_book": sum(r["seconds"] for r in rows) / n, "first_text": rows[0]["text"][:300]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=400)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--prompt", default="|START_OF_BOOK|>")
    p.add_argument("--dtype", default=None)
    args = p.parse_args()
    model, tokenizer, info = load_for_inference(args.model, device="cpu", dtype=args.dtype)
    results = []
    for mode in ("free", "forbid-markers", "strict"):
        results.append(run_mode(model, tokenizer, info, mode, args))
        print(f"{mode}: {results[-1]['well_formed']}/{args.samples} well-formed", file=sys.stderr, flush=True)
    print("| mode | well-formed | pairs closed | book ended | whole markers only | fragments/book "
          "| marker words as text/book | closers forced | tokens/book | s/book |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        n = r["samples"]
        print(f"| {r['mode']} | {r['well_formed']}/{n} | {r['balanced']}/{n} | {r['ended']}/{n} | "
              f"{r['whole_markers_only']}/{n} | {r['fragments_per_book']:.2f} | {r['marker_words_per_book']:.2f} | "
              f"{r['forced_closers']} | {r['tokens_per_book']:.0f} | {r['seconds_per_book']:.1f} |")
    print(json.dumps({"model": args.model, **vars(args), "results": results}, ensure_ascii=False))


if __name__ == "__main__":
    main()

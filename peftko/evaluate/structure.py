"""The structure score of `peftko ablate`: do sampled continuations close what they open and end
the book?

Continuations of the held-out documents' first three quarters are sampled; a sample counts when
its START_/END_ pairs balance (peftko.corpus.lint), it ends with the book-end marker and it writes
whole markers only: no pieces of one (`|>`, `|SOUND|`, `<|END_OF_BOOK|>`: corpus.lint.marker_fragments).

Both generation modes are scored where the model records a marker grammar: "free" (the model as it
is; the score kept under the keys it always had) and "strict" (peftko.model.structure, nested under
"strict"), from the same prompts and seed, so the two read side by side.
"""

from __future__ import annotations

import dataclasses

import transformers

from peftko.core.progress import phase
from peftko.corpus.lint import lint_text, marker_fragments, with_literals
from peftko.model.generation import GenerateOptions, sample
from peftko.model.structure import single_token_ids


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    samples: int = 2  # continuations per held-out document
    max_new_tokens: int = 256
    temperature: float = 0.8
    prompt_fraction: float = 0.75  # of each held-out document's characters, cut at a line end


def structure_ok(text: str, markers: list[str], doc_end: str, pattern: str) -> tuple[bool, bool]:
    """(START_/END_ pairs balanced, ends with the book-end marker) for one sampled document."""
    ended = text.rstrip().endswith(doc_end)
    # A sample cut off by the token limit is judged on its complete lines, its book closed for it:
    # not ending is counted once, by `ended`, not again as an open BOOK pair.
    judged = text if ended else text[: text.rfind("\n") + 1] + doc_end
    problems = lint_text("sample", judged, markers, with_literals(pattern, markers))
    return (not any(p.kind == "unbalanced" for p in problems)), ended


def prompt_of(doc: str, fraction: float) -> str:
    cut = doc.find("\n", int(len(doc) * fraction))
    return doc[: cut + 1] if cut >= 0 else doc


def structure_score(model, tokenizer, info, held_out: list[str], markers: list[str], opts: SampleOptions,
                    doc_end: str, pattern: str, seed: int) -> dict:
    """The free mode's score, with the strict mode's under "strict" where the model records a grammar
    whose markers are tokens here (not for markers left as text: nothing to keep)."""
    score = score_mode(model, tokenizer, info, held_out, markers, opts, doc_end, pattern, seed, "free")
    grammar = getattr(info, "grammar", None)
    if grammar is not None and single_token_ids(tokenizer, grammar.markers):
        score["strict"] = score_mode(model, tokenizer, info, held_out, markers, opts, doc_end, pattern, seed, "strict")
    return score


def score_mode(model, tokenizer, info, held_out: list[str], markers: list[str], opts: SampleOptions,
               doc_end: str, pattern: str, seed: int, structure: str) -> dict:
    """Shares of the samples that balance their pairs, that end with `doc_end`, that write whole
    markers only, and that do all three; and the marker fragments written per sample."""
    gen = GenerateOptions(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, seed=seed,
                          structure=structure)
    transformers.set_seed(seed)
    balanced = ended = whole = good = fragments = n = 0
    with phase("sample", len(held_out) * opts.samples, "samples") as progress:
        for doc in held_out:
            prompt = prompt_of(doc, opts.prompt_fraction)
            for _ in range(opts.samples):
                s = sample(model, tokenizer, info, prompt, gen)
                b, e = structure_ok(prompt + s.text, markers, doc_end, pattern)
                # Against the corpus's markers, not the model's registered ones: a variant that writes markers
                # as plain text (ablate's as-text) writes them whole when it spells them right.
                pieces = marker_fragments(s.text, markers)
                w = not pieces
                balanced, ended, whole, good, n = balanced + b, ended + e, whole + w, good + (b and e and w), n + 1
                fragments += len(pieces)
                progress.advance()
    return {"samples": n, "balanced": balanced / n, "ends_with_marker": ended / n, "whole_markers_only": whole / n,
            "fragments_per_sample": fragments / n, "structure": good / n}


def describe(s: dict, mode: str = "") -> str:
    """One line for a structure score, as `eval --samples` and `lora-train` (samples) print it; a second
    for the strict mode's, when scored."""
    plural = "s" if s["samples"] != 1 else ""
    line = (f"{mode}structure of {s['samples']} sampled continuation{plural}: {s['balanced']:.0%} close their pairs, "
            f"{s['ends_with_marker']:.0%} end the book, {s['whole_markers_only']:.0%} write whole markers only "
            f"({s['fragments_per_sample']:.1f} marker fragments per sample); all three: {s['structure']:.0%}")
    return line + ("\n" + describe(s["strict"], "with --structure strict: ") if "strict" in s else "")


def overall_top1(markers: dict) -> float | None:
    """Top-1 over all predicted marker occurrences (each marker weighted by its count)."""
    hits = sum((s["top1"] or 0) * s["count"] for s in markers.values() if s["top1"] is not None)
    total = sum(s["count"] for s in markers.values() if s["top1"] is not None)
    return hits / total if total else None

"""Sampling a continuation: markers kept as written, stopping at the book-end marker.

Markers are added tokens, not special ones, so decoding with skip_special_tokens=True keeps them
(and drops only BOS/EOS/padding). Generation stops at the book-end marker (peftko.json's
doc_end_marker, or the merged model's generation_config, which `peftko merge` extends), at the
base's eos, or after max_new_tokens. With structure "strict" (the default where the run or the merge
recorded a marker grammar) peftko.model.structure keeps the markers to the corpus's grammar.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from transformers import LogitsProcessorList

from peftko.corpus.lint import marker_fragments
from peftko.model.structure import StructureProcessor, build_guide, check_structure


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 42
    num_samples: int = 1
    quant: str | None = None
    device: str = "auto"
    dtype: str | None = None  # None: as the run or the merged model records it
    structure: str | None = None  # "strict" | "free"; None: strict where a marker grammar is recorded


@dataclass
class Sample:
    prompt: str
    text: str
    new_tokens: int
    stop_reason: str  # "marker" | "eos" | "length"
    tokens_per_s: float
    fragments: list[str]  # pieces of markers written instead of the marker (corpus.lint.marker_fragments)
    structure: str = "free"  # the mode it was generated in
    forced_closers: int = 0  # strict: closers forced because the token limit came

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "new_tokens": self.new_tokens,
                "stop_reason": self.stop_reason, "tokens_per_s": round(self.tokens_per_s, 2),
                "marker_fragments": len(self.fragments), "fragments": self.fragments,
                "structure": self.structure, "forced_closers": self.forced_closers}


def generation_kwargs(opts: GenerateOptions, stop: list[int], pad_id: int | None) -> dict:
    # use_cache: a model fresh from training (lora-train's samples) has the KV cache switched off for
    # gradient checkpointing, and without it every new token runs the whole prompt again.
    kwargs = dict(max_new_tokens=opts.max_new_tokens, eos_token_id=stop, pad_token_id=pad_id,
                  repetition_penalty=opts.repetition_penalty, use_cache=True)
    if opts.temperature == 0:
        return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {**kwargs, "do_sample": True, "temperature": opts.temperature, "top_p": opts.top_p,
            "top_k": opts.top_k or None}


def context_length(model) -> int | None:
    """The positions the model can attend to (its config's max_position_embeddings), None when unsaid."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def room_for(model, prompt_tokens: int, wanted: int) -> int:
    """New tokens that fit after a prompt of `prompt_tokens`: at most `wanted`, never past the context
    (a model does not slide its window: beyond it, positions are ones it never saw)."""
    limit = context_length(model)
    return wanted if limit is None else max(0, min(wanted, limit - prompt_tokens))


def sample(model, tokenizer, info, prompt: str, opts: GenerateOptions, streamer=None) -> Sample:
    """One continuation of `prompt`, within the model's context."""
    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else info.stop_ids[0] if info.stop_ids else None
    room = room_for(model, enc["input_ids"].shape[1], opts.max_new_tokens)
    if room == 0:  # the prompt fills the context: nothing can follow it
        return Sample(prompt, "", 0, "length", 0.0, [])
    mode = structure_mode(opts.structure, info)
    processor = structure_processor(model, tokenizer, info, prompt, enc["input_ids"].shape[1], room, mode,
                                    greedy=opts.temperature == 0)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, **generation_kwargs(replace(opts, max_new_tokens=room), info.stop_ids, pad),
                             streamer=streamer, logits_processor=LogitsProcessorList([processor] if processor else []))
    seconds = time.perf_counter() - start
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Sample(prompt, text, len(new), stop_reason(new, info, tokenizer, opts.max_new_tokens),
                  len(new) / max(seconds, 1e-9), marker_fragments(text, info.markers), mode,
                  processor.forced if processor else 0)


def structure_mode(asked: str | None, info) -> str:
    """--structure as given (strict refused without a grammar), else strict where one is recorded."""
    grammar = getattr(info, "grammar", None)
    if asked is None:
        return "strict" if grammar is not None else "free"
    check_structure(asked, grammar, str(info.path))
    return asked


def structure_processor(model, tokenizer, info, prompt: str, prompt_tokens: int, room: int, mode: str,
                        greedy: bool = False):
    """Strict mode's logits processor; the tokenizer's guide is built once per loaded model (seconds)."""
    if mode != "strict":
        return None
    guide = getattr(info, "guide", None)
    if guide is None or guide.grammar is not info.grammar:
        rows = model.get_output_embeddings().weight.shape[0]
        guide = build_guide(info.grammar, tokenizer, info.stop_ids, info.doc_end_marker, max(rows, len(tokenizer)))
        info.guide = guide
    return StructureProcessor(guide, prompt, prompt_tokens, room, greedy=greedy)


def stop_reason(new: list[int], info, tokenizer, max_new_tokens: int) -> str:
    if new:
        end_id = tokenizer.convert_tokens_to_ids(info.doc_end_marker) if info.doc_end_marker else None
        if new[-1] == end_id:
            return "marker"
        if new[-1] in info.stop_ids:
            return "eos"
    return "length"

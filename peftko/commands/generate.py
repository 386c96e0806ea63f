"""`peftko generate`: continue a prompt with an adapter, a merged model or a base.

Text streams to stdout token by token (peftko.model.generation says what stops it); with --json,
one JSON object per sample instead (and, on a terminal, a bar counting its tokens).
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import transformers
from transformers import TextStreamer

from peftko.core.config import DEFAULT_DOC_END, DEFAULT_MARKER_PATTERN
from peftko.core.errors import UserError
from peftko.core.progress import Tracker, phase, result, say
from peftko.evaluate.structure import structure_ok
from peftko.model.generation import (
    GenerateOptions,
    context_length,
    room_for,
    sample,
    structure_mode,
)
from peftko.model.inference import load_for_inference


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt-file {prompt_file}: {getattr(e, 'strerror', None) or e}") from None
    if not prompt:
        raise UserError("the prompt is empty: pass --prompt TEXT or --prompt-file FILE with some text "
                        "(e.g. --prompt '|START_OF_TITLE|>')")
    return unicodedata.normalize("NFC", prompt)  # as the corpus was normalised for training


def check_room(model, tokenizer, prompt: str, wanted: int) -> None:
    """Refuse a prompt that fills the model's context; say when fewer new tokens than asked fit."""
    prompt_tokens = len(tokenizer(prompt)["input_ids"])
    room = room_for(model, prompt_tokens, wanted)
    if room == 0:
        raise UserError(f"the prompt is {prompt_tokens:,} tokens, and the model attends to {context_length(model):,}: "
                        "nothing fits after it. Shorten the prompt.")
    if room < wanted:
        say(f"note: --max-new-tokens {wanted:,} does not fit after this prompt ({prompt_tokens:,} of the "
            f"model's {context_length(model):,} positions): generating at most {room:,}", err=True)


class Streamer(TextStreamer):
    """A sample as progress events: its text as it is decoded (shown as it comes on a terminal),
    and how many new tokens, for a bar under --json or a front end's counter."""

    def __init__(self, tokenizer, tracker: Tracker, show_text: bool):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.tracker, self.show_text = tracker, show_text

    def put(self, value) -> None:
        if not self.next_tokens_are_prompt:  # generate() hands over the prompt first
            self.tracker.advance(value.numel())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.show_text:
            say(text, end="\n" if stream_end else "")


def structure_of(prompt: str, s, info) -> dict:
    """The structure score's three checks for one sample (prompt and continuation together, as the
    score of `peftko ablate` judges them): START_/END_ pairs closed, the book ended, whole markers only."""
    closed, ended = structure_ok(prompt + s.text, list(info.markers), info.doc_end_marker or DEFAULT_DOC_END,
                                 DEFAULT_MARKER_PATTERN)
    return {"pairs_closed": closed, "book_ended": ended, "whole_markers": not s.fragments}


def sample_one(model, tokenizer, info, prompt: str, opts: GenerateOptions, name: str, as_json: bool):
    """One sample; streamed as text, or (--json) counted as a phase that a terminal shows as a bar."""
    if not as_json:
        return sample(model, tokenizer, info, prompt, opts, Streamer(tokenizer, Tracker(name, opts.max_new_tokens,
                                                                                      "tokens"), True))
    with phase(name, opts.max_new_tokens, "tokens") as tracker:
        return sample(model, tokenizer, info, prompt, opts, Streamer(tokenizer, tracker, False))


def run_generate(model_path: str, prompt: str, opts: GenerateOptions, as_json: bool = False) -> int:
    model, tokenizer, info = load_for_inference(model_path, opts.quant, opts.device, opts.dtype)
    check_room(model, tokenizer, prompt, opts.max_new_tokens)
    structure_mode(opts.structure, info)  # strict without a recorded grammar: refused before any text
    transformers.set_seed(opts.seed)  # once: the samples differ from each other, and repeat as a set
    for i in range(opts.num_samples):
        if not as_json and opts.num_samples > 1:
            say(f"--- sample {i + 1}/{opts.num_samples}")
        if not as_json:
            say(prompt, end="")
        s = sample_one(model, tokenizer, info, prompt, opts, f"sample {i + 1}/{opts.num_samples}", as_json)
        row = {**s.to_json(), **structure_of(prompt, s, info)}
        result("sample", **row)
        if as_json:
            say(json.dumps(row, ensure_ascii=False))
            continue
        pieces = f", {len(s.fragments)} marker fragments: {' '.join(s.fragments[:5])}" if s.fragments else ""
        forced = f", {s.forced_closers} closers forced at the token limit" if s.forced_closers else ""
        say(f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tokens/s, stop: {s.stop_reason}{pieces}{forced}]", err=True)
    return 0

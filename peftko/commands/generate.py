"""`peftko generate`: continue a prompt with an adapter, a merged model or a base.

Text streams to stdout token by token (peftko.model.generation says what stops it); with --json,
one JSON object per sample instead.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import click
import transformers
from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer

from peftko.core.errors import UserError
from peftko.model.generation import GenerateOptions, context_length, room_for, sample
from peftko.model.reload import load_for_inference


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
        click.echo(f"note: --max-new-tokens {wanted:,} does not fit after this prompt ({prompt_tokens:,} of the "
                   f"model's {context_length(model):,} positions): generating at most {room:,}", err=True)


class Progress(BaseStreamer):
    """Under --json on a terminal: a count of the new tokens on stderr while a sample is generated."""

    def __init__(self, label: str):
        self.label, self.count, self.prompt_seen = label, 0, False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.count += value.numel()
        sys.stderr.write(f"\r{self.label}: {self.count} tokens")
        sys.stderr.flush()

    def end(self) -> None:
        sys.stderr.write("\n")


def run_generate(model_path: str, prompt: str, opts: GenerateOptions, as_json: bool = False) -> int:
    model, tokenizer, info = load_for_inference(model_path, opts.quant, opts.device, opts.dtype)
    check_room(model, tokenizer, prompt, opts.max_new_tokens)
    transformers.set_seed(opts.seed)  # once: the samples differ from each other, and repeat as a set
    for i in range(opts.num_samples):
        if as_json:
            progress = Progress(f"sample {i + 1}/{opts.num_samples}") if sys.stderr.isatty() else None
            click.echo(json.dumps(sample(model, tokenizer, info, prompt, opts, progress).to_json(),
                                  ensure_ascii=False))
            continue
        if opts.num_samples > 1:
            click.echo(f"--- sample {i + 1}/{opts.num_samples}")
        click.echo(prompt, nl=False)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        s = sample(model, tokenizer, info, prompt, opts, streamer)
        pieces = f", {len(s.fragments)} marker fragments: {' '.join(s.fragments[:5])}" if s.fragments else ""
        click.echo(f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tokens/s, stop: {s.stop_reason}{pieces}]", err=True)
    return 0

"""`peftko generate`: continue a prompt with an adapter, a merged model or a base.

Text streams to stdout token by token (peftko.model.generation says what stops it); with --json,
one JSON object per sample instead.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import click
import transformers
from transformers import TextStreamer

from peftko.core.errors import UserError
from peftko.model.generation import GenerateOptions, sample
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


def run_generate(model_path: str, prompt: str, opts: GenerateOptions, as_json: bool = False) -> int:
    model, tokenizer, info = load_for_inference(model_path, opts.quant, opts.device, opts.dtype)
    transformers.set_seed(opts.seed)  # once: the samples differ from each other, and repeat as a set
    for i in range(opts.num_samples):
        if as_json:
            click.echo(json.dumps(sample(model, tokenizer, info, prompt, opts).to_json(), ensure_ascii=False))
            continue
        if opts.num_samples > 1:
            click.echo(f"--- sample {i + 1}/{opts.num_samples}")
        click.echo(prompt, nl=False)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        s = sample(model, tokenizer, info, prompt, opts, streamer)
        click.echo(f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tokens/s, stop: {s.stop_reason}]", err=True)
    return 0

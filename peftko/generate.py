"""`peftko generate`: continue a prompt with an adapter, a merged model or a base.

Text streams to stdout token by token. Markers are added tokens, not special ones, so decoding
with skip_special_tokens=True keeps them (and drops only BOS/EOS/padding). Generation stops at
the book-end marker (peftko.json's doc_end_marker, or the merged model's generation_config, which
`peftko merge` extends), at the base's eos, or after --max-new-tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import click

from peftko.errors import UserError


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


@dataclass
class Sample:
    prompt: str
    text: str
    new_tokens: int
    stop_reason: str  # "marker" | "eos" | "length"
    tokens_per_s: float

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "new_tokens": self.new_tokens,
                "stop_reason": self.stop_reason, "tokens_per_s": round(self.tokens_per_s, 2)}


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
    import unicodedata

    return unicodedata.normalize("NFC", prompt)  # as the corpus was normalised for training


def generation_kwargs(opts: GenerateOptions, stop: list[int], pad_id: int | None) -> dict:
    kwargs = dict(max_new_tokens=opts.max_new_tokens, eos_token_id=stop, pad_token_id=pad_id,
                  repetition_penalty=opts.repetition_penalty)
    if opts.temperature == 0:
        return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {**kwargs, "do_sample": True, "temperature": opts.temperature, "top_p": opts.top_p,
            "top_k": opts.top_k or None}


def sample(model, tokenizer, info, prompt: str, opts: GenerateOptions, streamer=None) -> Sample:
    """One continuation of `prompt`."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else info.stop_ids[0] if info.stop_ids else None
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, **generation_kwargs(opts, info.stop_ids, pad), streamer=streamer)
    seconds = time.perf_counter() - start
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return Sample(prompt, tokenizer.decode(new, skip_special_tokens=True), len(new),
                  stop_reason(new, info, tokenizer, opts.max_new_tokens), len(new) / max(seconds, 1e-9))


def stop_reason(new: list[int], info, tokenizer, max_new_tokens: int) -> str:
    if new:
        end_id = tokenizer.convert_tokens_to_ids(info.doc_end_marker) if info.doc_end_marker else None
        if new[-1] == end_id:
            return "marker"
        if new[-1] in info.stop_ids:
            return "eos"
    return "length"


def run_generate(model_path: str, prompt: str, opts: GenerateOptions, as_json: bool = False) -> int:
    import transformers
    from transformers import TextStreamer

    from peftko.inference import load_for_inference

    model, tokenizer, info = load_for_inference(model_path, opts.quant, opts.device)
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

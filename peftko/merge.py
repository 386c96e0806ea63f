"""`peftko merge`: adapter + full-precision base -> one standalone Hugging Face model.

Never merges into 4-bit weights (lossy: peft#2321, transformers#31293). The base is loaded in
the requested dtype, grown exactly as training grew it (the row count is in peftko.json), the
adapter (LoRA + marker rows) is applied and merged, and a self-check compares the merged
model's logits with the unmerged adapter on Korean sentences that contain the markers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import click
import torch

from peftko.errors import UserError
from peftko.run_dir import fingerprint_base, read_manifest

# bf16/fp16 round the merged weights once; fp32 is exact up to summation order.
SELF_CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-2}
CHECK_SENTENCES = [
    "{0}달빛 우체부{1}\n옛날 어느 마을에 작은 우체부가 살았습니다.",
    "{2}\"할머니, 오늘은 비가 올까요?\"{3} {4}똑똑, 누군가 문을 두드렸어요.",
]


def check_base(manifest: dict, base: str | None) -> Path:
    path = Path(base or manifest["base_model"]).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"base model not found at {path}; pass its local folder with --base")
    if fingerprint_base(path) != manifest["base_fingerprint"]:
        raise UserError(
            f"the base at {path} does not match the one this adapter was trained on "
            f"({manifest['base_model']}): its config or weights differ. Pass the original base with --base."
        )
    return path


def check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise UserError(f"--output {output} exists and is not empty; choose another or pass --force")


def load_merged_pair(run_dir: Path, base_path: Path, manifest: dict, dtype: torch.dtype):
    """The base grown as in training with the adapter applied (unmerged), and the tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftko.base_model import check_weight_files

    # Consent given at training time (--allow-pickle, --trust-remote-code) carries over; nothing more.
    allow_pickle = bool(manifest["config"].get("allow_pickle"))
    remote = bool(manifest["config"].get("trust_remote_code"))
    check_weight_files(base_path, allow_pickle)
    tokenizer = AutoTokenizer.from_pretrained(run_dir, trust_remote_code=remote)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=remote,
                                                 use_safetensors=None if allow_pickle else True)
    rows = manifest["vocab"]["rows_after"]
    if model.get_input_embeddings().weight.shape[0] < rows:
        model.resize_token_embeddings(rows, mean_resizing=False)
    return PeftModel.from_pretrained(model, run_dir), tokenizer


def check_texts(manifest: dict) -> list[str]:
    names = [m["marker"] for m in manifest["markers"]]
    picks = (names * 5)[:5] if names else [""] * 5
    return [s.format(*picks) for s in CHECK_SENTENCES]


@torch.no_grad()
def logits_for(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    model.eval()
    return [model(**tokenizer(t, return_tensors="pt")).logits.float() for t in texts]


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).norm()) ** 2 for x, y in zip(a, b)) ** 0.5
    den = sum(float(x.norm()) ** 2 for x in a) ** 0.5
    return num / max(den, 1e-12)


def stop_at_book_end(model, manifest: dict) -> None:
    """Make generate() stop at the document-end marker as well as at the base's own eos.

    Training kept the marker in the labels, so the model learned to emit it where a book ends.
    """
    end = manifest["config"].get("doc_end_marker")
    ids = [m["id"] for m in manifest["markers"] if m["marker"] == end]
    if not ids:
        return
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    model.generation_config.eos_token_id = list(dict.fromkeys(eos + ids))


def save_atomically(model, tokenizer, output: Path) -> None:
    """Write next to the target, then swap it in: an existing output is never half overwritten."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.merging-", dir=output.parent))
    try:
        model.save_pretrained(stage, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(stage)
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
            os.replace(stage, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def run_merge(adapter_dir: str, output: str, base: str | None = None, dtype: str = "bfloat16",
              force: bool = False) -> None:
    run_dir, out = Path(adapter_dir), Path(output)
    manifest = read_manifest(run_dir)
    base_path = check_base(manifest, base)
    check_output(out, force)
    torch_dtype = getattr(torch, dtype)
    click.echo(f"loading {base_path} in {dtype} and applying {run_dir}")
    peft_model, tokenizer = load_merged_pair(run_dir, base_path, manifest, torch_dtype)
    texts = check_texts(manifest)
    before = logits_for(peft_model, tokenizer, texts)
    merged = peft_model.merge_and_unload()
    diff = relative_difference(before, logits_for(merged, tokenizer, texts))
    tolerance = SELF_CHECK_TOLERANCE[dtype]
    click.echo(f"self-check: relative logit difference merged vs adapter = {diff:.2e} (limit {tolerance:.0e})")
    if not diff <= tolerance:
        raise UserError(f"merge self-check failed: relative difference {diff:.2e} exceeds {tolerance:.0e}; "
                        "nothing was written. Try --dtype float32.")
    stop_at_book_end(merged, manifest)
    save_atomically(merged, tokenizer, out)
    click.echo(f"merged model written to {out} ({len(tokenizer)} tokens, markers are single tokens)")

"""`peftko merge`: adapter + full-precision base -> one standalone Hugging Face model.

Never merges into 4-bit weights (lossy: peft#2321, transformers#31293). The base is loaded in
the requested dtype, grown exactly as training grew it (the row count is in peftko.json), the
adapter (LoRA + marker rows) is applied and merged, and a self-check compares the merged
model's logits with the unmerged adapter on Korean sentences that contain the markers.

The output follows peftko.ownership: never an input, replaced only when it is an earlier merge
(marked by peftko-merge.json) and only with --force, checked for writability before the load,
and locked (a sibling .NAME.peftko-lock) so two merges never write it at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import click
import torch

from peftko import gguf_export
from peftko.base_model import Precision
from peftko.errors import UserError
from peftko.fingerprints import fingerprint_base
from peftko.inference import load_with_adapter
from peftko.model_card import merged_card
from peftko.ownership import OutputKind, check_place, entries_to_replace
from peftko.run_dir import (FORMAT_VERSION, check_writable, keep_sentencepiece_files, publish, read_json_object,
                            read_manifest, write_json_atomic)

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


MARK = "peftko-merge.json"  # written last into a merged model: what it is and which files are ours


def _merge_files(output: Path):
    files = read_json_object(output / MARK).get("files")
    names = {MARK, *(files if isinstance(files, list) else [])}
    return lambda name: name in names


MERGE_KIND = OutputKind("a merged model", lambda out: (out / MARK).is_file(), _merge_files)


def check_output(output: Path, inputs: dict[str, Path]) -> None:
    """Place and writability first: a refusal costs seconds, not a model load."""
    check_place(output, inputs)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a directory")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {output.parent}: {e.strerror or e}") from None
    for folder in (output.parent, output) if output.is_dir() else (output.parent,):
        check_writable(folder)


def claim_output(output: Path, force: bool) -> None:
    """Under the lock: an earlier merged model is replaced only with --force, and only whole."""
    entries_to_replace(output, MERGE_KIND, force, f"--output {output} already holds a merged model; "
                       "pass --force to replace it, or choose another directory.")


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


def save_atomically(model, tokenizer, output: Path, record: dict, stopper, manifest: dict | None = None) -> None:
    """Write next to the target, then swap it in: an existing output is never half overwritten.

    Beside the weights and tokenizer: the base's SentencePiece model (the tokenizer's save leaves it
    out) and, given the adapter's manifest, a README.md model card. The mark (peftko-merge.json,
    listing the files) is written last into the staging folder; the swap is two renames that a
    first Ctrl-C does not cut.
    """
    output = output.resolve()
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.merging-", dir=output.parent))
    try:
        model.save_pretrained(stage, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(stage)
        keep_sentencepiece_files(Path(record["base_model"]), stage)
        if manifest is not None:
            (stage / "README.md").write_text(merged_card(manifest, record, output.name), encoding="utf-8")
        files = sorted(f.name for f in stage.iterdir())
        publish(stage)  # the stage becomes the output
        write_json_atomic(stage / MARK, {"format": FORMAT_VERSION, **record, "files": files})
        with stopper.during("save"):
            _swap_in(stage, output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap_in(stage: Path, output: Path) -> None:
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(stage, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, output)


def run_merge(adapter_dir: str, output: str, base: str | None = None, dtype: str = "bfloat16",
              force: bool = False, gguf: gguf_export.GgufOptions | None = None) -> int:
    from peftko.stopping import Stopper

    stopper = Stopper("before the merged model was written; nothing was written.")
    with stopper.installed():
        merge(Path(adapter_dir), Path(output), base, dtype, force, stopper, gguf)
    if stopper.signum:
        click.echo(f"peftko: stopped by {stopper.name} after the merged model was written.", err=True)
    return stopper.exit_code


def merge(run_dir: Path, out: Path, base: str | None, dtype: str, force: bool, stopper,
          gguf: gguf_export.GgufOptions | None = None) -> None:
    from peftko.output_lock import hold

    manifest = read_manifest(run_dir)
    base_path = check_base(manifest, base)
    check_output(out, {"the adapter directory": run_dir, "the base model": base_path})
    with hold(out.parent / f".{out.name}.peftko-lock", f"--output {out}"):
        claim_output(out, force)
        if gguf:  # llama.cpp refuses some tokenizers: know it before the merge, not after
            gguf_export.preflight(base_path, out, gguf)
        merged, tokenizer = merge_and_check(run_dir, base_path, manifest, dtype)
        record = {"adapter": str(run_dir.resolve()), "base_model": str(base_path.resolve()), "dtype": dtype}
        save_atomically(merged, tokenizer, out, record, stopper, manifest)
        click.echo(f"merged model written to {out} ({len(tokenizer)} tokens, markers are single tokens)")
        if gguf:
            gguf_export.export(out, manifest, gguf, stopper)


def merge_and_check(run_dir: Path, base_path: Path, manifest: dict, dtype: str):
    """The merged model, once its logits match the unmerged adapter's on marker sentences."""
    click.echo(f"loading {base_path} in {dtype} and applying {run_dir}")
    precision = Precision(torch.device("cpu"), getattr(torch, dtype))  # never into 4-bit weights
    peft_model, tokenizer = load_with_adapter(run_dir, base_path, manifest, "none", precision)
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
    return merged, tokenizer

"""`peftko merge`: adapter + full-precision base -> one standalone Hugging Face model.

Never merges into 4-bit weights (lossy: peft#2321, transformers#31293). By default the merge
streams (peftko.streaming_merge): tensor by tensor from the base's safetensors files, grown
exactly as training grew it (the row count is in peftko.json), the LoRA deltas and marker rows
applied, each written tensor checked against the base and the adapter, so the whole model never
sits in memory. Where that mapping does not hold (no safetensors, renamed checkpoint keys, an
adapter feature it does not handle) the whole model is loaded, merged by peft and saved, as
--full-check also does to compare the merged model's logits with the unmerged adapter on Korean
sentences that contain the markers.

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


def stop_at_book_end(generation_config, manifest: dict) -> None:
    """Make generate() stop at the document-end marker as well as at the base's own eos.

    Training kept the marker in the labels, so the model learned to emit it where a book ends.
    """
    end = manifest["config"].get("doc_end_marker")
    ids = [m["id"] for m in manifest["markers"] if m["marker"] == end]
    if not ids:
        return
    eos = generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    generation_config.eos_token_id = list(dict.fromkeys(eos + ids))


def save_atomically(write_model, tokenizer, output: Path, record: dict, stopper, manifest: dict | None = None) -> None:
    """Write next to the target, then swap it in: an existing output is never half overwritten.

    `write_model(stage)` writes the weights, config.json and generation_config.json and checks
    them. Beside them: the tokenizer, the base's SentencePiece model (the tokenizer's save leaves
    it out) and, given the adapter's manifest, a README.md model card. The mark (peftko-merge.json,
    listing the files) is written last into the staging folder; the swap is two renames that a
    first Ctrl-C does not cut.
    """
    output = output.resolve()
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.merging-", dir=output.parent))
    try:
        write_model(stage)
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
              force: bool = False, full_check: bool = False, gguf: gguf_export.GgufOptions | None = None) -> int:
    from peftko.stopping import Stopper

    stopper = Stopper("before the merged model was written; nothing was written.")
    with stopper.installed():
        merge(Path(adapter_dir), Path(output), base, dtype, force, stopper, full_check, gguf)
    if stopper.signum:
        click.echo(f"peftko: stopped by {stopper.name} after the merged model was written.", err=True)
    return stopper.exit_code


def merge(run_dir: Path, out: Path, base: str | None, dtype: str, force: bool, stopper,
          full_check: bool = False, gguf: gguf_export.GgufOptions | None = None) -> None:
    from peftko.output_lock import hold

    manifest = read_manifest(run_dir)
    base_path = check_base(manifest, base)
    check_output(out, {"the adapter directory": run_dir, "the base model": base_path})
    with hold(out.parent / f".{out.name}.peftko-lock", f"--output {out}"):
        claim_output(out, force)
        if gguf:  # llama.cpp refuses some tokenizers: know it before the merge, not after
            gguf_export.preflight(base_path, out, gguf)
        tokenizer = merged_tokenizer(run_dir, manifest)
        record = {"adapter": str(run_dir.resolve()), "base_model": str(base_path.resolve()), "dtype": dtype}
        writer = streaming_writer(run_dir, base_path, manifest, dtype, full_check)
        save_atomically(writer, tokenizer, out, record, stopper, manifest)
        click.echo(f"merged model written to {out} ({len(tokenizer)} tokens, markers are single tokens)")
        if gguf:
            gguf_export.export(out, manifest, gguf, stopper)


def streaming_writer(run_dir: Path, base_path: Path, manifest: dict, dtype: str, full_check: bool):
    """What writes the merged model into the staging folder: the streaming merge, or, where it does
    not apply, the whole-model merge."""
    def write(stage: Path) -> None:
        from peftko.streaming_merge import StreamingUnsupported, stream_merge

        click.echo(f"merging {run_dir} into {base_path} in {dtype}, one tensor at a time")
        try:
            report = stream_merge(run_dir, base_path, manifest["vocab"]["rows_after"], dtype, stage,
                                  bool(manifest["config"].get("trust_remote_code")))
        except StreamingUnsupported as e:
            click.echo(f"merging in memory instead: {e}")
            merged, _ = merge_and_check(run_dir, base_path, manifest, dtype)
            merged.save_pretrained(stage, safe_serialization=True, max_shard_size="5GB")
            return
        click.echo(f"self-check: {report.tensors} tensors, {report.lora_targets} LoRA targets within "
                   f"{report.worst_probe_error:.1e} of Wx + scale*B(Ax) on random probes, "
                   f"{report.marker_rows} marker rows equal to the trained rows, every other weight the base's")
        write_config(base_path, manifest, dtype, stage)
        if full_check:
            compare_logits(run_dir, base_path, manifest, dtype, stage)

    return write


def write_config(base_path: Path, manifest: dict, dtype: str, stage: Path) -> None:
    """config.json with the grown vocabulary and the output dtype; generation_config.json with the stop."""
    from transformers import AutoConfig, GenerationConfig

    remote = bool(manifest["config"].get("trust_remote_code"))
    config = AutoConfig.from_pretrained(base_path, trust_remote_code=remote)
    config.get_text_config().vocab_size = manifest["vocab"]["rows_after"]
    config.dtype = dtype
    config.save_pretrained(stage)
    try:
        generation = GenerationConfig.from_pretrained(base_path)
    except OSError:  # no generation_config.json: what from_pretrained would derive
        generation = GenerationConfig.from_model_config(config)
    stop_at_book_end(generation, manifest)
    generation.save_pretrained(stage)
    if remote:  # the model's own code, which config.json's auto_map points at
        for code in base_path.glob("*.py"):
            shutil.copyfile(code, stage / code.name)


def compare_logits(run_dir: Path, base_path: Path, manifest: dict, dtype: str, stage: Path) -> None:
    """--full-check: the written model's logits against the unmerged adapter's, one model in memory at a time."""
    from peftko.base_model import load_base

    click.echo(f"full check: loading {base_path} with the adapter, then the merged model")
    texts = check_texts(manifest)
    precision = Precision(torch.device("cpu"), getattr(torch, dtype))
    peft_model, tokenizer = load_with_adapter(run_dir, base_path, manifest, "none", precision)
    before = logits_for(peft_model, tokenizer, texts)
    del peft_model
    floor = rounding_floor(run_dir, base_path, manifest, dtype, tokenizer, texts, before)
    merged = load_base(stage, "none", precision)
    check_logits(before, logits_for(merged, tokenizer, texts), dtype, floor)


def merged_tokenizer(run_dir: Path, manifest: dict):
    from peftko.base_model import load_tokenizer

    return load_tokenizer(run_dir, bool(manifest["config"].get("trust_remote_code")))


def rounding_floor(run_dir: Path, base_path: Path, manifest: dict, dtype: str, tokenizer, texts: list[str],
                   before: list[torch.Tensor]) -> float:
    """How far rounding to `dtype` alone moves the unmerged adapter's logits BEFORE: their relative
    difference to the same model in float32 (0 for float32).

    Why: a merged bf16 model differs from the unmerged one by bf16 rounding, which grows with depth
    (3e-2 on a random 16-layer 1B shape, 3e-6 in float32); a fixed limit refuses deep models that
    merged right. The limit scales with what rounding does to the unmerged model."""
    if dtype == "float32":
        return 0.0
    exact, _ = load_with_adapter(run_dir, base_path, manifest, "none", Precision(torch.device("cpu"), torch.float32))
    return relative_difference(logits_for(exact, tokenizer, texts), before)


def check_logits(before: list[torch.Tensor], after: list[torch.Tensor], dtype: str, floor: float = 0.0) -> None:
    """Merged within the fixed limit, or within twice what rounding alone does to the unmerged model."""
    diff = relative_difference(before, after)
    tolerance = max(SELF_CHECK_TOLERANCE[dtype], 2 * floor)
    click.echo(f"self-check: relative logit difference merged vs adapter = {diff:.2e} (limit {tolerance:.1e}"
               + (f": twice the {floor:.1e} that {dtype} rounding gives the unmerged adapter)" if floor else ")"))
    if not diff <= tolerance:
        raise UserError(f"merge self-check failed: relative difference {diff:.2e} exceeds {tolerance:.1e}; "
                        "nothing was written. Try --dtype float32.")


def merge_and_check(run_dir: Path, base_path: Path, manifest: dict, dtype: str):
    """The whole-model merge: the merged model, once its logits match the unmerged adapter's on
    marker sentences. Needs the base in memory; the streaming merge is the default."""
    click.echo(f"loading {base_path} in {dtype} and applying {run_dir}")
    texts = check_texts(manifest)
    precision = Precision(torch.device("cpu"), getattr(torch, dtype))  # never into 4-bit weights
    peft_model, tokenizer = load_with_adapter(run_dir, base_path, manifest, "none", precision)
    before = logits_for(peft_model, tokenizer, texts)
    floor = rounding_floor(run_dir, base_path, manifest, dtype, tokenizer, texts, before)
    merged = peft_model.merge_and_unload()
    check_logits(before, logits_for(merged, tokenizer, texts), dtype, floor)
    stop_at_book_end(merged.generation_config, manifest)
    return merged, tokenizer

"""The whole-model merge and the logit check: the merged model against the unmerged adapter.

The streaming merge (peftko.merge.streaming) is the default; this loads the whole model, merges
with peft's `merge_and_unload()` and compares logits on Korean sentences that contain the markers.
It is the fallback where streaming does not apply, and what `--full-check` runs after a streaming
merge. Never into 4-bit weights: merging into quantized weights is lossy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from peftko.core.errors import UserError
from peftko.core.paths import shown
from peftko.core.progress import say
from peftko.model.base import Precision, load_base
from peftko.model.inference import load_with_adapter
from peftko.merge.model_files import stop_at_book_end
from peftko.run.records import RunRecord

# bf16/fp16 round the merged weights once; fp32 is exact up to summation order.
SELF_CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-2}
CHECK_SENTENCES = [
    "{0}달빛 우체부{1}\n옛날 어느 마을에 작은 우체부가 살았습니다.",
    "{2}\"할머니, 오늘은 비가 올까요?\"{3} {4}똑똑, 누군가 문을 두드렸어요.",
]


def check_texts(record: RunRecord) -> list[str]:
    names = record.marker_names
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


def compare_logits(run_dir: Path, base_path: Path, record: RunRecord, dtype: str, stage: Path) -> None:
    """--full-check: the written model's logits against the unmerged adapter's, one model in memory at a time."""
    say(f"full check: loading {shown(base_path)} with the adapter, then the merged model")
    texts = check_texts(record)
    precision = Precision(torch.device("cpu"), getattr(torch, dtype))
    peft_model, tokenizer = load_with_adapter(run_dir, base_path, record, "none", precision)
    before = logits_for(peft_model, tokenizer, texts)
    del peft_model
    floor = rounding_floor(run_dir, base_path, record, dtype, tokenizer, texts, before)
    merged = load_base(stage, "none", precision)
    check_logits(before, logits_for(merged, tokenizer, texts), dtype, floor)


def rounding_floor(run_dir: Path, base_path: Path, record: RunRecord, dtype: str, tokenizer, texts: list[str],
                   before: list[torch.Tensor]) -> float:
    """How far rounding to `dtype` alone moves the unmerged adapter's logits BEFORE: their relative
    difference to the same model in float32 (0 for float32).

    Why: a merged bf16 model differs from the unmerged one by bf16 rounding, which grows with depth
    (3e-2 on a random 16-layer 1B shape, 3e-6 in float32); a fixed limit refuses deep models that
    merged right. The limit scales with what rounding does to the unmerged model."""
    if dtype == "float32":
        return 0.0
    exact, _ = load_with_adapter(run_dir, base_path, record, "none", Precision(torch.device("cpu"), torch.float32))
    return relative_difference(logits_for(exact, tokenizer, texts), before)


def check_logits(before: list[torch.Tensor], after: list[torch.Tensor], dtype: str, floor: float = 0.0) -> None:
    """Merged within the fixed limit, or within twice what rounding alone does to the unmerged model."""
    diff = relative_difference(before, after)
    tolerance = max(SELF_CHECK_TOLERANCE[dtype], 2 * floor)
    say(f"self-check: relative logit difference merged vs adapter = {diff:.2e} (limit {tolerance:.1e}"
        + (f": twice the {floor:.1e} that {dtype} rounding gives the unmerged adapter)" if floor else ")"))
    if not diff <= tolerance:
        raise UserError(f"merge self-check failed: relative difference {diff:.2e} exceeds {tolerance:.1e}; "
                        "nothing was written. Try --dtype float32.")


def merge_and_check(run_dir: Path, base_path: Path, record: RunRecord, dtype: str):
    """The whole-model merge: the merged model, once its logits match the unmerged adapter's on
    marker sentences. Needs the base in memory; the streaming merge is the default."""
    say(f"loading {shown(base_path)} in {dtype} and applying {run_dir}")
    texts = check_texts(record)
    precision = Precision(torch.device("cpu"), getattr(torch, dtype))  # never into 4-bit weights
    peft_model, tokenizer = load_with_adapter(run_dir, base_path, record, "none", precision)
    before = logits_for(peft_model, tokenizer, texts)
    floor = rounding_floor(run_dir, base_path, record, dtype, tokenizer, texts, before)
    merged = peft_model.merge_and_unload()
    check_logits(before, logits_for(merged, tokenizer, texts), dtype, floor)
    stop_at_book_end(merged.generation_config, record)
    return merged, tokenizer

"""The run identity: what `--resume` continues, and what it refuses.

OUTPUT/run.json records what the run trains on: the resolved config, a fingerprint of every
corpus file, the tokenizer with its markers and the base (peftko.run.identity). `--resume`
compares it with the present and names each difference; only keys that cannot change the trained
result in a way the user did not ask for (RESUMABLE_KEYS) may differ without --force.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftko.core.atomic import write_json_atomic
from peftko.core.config import LoraSettings, TrainConfig
from peftko.core.errors import UserError
from peftko.run.checkpoints import PREFIX, checkpoint_seal, latest_checkpoint
from peftko.run.layout import RUN_FILE
from peftko.run.records import BaseFingerprint, RunIdentity, RunIdentityRecord
from peftko.run.seal import check_checkpoint_seal

# Keys that may change on --resume without --force. max_steps/epochs extend or shorten a run (the
# LR schedule is recomputed for the new length from the resumed step on); the rest change how
# often or where things are logged or saved, or how (not what) is computed. data and model are compared
# by content (corpus and base fingerprints), so moving the files is not a change.
RESUMABLE_KEYS = frozenset({
    "output", "data", "model", "max_steps", "epochs", "logging_steps", "eval_steps", "save_steps",
    "save_total_limit", "max_bad_steps", "num_proc", "device", "attn_implementation",
    "gradient_checkpointing", "offload_checkpoints", "liger", "trust_remote_code", "allow_pickle", "skip_bad_files",
    "report_to",
})


# How a step's blocks are split: over processes (torchrun), micro-batches and accumulation. Only
# their product, the global batch, shapes the training and sets where a resumed run is in the
# data (the Trainer skips global_step x global batch blocks of the same shuffled order), so a run
# may resume on another number of GPUs when the product stays the same.
SPLIT_KEYS = frozenset({"batch_size", "grad_accum"})


def global_batch(identity: RunIdentity) -> int:
    batch_size, grad_accum, processes = _split(identity)
    return batch_size * grad_accum * processes


def describe_batch(identity: RunIdentity) -> str:
    batch_size, grad_accum, processes = _split(identity)
    return (f"{batch_size} x {grad_accum} accumulation x {processes} "
            f"process(es) = {global_batch(identity)}")


def _split(identity: RunIdentity) -> tuple[int, int, int]:
    """(batch_size, grad_accum, processes); a run recorded before processes were kept ran one."""
    c = {**TrainConfig().to_dict(), **identity.config}
    return c["batch_size"], c["grad_accum"], 1 if identity.processes is None else identity.processes


def write_run_record(output: Path, record: RunIdentityRecord) -> None:
    write_json_atomic(Path(output) / RUN_FILE, record.to_json())


def identity_changes(old: RunIdentity, new: RunIdentity) -> list[str]:
    """Each difference that makes a resumed run something other than a continuation."""
    changes = []
    # A key added to TrainConfig after the run started reads as its default: that is what ran.
    defaults = TrainConfig().to_dict()
    oc, nc = {**defaults, **old.config}, {**defaults, **new.config}
    for key in sorted(set(oc) | set(nc)):
        if key not in RESUMABLE_KEYS | SPLIT_KEYS and oc.get(key) != nc.get(key):
            changes.append(f"config {key}: {oc.get(key)!r} -> {nc.get(key)!r}")
    if global_batch(old) != global_batch(new):
        changes.append(f"global batch: {describe_batch(old)} -> {describe_batch(new)} blocks a step (a "
                       "different batch, and a different place in the data; keep the product the same, "
                       "e.g. half the processes and twice --grad-accum)")
    changes += _corpus_changes(old.corpus, new.corpus)
    if old.tokenizer != new.tokenizer:
        changes.append("tokenizer: the base tokenizer or the registered markers differ")
    if old.base != new.base:
        changes.append(_base_change(old.base, new.base))
    return changes


def _base_change(old: BaseFingerprint, new: BaseFingerprint) -> str:
    if old.scheme != new.scheme:
        return ("base model: this run recorded it by sampled parts of each weight file (an older peftko), "
                "which cannot be compared with a whole-file hash; if the base is unchanged, pass --force")
    old_weights, new_weights = old.weights or {}, new.weights or {}
    changed = sorted(k for k in set(old_weights) | set(new_weights) if old_weights.get(k) != new_weights.get(k))
    what = "config.json" if old.config_sha256 != new.config_sha256 else ""
    return "base model: " + ", ".join(filter(None, [what, *changed])) + " differ"


def _corpus_changes(old: list, new: list) -> list[str]:
    if old == new:
        return []
    o, n = {e[0]: e for e in old}, {e[0]: e for e in new}
    out = [f"corpus: {name} was added" for name in n if name not in o]
    out += [f"corpus: {name} was removed" for name in o if name not in n]
    out += [f"corpus: {name} changed (size {o[name][1]} -> {n[name][1]} bytes)"
            for name in n if name in o and o[name] != n[name]]
    return out or ["corpus: the files are read in a different order"]


# --- resume
def resume_point(output: Path) -> Path:
    """The latest complete checkpoint, or a UserError saying why there is none."""
    checkpoint = latest_checkpoint(output)
    if checkpoint is None:
        partial = [p.name for p in Path(output).glob(PREFIX + "*") if p.is_dir()]
        why = (f" ({', '.join(sorted(partial))} incomplete)" if partial else
               " (checkpoints are written every --save-steps, and when training is interrupted)")
        raise UserError(f"--resume: {output} holds no complete checkpoint to resume from{why}. "
                        "Start again without --resume (add --force to replace the directory).")
    check_checkpoint_seal(checkpoint, checkpoint_seal(checkpoint))
    return checkpoint


def check_resume(output: Path, identity: RunIdentity, force: bool) -> RunIdentityRecord | None:
    """Refuse a resume whose config, corpus or base changed, unless forced; returns run.json's record."""
    record = RunIdentityRecord.read(output)
    if record is None:
        if force:
            return None
        raise UserError(f"--resume: {output / RUN_FILE} is missing, so peftko cannot check that the "
                        "config, corpus and base are unchanged. Pass --force to resume anyway.")
    changes = identity_changes(record.identity, identity)
    if changes and not force:
        listing = "\n".join(f"  - {c}" for c in changes)
        raise UserError(f"--resume: this is not the run in {output}:\n{listing}\n"
                        "Undo the change, train into a new --output, or pass --force to continue anyway.")
    return record


def check_adapter_shape(checkpoint: Path, record: RunIdentityRecord | None, lora: LoraSettings,
                        token_rows: list[int]) -> None:
    """A checkpoint holds matrices of one LoRA rank, on one set of modules, and one set of token
    rows (the markers', and their syntax pieces'): no --force can load them into another shape, so a
    changed shape is always refused."""
    changes = _shape_changes(checkpoint, record, lora, sorted(token_rows))
    if changes:
        raise UserError(f"--resume cannot continue from {checkpoint}: the adapter's shape changed "
                        f"({'; '.join(changes)}), and the checkpoint holds matrices of the old shape "
                        "(--force cannot change that). Undo the change, or train into a new --output.")


def _shape_changes(checkpoint: Path, record: RunIdentityRecord | None, lora: LoraSettings,
                   token_rows: list[int]) -> list[str]:
    try:
        saved = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    changes = []
    if saved.get("r") not in (None, lora.r):
        changes.append(f"lora_r {saved['r']} -> {lora.r}")
    old_modules = record.identity.config.get("target_modules") if record else None
    if old_modules is not None and _modules(old_modules) != _modules(lora.target_modules):
        changes.append(f"target_modules {old_modules} -> {lora.target_modules}")
    rows = saved.get("trainable_token_indices") or []
    rows = sorted(next(iter(rows.values()), []) if isinstance(rows, dict) else rows)
    if "r" in saved and rows != token_rows:
        changes.append(f"trained token rows: {len(rows)} -> {len(token_rows)}" if len(rows) != len(token_rows)
                       else "trained token rows: other markers or token ids")
    return changes


def _modules(target_modules) -> set[str] | str:
    return target_modules if isinstance(target_modules, str) else set(target_modules)

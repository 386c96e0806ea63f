"""`peftko merge`: adapter + full-precision base -> one standalone Hugging Face model.

By default the merge streams (peftko.merge.streaming): tensor by tensor from the base's
safetensors files, grown exactly as training grew it (the row count is in peftko.json), the LoRA
deltas and marker rows applied, each written tensor checked against the base and the adapter, so
the whole model never sits in memory. Where that mapping does not hold (no safetensors, renamed
checkpoint keys, an adapter feature it does not handle) the whole model is loaded, merged by peft
and saved (peftko.merge.in_memory), as --full-check also does to compare the merged model's
logits with the unmerged adapter. Every byte of the base is hashed while the merge reads it and
checked against the run's record before the merged folder is published. The output is locked (a
sibling .NAME.peftko-lock) so two merges never write it at once; its place and ownership rules are
in peftko.merge.merged_folder.
"""

from __future__ import annotations

from pathlib import Path

from peftko.core.lock import hold
from peftko.core.paths import shown
from peftko.core.progress import say
from peftko.core.signals import Stopper
from peftko.merge import gguf
from peftko.merge.in_memory import compare_logits, merge_and_check
from peftko.merge.model_files import merged_tokenizer, write_config
from peftko.merge.merged_folder import check_output, claim_merged_folder, save_atomically
from peftko.merge.streaming import StreamingUnsupported, stream_merge
from peftko.model.built_base import Rebuilt, confirm
from peftko.model.run_facts import check_run_facts, run_base
from peftko.run.manifest import read_manifest, start_base_check
from peftko.run.records import MergeRecord, RunRecord


def run_merge(adapter_dir: str, output: str, base: str | None = None, dtype: str = "bfloat16",
              force: bool = False, full_check: bool = False, gguf_options: gguf.GgufOptions | None = None) -> int:
    stopper = Stopper("before the merged model was written; nothing was written.")
    with stopper.installed():
        try:
            merge_adapter(Path(adapter_dir), Path(output), base, dtype, force, stopper, full_check, gguf_options)
        except Rebuilt:  # a built base found damaged while merging (nothing published): merge its new files
            merge_adapter(Path(adapter_dir), Path(output), base, dtype, force, stopper, full_check, gguf_options)
    if stopper.signum:
        say(f"peftko: stopped by {stopper.name} after the merged model was written.", err=True)
    return stopper.exit_code


def merge_adapter(run_dir: Path, out: Path, base: str | None, dtype: str, force: bool, stopper: Stopper,
                  full_check: bool = False, gguf_options: gguf.GgufOptions | None = None) -> None:
    record = read_manifest(run_dir)  # the run's seal checked
    base_check = start_base_check(record, str(run_base(record, base)))  # every byte hashed while the merge reads it
    base_path = base_check.path
    check_output(out, {"the adapter directory": run_dir, "the base model": base_path})
    with hold(out.parent / f".{out.name}.peftko-lock", f"--output {out}"):
        claim_merged_folder(out, force)
        if gguf_options:  # llama.cpp refuses some tokenizers: know it before the merge, not after
            gguf.preflight(base_path, out, gguf_options)
        tokenizer = merged_tokenizer(run_dir, record)
        check_run_facts(run_dir, base_path, record, tokenizer)
        # The grammar travels with the merged model: generate --structure strict needs no run folder.
        mark = MergeRecord(adapter=str(run_dir.resolve()), base_model=str(base_path.resolve()), dtype=dtype,
                           grammar=record.grammar)
        write = streaming_writer(run_dir, base_path, record, dtype, full_check)

        def writer(stage: Path) -> None:
            write(stage)
            confirm(base_path)  # a base peftko built: its build record first (damaged: built again, Rebuilt)
            base_check.confirm()  # a base changed since training: refused before anything is published
        save_atomically(writer, tokenizer, out, mark, stopper, record)
        say(f"merged model written to {out} ({len(tokenizer)} tokens, markers are single tokens)")
        if gguf_options:
            gguf.export(out, record, gguf_options, stopper)


def streaming_writer(run_dir: Path, base_path: Path, record: RunRecord, dtype: str, full_check: bool):
    """What writes the merged model into the staging folder: the streaming merge, or, where it does
    not apply, the whole-model merge."""
    def write(stage: Path) -> None:
        say(f"merging {run_dir} into {shown(base_path)} in {dtype}, one tensor at a time")
        try:
            report = stream_merge(run_dir, base_path, record.vocab.rows_after, dtype, stage, record.trust_remote_code)
        except StreamingUnsupported as e:
            say(f"merging in memory instead: {e}")
            merged, _ = merge_and_check(run_dir, base_path, record, dtype)
            merged.save_pretrained(stage, safe_serialization=True, max_shard_size="5GB")
            return
        say(f"self-check: {report.tensors} tensors, {report.lora_targets} LoRA targets within "
                   f"{report.worst_probe_error:.1e} of Wx + scale*B(Ax) on random probes, "
                   f"{report.marker_rows} token rows (markers, their old pieces) equal to the trained rows, "
                   "every other weight the base's")
        write_config(base_path, record, dtype, stage)
        if full_check:
            compare_logits(run_dir, base_path, record, dtype, stage)

    return write

"""`peftko lora-train`: setup -> train -> save, as plain steps.

Order matters for the user: everything that can fail on bad input (config, corpus, markers,
output directory, base path) is checked before the model is loaded, so a typo costs seconds,
not a model load. One signal handler covers the whole command (peftko.core.signals), and the
output is locked (peftko.core.lock) before anything in it is judged or removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from peftko.core import distributed
from peftko.core.config import TrainConfig
from peftko.core.errors import PeerLost, UserError
from peftko.core.lock import hold
from peftko.core.paths import resolve_data_paths
from peftko.core.progress import say
from peftko.core.signals import Stopper
from peftko.corpus.reading import choose_markers, read_corpus
from peftko.model.adapters import check_target_modules
from peftko.model.base import (check_base_config, check_safetensors, pick_precision, resolve_model_path,
                               resolve_seq_len)
from peftko.model.memory_plan import read_config, shape_from_config
from peftko.model.dry_run import echo_plan
from peftko.run.checkpoints import latest_checkpoint
from peftko.run.layout import LOCK
from peftko.run.run_folder import claim_run_dir, prepare_output, remove_if_empty
from peftko.run.resume import resume_point
from peftko.train.disk import check_disk_space, output_bytes_needed, tokenizer_bytes
from peftko.train.session import Run, run_training


def run_lora_train(cfg: TrainConfig, resume: bool = False, force: bool = False, dry_run: bool = False,
                   strict: bool = False, num_processes: int | None = None) -> int:
    distributed.quiet_other_ranks()  # under torchrun / accelerate launch, rank 0 alone speaks

    stopper = Stopper("before training began; nothing in --output was changed. Run the same command "
                      "again to start.")
    with stopper.installed():
        try:
            return _run_lora_train(cfg, stopper, resume, force, dry_run, strict, num_processes)
        except RuntimeError as e:
            if not distributed.peer_lost(e):
                raise
            raise PeerLost(peer_lost_message(Path(cfg.output))) from None


def peer_lost_message(output: Path) -> str:
    checkpoint = latest_checkpoint(output)
    then = (f"{checkpoint} is kept: launch the same command with --resume to continue" if checkpoint else
            "no checkpoint was written yet: launch the same command again")
    return (f"another process of this run ended, so rank {distributed.rank()} stopped too (the launcher's "
            f"report names the process and why it ended); {then}.")


def training_inputs(cfg: TrainConfig, model_path: Path) -> dict[str, Path]:
    """What a training output must stay clear of (peftko.run.ownership.check_place): corpus and base."""
    return {f"--data {d}": d for d in resolve_data_paths(cfg.data)} | {"the base model": model_path}


def _run_lora_train(cfg: TrainConfig, stopper, resume: bool, force: bool, dry_run: bool, strict: bool,
                    num_processes: int | None = None) -> int:
    # The base first: a wrong, pickle-only or damaged base is named in a second, before the corpus pass.
    distributed.refuse_sharding()
    processes = planned_processes(num_processes, dry_run)
    model_path = resolve_model_path(cfg.model)
    warnings = check_base_config(model_path, cfg.base_loading(), dry_run=dry_run)
    seq_len = resolve_seq_len(model_path, cfg.seq_len)
    if seq_len != cfg.seq_len:
        say(f"seq_len: {seq_len} (auto: at most 2048 and the base's context)")
    cfg = dataclasses.replace(cfg, seq_len=seq_len)
    check_target_modules(model_path, cfg.target_modules, cfg.trust_remote_code)
    check_safetensors(model_path)
    precision = pick_precision(cfg.device, cfg.dtype)
    if dry_run:
        markers, _, _ = read_corpus_and_markers(cfg, strict)
        for w in warnings:
            say(f"warning: {w}")
        echo_plan(cfg, model_path, precision, markers=markers, processes=processes)
        return 0
    distributed.setup(precision.device.type)
    output = Path(cfg.output)
    created: list[Path] = []
    try:
        with contextlib.ExitStack() as lock:
            # The output before the corpus pass (a refusal costs seconds): rank 0 alone prepares, locks
            # and judges it; its refusal stops every rank.
            replace, created = distributed.on_main(
                lambda: claim_run_folder(output, model_path, cfg, resume, force, lock))
            check_disk_early(cfg, model_path, output)
            markers, files, grammar = read_corpus_and_markers(cfg, strict)
            run = Run(cfg, model_path, precision, output, markers, files, stopper, tuple(replace), grammar)
            return run_training(run, resume=resume, force=force)
    finally:
        # A run refused or stopped before its first write leaves no folder it made (the lock is gone by now).
        if distributed.is_main():
            remove_if_empty(created)


def read_corpus_and_markers(cfg: TrainConfig, strict: bool):
    """The corpus summary and refusals, then the markers to register: (markers, readable files, the
    markers' grammar learned in the same pass)."""
    report, files = read_corpus(cfg.corpus(), strict)
    return choose_markers(cfg.corpus(), report), files, report.grammar


def claim_run_folder(output: Path, model_path: Path, cfg: TrainConfig, resume: bool, force: bool,
                 lock: contextlib.ExitStack) -> tuple[list[Path], list[Path]]:
    """Create and lock --output (the lock held until `lock` closes): (what --force replaces, the
    folders this made)."""
    created = prepare_output(output, resume=resume, inputs=training_inputs(cfg, model_path))
    lock.enter_context(hold(output / LOCK, f"--output {output}"))
    if resume:
        resume_point(output)  # no complete checkpoint: said now, not after the corpus pass
    return claim_run_dir(output, resume=resume, force=force), created


def check_disk_early(cfg: TrainConfig, model_path: Path, output: Path) -> None:
    """The disk check that needs no corpus: LoRA's size from config.json and at most one checkpoint
    (the session checks again, exactly, once the model is built and the steps are known)."""
    try:
        shape = shape_from_config(read_config(model_path))
    except (KeyError, TypeError, ValueError):
        return  # an architecture the plan does not know: the exact check after loading stays
    steps = cfg.max_steps if cfg.max_steps > 0 else cfg.save_steps
    check_disk_space(output, output_bytes_needed(shape.lora_params(cfg.lora_r, cfg.target_modules), cfg.save_steps,
                                                 cfg.save_total_limit, tokenizer_bytes(model_path), steps))


def planned_processes(num_processes: int | None, dry_run: bool) -> int:
    """The data-parallel processes to plan for: the launcher's count, or --num-processes for a dry run."""
    launched = distributed.world_size()
    if num_processes is None:
        return launched
    if num_processes < 1:
        raise UserError(f"--num-processes {num_processes}: give 1 or more (one per GPU)")
    if not dry_run:
        raise UserError("--num-processes only plans a --dry-run; to train on N GPUs, launch with "
                        "`torchrun --nproc_per_node N -m peftko lora-train ...` (see the README)")
    if launched > 1 and num_processes != launched:
        raise UserError(f"--num-processes {num_processes} differs from the {launched} processes this "
                        "launcher started; drop the flag or launch that many")
    return num_processes

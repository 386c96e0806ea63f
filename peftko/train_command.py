"""`peftko lora-train`: setup -> train -> save, as plain steps.

Order matters for the user: everything that can fail on bad input (config, corpus, markers,
output directory, base path) is checked before the model is loaded, so a typo costs seconds,
not a model load. One signal handler covers the whole command (peftko.stopping), and the output
is locked (peftko.output_lock) before anything in it is judged or removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import click

from peftko.config import TrainConfig
from peftko.errors import UserError


def read_corpus(cfg: TrainConfig, strict: bool = False):
    """Scan the corpus, print the short summary, and refuse bad files unless told to skip them."""
    from peftko.corpus_report import scan_corpus
    from peftko.paths import resolve_data_paths

    explicit = [] if cfg.markers == "auto" else cfg.markers
    report = scan_corpus(resolve_data_paths(cfg.data), cfg.marker_pattern, cfg.jsonl_field,
                         doc_end_marker=cfg.doc_end_marker, known=explicit)
    click.echo(report.render_summary())
    warn_problems(cfg, report, strict)
    bad = report.bad_files
    if bad and not cfg.skip_bad_files:
        listing = "\n".join(f"  {f.path}: {f.describe()}" for f in bad)
        raise UserError(f"{len(bad)} corpus file(s) are not readable text:\n{listing}\n"
                        "Fix or remove them, or pass --skip-bad-files to train on the rest.")
    if bad:
        shown = ", ".join(f"{f.path} ({f.describe()})" for f in bad)
        click.echo(f"skipping {len(bad)} unreadable file(s): {shown}")
    files = [f for f in report.files if f.status == "ok"]
    if not files:
        raise UserError("no readable, non-empty corpus file was found in --data")
    return report, files


def warn_problems(cfg: TrainConfig, report, strict: bool) -> None:
    """Marker problems are learned as written: say so loudly, and refuse under --strict."""
    if not report.problems:
        return
    n = len(report.problems)
    where = " ".join(cfg.data)
    message = (f"{n} marker problem(s) in the corpus (first ones above); the model learns them as written. "
               f"See all with `peftko markers {where}`")
    if strict:
        raise UserError(message + "; fix them, or train without --strict.")
    click.secho(f"warning: {message}; --strict refuses to train on them.", fg="yellow", err=True)


def choose_markers(cfg: TrainConfig, report) -> list[str]:
    """The markers to register: found by the pattern, or the explicit list checked against the corpus."""
    if cfg.markers == "auto":
        markers = sorted(report.marker_counts)
        if not markers:
            click.echo(f"note: no marker matching {cfg.marker_pattern!r} was found; training plain LoRA")
    else:
        if any(not m.strip() for m in cfg.markers):
            raise UserError("markers: an explicit marker list must not contain empty strings")
        markers = list(dict.fromkeys(cfg.markers))
        warn_unlisted(markers, report)
    refuse_overlaps(markers)
    return markers


def warn_unlisted(markers: list[str], report) -> None:
    """An explicit list that misses the corpus, or that the corpus goes beyond, is probably a slip."""
    absent = [m for m in markers if not report.marker_counts.get(m)]
    unlisted = sorted(set(report.marker_counts) - set(markers))
    if absent:
        click.secho(f"warning: {', '.join(absent)} never occur(s) in the corpus: registered, but nothing "
                    "trains its row", fg="yellow", err=True)
    if unlisted:
        shown = ", ".join(f"{m} x{report.marker_counts[m]}" for m in unlisted)
        click.secho(f"warning: the corpus also uses {shown}, not in --markers: they stay split into pieces "
                    "(use --markers auto to register every marker found)", fg="yellow", err=True)


def refuse_overlaps(markers: list[str]) -> None:
    """One marker inside another (`SOUND|>` in `|SOUND|>`) makes the tokenizer's matching ambiguous."""
    pairs = [(a, b) for a in markers for b in markers if a != b and a in b]
    if pairs:
        listing = "; ".join(f"{a!r} is part of {b!r}" for a, b in pairs)
        raise UserError(f"markers overlap ({listing}): the shorter one would be cut out of the longer one's "
                        "occurrences, or never match. Keep only one of each pair.")


def run_lora_train(cfg: TrainConfig, resume: bool = False, force: bool = False, dry_run: bool = False,
                   strict: bool = False, num_processes: int | None = None) -> int:
    from peftko import distributed
    from peftko.stopping import Stopper

    distributed.quiet_other_ranks()  # under torchrun / accelerate launch, rank 0 alone speaks

    stopper = Stopper("before training began; nothing in --output was changed. Run the same command "
                      "again to start.")
    with stopper.installed():
        return _run_lora_train(cfg, stopper, resume, force, dry_run, strict, num_processes)


def training_inputs(cfg: TrainConfig, model_path: Path) -> dict[str, Path]:
    """What a training output must stay clear of (peftko.ownership.check_place): corpus and base."""
    from peftko.paths import resolve_data_paths

    return {f"--data {d}": d for d in resolve_data_paths(cfg.data)} | {"the base model": model_path}


def _run_lora_train(cfg: TrainConfig, stopper, resume: bool, force: bool, dry_run: bool, strict: bool,
                    num_processes: int | None = None) -> int:
    from peftko import distributed
    from peftko.base_model import (check_base_config, check_safetensors, pick_precision, resolve_model_path,
                                   resolve_seq_len)
    from peftko.training import check_target_modules

    # The base first: a wrong, pickle-only or damaged base is named in a second, before the corpus pass.
    distributed.refuse_sharding()
    processes = planned_processes(num_processes, dry_run)
    model_path = resolve_model_path(cfg.model)
    warnings = check_base_config(model_path, cfg, dry_run=dry_run)
    seq_len = resolve_seq_len(model_path, cfg.seq_len)
    if seq_len != cfg.seq_len:
        click.echo(f"seq_len: {seq_len} (auto: at most 2048 and the base's context)")
    cfg = dataclasses.replace(cfg, seq_len=seq_len)
    check_target_modules(model_path, cfg)
    check_safetensors(model_path)
    precision = pick_precision(cfg.device, cfg.dtype)
    report, files = read_corpus(cfg, strict)
    markers = choose_markers(cfg, report)
    if dry_run:
        from peftko.memory_plan import echo_plan

        for w in warnings:
            click.echo(f"warning: {w}")
        echo_plan(cfg, model_path, precision, markers=markers, processes=processes)
        return 0
    from peftko.session import TrainingSession

    distributed.setup(precision.device.type)
    output = Path(cfg.output)
    with contextlib.ExitStack() as lock:
        # Rank 0 alone prepares, locks and judges the output; its refusal stops every rank.
        replace = distributed.on_main(lambda: claim_output(output, model_path, cfg, resume, force, lock)) or []
        session = TrainingSession(cfg, model_path, precision, output, markers, files, stopper, replace)
        return session.run(resume=resume, force=force)


def claim_output(output: Path, model_path: Path, cfg: TrainConfig, resume: bool, force: bool,
                 lock: contextlib.ExitStack) -> list[Path]:
    """Create and lock --output (the lock held until `lock` closes); what --force replaces."""
    from peftko.output_lock import hold
    from peftko.run_dir import LOCK, claim_run_dir, prepare_output

    prepare_output(output, resume=resume, inputs=training_inputs(cfg, model_path))
    lock.enter_context(hold(output / LOCK, f"--output {output}"))
    return claim_run_dir(output, resume=resume, force=force)


def planned_processes(num_processes: int | None, dry_run: bool) -> int:
    """The data-parallel processes to plan for: the launcher's count, or --num-processes for a dry run."""
    from peftko import distributed

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

"""`peftko lora-train`: setup -> train -> save, as plain steps.

Order matters for the user: everything that can fail on bad input (config, corpus, markers,
output directory, base path) is checked before the model is loaded, so a typo costs seconds,
not a model load.
"""

from __future__ import annotations

from pathlib import Path

import click

from peftko.config import TrainConfig
from peftko.errors import UserError


def read_corpus(cfg: TrainConfig):
    """Scan the corpus, print the short summary, and refuse bad files unless told to skip them."""
    from peftko.corpus_report import scan_corpus
    from peftko.tiny_base import resolve_data_paths

    report = scan_corpus(resolve_data_paths(cfg.data), cfg.marker_pattern, cfg.jsonl_field,
                         doc_end_marker=cfg.doc_end_marker)
    click.echo(report.render_summary())
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


def choose_markers(cfg: TrainConfig, report) -> list[str]:
    if cfg.markers == "auto":
        markers = sorted(report.marker_counts)
        if not markers:
            click.echo(f"note: no marker matching {cfg.marker_pattern!r} was found; training plain LoRA")
        return markers
    empty = [m for m in cfg.markers if not m.strip()]
    if empty:
        raise UserError("markers: an explicit marker list must not contain empty strings")
    return list(dict.fromkeys(cfg.markers))


def run_lora_train(cfg: TrainConfig, resume: bool = False, force: bool = False, dry_run: bool = False) -> int:
    from peftko.base_model import check_seq_len, pick_precision, resolve_model_path

    report, files = read_corpus(cfg)
    markers = choose_markers(cfg, report)
    model_path = resolve_model_path(cfg.model)
    check_seq_len(model_path, cfg.seq_len)
    precision = pick_precision(cfg.device)
    if dry_run:
        from peftko.memory_plan import echo_plan

        echo_plan(cfg, model_path, precision, markers=markers)
        return 0
    from peftko.run_dir import prepare_output

    output = Path(cfg.output)
    prepare_output(output, resume=resume, force=force)
    from peftko.session import TrainingSession

    return TrainingSession(cfg, model_path, precision, output, markers, files).run(resume=resume, force=force)

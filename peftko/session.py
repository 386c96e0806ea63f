"""One training run, as the steps a reader expects: tokenizer -> data -> model -> train -> save."""

from __future__ import annotations

import os
from pathlib import Path

import click

from peftko import __version__
from peftko.config import TrainConfig
from peftko.report import write_report_or_warn
from peftko.training import passes_note


class TrainingSession:
    def __init__(self, cfg: TrainConfig, model_path: Path, precision, output: Path, markers, files,
                 stopper=None, replace: list[Path] = ()):
        from peftko.stopping import Stopper

        self.cfg, self.model_path, self.precision = cfg, model_path, precision
        self.output, self.markers, self.files = output, markers, files
        # stopper: the command's signal handler (peftko.stopping); replace: what --force removes
        self.stopper, self.replace = stopper or Stopper("before training began"), list(replace)
        self.results: dict = {}
        self.checkpoint: Path | None = None

    # --- setup
    def setup_tokenizer(self) -> None:
        from peftko.base_model import load_tokenizer
        from peftko.token_rows import register_markers

        self.tokenizer = load_tokenizer(self.model_path, self.cfg.trust_remote_code)
        # Untouched, for measuring the base as it was: bits per character compare across tokenizers.
        self.base_tokenizer = load_tokenizer(self.model_path, self.cfg.trust_remote_code)
        self.vocab_before = len(self.tokenizer)
        self.tokens = register_markers(self.tokenizer, self.markers)
        echo_markers(self.tokens)

    def setup_data(self) -> None:
        from peftko.packing import prepare_data
        from peftko.tiny_base import peftko_home

        self.data = prepare_data(self.files, self.tokenizer, self.cfg, peftko_home() / "datasets")
        d = self.data
        click.echo(
            f"data: {d.train_docs} training / {d.val_docs} held-out documents, {len(d.train)} blocks of "
            f"{d.block_len} tokens (seq_len {self.cfg.seq_len}), {d.real_token_fraction:.1%} real tokens"
            + (" (from cache)" if d.from_cache else "")
        )
        if note := passes_note(self.cfg, len(d.train)):
            click.echo(note)

    def setup_model(self) -> None:
        """Load the base, make room for the markers and start their rows, then wrap it."""
        from peftko.base_model import load_base
        from peftko.token_rows import embedding_modules, grow_embeddings, init_marker_rows

        cfg, dtype = self.cfg, str(self.precision.dtype).removeprefix("torch.")
        click.echo(f"loading {self.model_path} ({cfg.quant}, {dtype}, {self.precision.device})")
        model = load_base(self.model_path, cfg.quant, self.precision, cfg.attn_implementation,
                          cfg.trust_remote_code, cfg.allow_pickle)
        self.results["bpc_base"] = self.base_bpc(model)
        self.rows_before, self.rows_after = grow_embeddings(model, self.tokenizer)
        init_marker_rows(model, self.tokens)
        self.tied = embedding_modules(model)[2]
        self.setup_adapters(model)

    def setup_adapters(self, model) -> None:
        """LoRA + marker rows, fast kernels where available, and the collator for this attention."""
        import transformers

        from peftko.collate import PackedCollator
        from peftko.kernels import apply_fast_kernels
        from peftko.training import attach_adapters

        transformers.set_seed(self.cfg.seed)  # LoRA's random A matrices come next
        self.model = attach_adapters(model, self.cfg, self.tokens)
        self.results["kernels"] = apply_fast_kernels(self.model, self.cfg, self.precision)
        if self.results["kernels"]:
            click.echo(self.results["kernels"])
        self.collator = PackedCollator.for_model(self.tokenizer, model, self.precision.dtype)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        click.echo(f"trainable parameters: {self.trainable:,} "
                   f"(LoRA r={self.cfg.lora_r} + {len(self.tokens)} marker rows)")

    # --- measure, train, save
    def base_bpc(self, model) -> float | None:
        """Held-out bits per character of the base as loaded, with its own tokenizer (markers in pieces)."""
        from peftko.collate import PackedCollator
        from peftko.evaluation import bits_per_char, held_out_nll
        from peftko.packing import pack_texts

        if self.data.val_text is None:
            return None
        blocks = pack_texts(self.data.val_text["text"], self.base_tokenizer, self.cfg.seq_len)
        collator = PackedCollator.for_model(self.base_tokenizer, model, self.precision.dtype)
        nll, _ = held_out_nll(model, blocks, collator, self.cfg.batch_size, self.precision.device)
        return bits_per_char(nll, self.data.val_chars)

    def held_out_bpc(self) -> float | None:
        from peftko.evaluation import bits_per_char, held_out_nll

        if self.data.val is None:
            return None
        nll, _ = held_out_nll(self.model, self.data.val, self.collator, self.cfg.batch_size,
                              self.precision.device)
        return bits_per_char(nll, self.data.val_chars)

    def train(self) -> None:
        """trainer.train() with the stop-on-signal and non-finite guards around it."""
        from peftko.guards import NonFiniteGuard, StopOnSignal, check_finite_parameters
        from peftko.training import BeforeFirstStep, make_trainer

        self.guard = NonFiniteGuard(self.cfg.max_bad_steps, scaler_skips=self.precision.fp16)
        self.trainer = make_trainer(self.model, self.cfg, self.precision, self.output,
                                    self.data.train, self.data.val, self.collator,
                                    callbacks=[self.guard, StopOnSignal(self.stopper),
                                               BeforeFirstStep(self.commit)])
        with self.stopper.during("train"):
            resume = str(self.checkpoint) if self.checkpoint else None
            result = self.trainer.train(resume_from_checkpoint=resume)
        self.results["train_loss"] = result.training_loss
        self.results["steps"] = self.trainer.state.global_step
        self.results["skipped_steps"] = self.guard.skipped
        if self.guard.diverged:
            from peftko.checkpoints import latest_checkpoint

            raise self.guard.diverged_error(self.cfg, self.output, latest_checkpoint(self.output))
        check_finite_parameters(self.model, self.cfg)

    def commit(self) -> None:
        """The run's first write, once every check has passed and the trainer has loaded what it
        resumes from: remove what --force replaces, trim the log, record the run."""
        from peftko.checkpoints import step_of, trim_metrics, write_run_record
        from peftko.ownership import remove_entries
        from peftko.run_dir import MANIFEST

        remove_entries(self.replace, first=MANIFEST)
        extra = {"bpc_before": self.results["bpc_before"]}
        if self.checkpoint is not None:
            trim_metrics(self.output, step_of(self.checkpoint))
            extra["resumed_from"] = self.checkpoint.name
        write_run_record(self.output, self.identity, **extra)

    def evaluate(self) -> None:
        from peftko.training import final_eval_loss

        if self.data.val is not None:
            self.results["eval_loss"] = final_eval_loss(self.trainer)
        self.results["bpc_after"] = self.held_out_bpc()

    def manifest(self) -> dict:
        return {
            "peftko_version": __version__,
            "base_model": str(self.model_path.resolve()),
            "base_fingerprint": self.fingerprint,
            "markers": [t.to_json() for t in self.tokens],
            "vocab": {"tokenizer_before": self.vocab_before, "tokenizer_after": len(self.tokenizer),
                      "rows_before": self.rows_before, "rows_after": self.rows_after},
            "tied_embeddings": self.tied,
            "quantization": self.cfg.quant,
            "compute_dtype": str(self.precision.dtype).replace("torch.", ""),
            "config": self.cfg.to_dict(),
            "results": self.results,
        }

    def check_identity(self, force: bool) -> None:
        """What this run trains on; on --resume, refuse (before loading) a checkpoint of another
        shape, and, unless forced, a changed config, corpus or base. Nothing is written here."""
        from peftko.checkpoints import check_adapter_shape, check_resume, read_run_record, run_identity
        from peftko.run_dir import fingerprint_base

        self.fingerprint = fingerprint_base(self.model_path)
        self.identity = run_identity(self.cfg, self.files, self.tokenizer, self.fingerprint)
        if self.checkpoint is None:
            return
        check_adapter_shape(self.checkpoint, read_run_record(self.output), self.cfg, self.tokens)
        record = check_resume(self.output, self.identity, force)
        # Held-out bpc before training was measured on the untrained model: keep that number.
        self.results["bpc_before"] = record.get("bpc_before")
        click.echo(f"resuming from {self.checkpoint} (step {self.checkpoint.name.rsplit('-', 1)[1]})")

    def check_disk(self) -> None:
        from peftko.guards import check_disk_space, output_bytes_needed
        from peftko.training import planned_steps

        tokenizer_bytes = sum(f.stat().st_size for f in self.model_path.glob("*token*") if f.is_file())
        need = output_bytes_needed(self.trainable, self.cfg, tokenizer_bytes,
                                   planned_steps(self.cfg, len(self.data.train)))
        check_disk_space(self.output, need)

    def run(self, resume: bool = False, force: bool = False) -> int:
        from peftko.checkpoints import clean_leftovers, resume_point
        from peftko.guards import translate_oom

        self.checkpoint = resume_point(self.output) if resume else None  # before any slow step
        clean_leftovers(self.output)
        self.setup_tokenizer()
        self.setup_data()
        self.check_identity(force)
        with translate_oom(self.cfg, "loading the model"):
            self.setup_model()
        self.check_disk()
        with translate_oom(self.cfg, "training"):
            if self.checkpoint is None:
                self.results["bpc_before"] = self.held_out_bpc()
            self.train()
        if self.stopper.signum:
            return self.stop_with_checkpoint()
        return self.finish()

    def finish(self) -> int:
        """Final evaluation, then the adapter. A signal during the evaluation writes a checkpoint
        instead; one during the save lets the save complete, then stops."""
        from peftko.errors import Interrupted
        from peftko.guards import translate_oom
        from peftko.run_dir import save_final

        try:
            with self.stopper.during("evaluate"), translate_oom(self.cfg, "evaluating"):
                self.evaluate()
        except Interrupted:
            return self.stop_with_checkpoint()
        with self.stopper.during("save"):
            log_bpc(self.output, self.results)
            save_final(self.output, self.model, self.tokenizer, self.manifest())
        echo_done(self.output, self.results)
        write_report_or_warn(self.output)
        if self.stopper.signum:
            click.echo(f"peftko: stopped by {self.stopper.name} after the adapter was written; "
                       "the run is complete.", err=True)
        return self.stopper.exit_code

    def stop_with_checkpoint(self) -> int:
        with self.stopper.during("save"):
            self.trainer.save_checkpoint_now()
        return echo_stopped(self.output, self.stopper)


def echo_stopped(output: Path, stopper) -> int:
    from peftko.checkpoints import latest_checkpoint
    from peftko.guards import resume_command

    click.echo(f"peftko: stopped by {stopper.name}; checkpoint written to {latest_checkpoint(output)}.\n"
               f"Continue with: {resume_command(output)}", err=True)
    return stopper.exit_code


def echo_markers(tokens) -> None:
    if not tokens:
        return
    click.echo("markers registered (one token each):")
    width = max(len(t.marker) for t in tokens)
    for t in tokens:
        click.echo(f"  {t.marker:<{width}}  {len(t.pieces)} pieces before -> id {t.id}")


def log_bpc(output: Path, results: dict) -> None:
    import json

    if results.get("bpc_before") is None:
        return
    record = {"step": results["steps"], "bpc_base": results.get("bpc_base"),
              "bpc_before": results["bpc_before"], "bpc_after": results["bpc_after"]}
    with open(output / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def echo_done(output: Path, results: dict) -> None:
    if results.get("bpc_before") is not None:
        base = results.get("bpc_base")
        click.echo("held-out bits per character: "
                   + (f"base model {base:.3f} (its own tokenizer), " if base is not None else "")
                   + f"{results['bpc_before']:.3f} with the markers registered, "
                   f"{results['bpc_after']:.3f} after training")
    click.echo(f"adapter written to {output}{os.sep} (adapter_model.safetensors, tokenizer, peftko.json)")
    click.echo(f"next: peftko merge {output} --output {output}-merged")

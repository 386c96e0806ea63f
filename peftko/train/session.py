"""One training run, as the steps a reader expects: tokenizer -> data -> model -> train -> save.

Each step takes what it needs and returns what it makes; only `setup()` and `run()` store
results on the session, so the order of the steps is the order of the lines there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from peftko import __version__
from peftko.core import distributed
from peftko.core.config import DEFAULT_DOC_END, TrainConfig
from peftko.core.errors import Interrupted
from peftko.core.paths import peftko_home
from peftko.core.signals import Stopper
from peftko.evaluate.heldout import bits_per_char, held_out_nll
from peftko.evaluate.structure import SampleOptions, describe, structure_score
from peftko.model.base import load_tokenizer, terms_files
from peftko.model.builder import TrainableModel, load, make_trainable
from peftko.model.reload import adapter_info, stop_ids
from peftko.model.token_rows import register_markers, syntax_pieces, trained_rows
from peftko.run.checkpoints import clean_leftovers, latest_checkpoint, step_of, trim_metrics
from peftko.run.identity import fingerprint_base, run_identity
from peftko.run.layout import MANIFEST, METRICS
from peftko.run.output import save_final
from peftko.run.ownership import remove_entries
from peftko.run.plot import write_report_or_warn
from peftko.run.records import CorpusPart, CorpusRecord, Results, RunIdentity, RunIdentityRecord, RunRecord, Vocab
from peftko.run.resume import check_adapter_shape, check_resume, resume_point, write_run_record
from peftko.train.best import KeepBest
from peftko.train.callbacks import BeforeFirstStep, StopOnSignal
from peftko.train.collate import PackedCollator
from peftko.train.disk import check_disk_space, output_bytes_needed, tokenizer_bytes
from peftko.train.gpu_memory import peak_gib, reset_peak
from peftko.train.nonfinite import NonFiniteGuard, check_finite_parameters
from peftko.train.oom import translate_oom
from peftko.train.packing import PackedData, pack_texts, prepare_data
from peftko.train.rerun import resume_command
from peftko.train.trainer import final_eval_loss, make_trainer, passes_note, planned_steps, short_data_note


class TrainingSession:
    def __init__(self, cfg: TrainConfig, model_path: Path, precision, output: Path, markers, files,
                 stopper=None, replace: list[Path] = ()):
        self.cfg, self.model_path, self.precision = cfg, model_path, precision
        self.output, self.markers, self.files = output, markers, files
        # stopper: the command's signal handler (peftko.core.signals); replace: what --force removes
        self.stopper, self.replace = stopper or Stopper("before training began"), list(replace)
        self.results = Results()
        self.checkpoint: Path | None = None  # what --resume continues from
        self.keeper: KeepBest | None = None  # the lowest-held-out-loss weights (keep_best)

    def run(self, resume: bool = False, force: bool = False) -> int:
        self.checkpoint = resume_point(self.output) if resume else None  # before any slow step
        distributed.on_main(lambda: clean_leftovers(self.output))
        self.setup(force)
        self.check_disk()
        self.results.gpu_peak_load_gib = peak_gib(self.precision.device)
        reset_peak(self.precision.device)
        with translate_oom(self.cfg.memory_levers(), "training"):
            if self.checkpoint is None:
                self.results.bpc_before = self.held_out_bpc()
            self.guard = NonFiniteGuard(self.cfg.max_bad_steps, scaler_skips=self.precision.fp16)
            self.keeper = KeepBest(self.model) if self.cfg.keep_best and self.data.val is not None else None
            self.trainer = self.make_trainer(self.guard)
            self.results.train_loss, self.results.steps, self.results.tokens_seen = self.train(self.trainer,
                                                                                                self.guard)
            self.results.skipped_steps = self.guard.skipped
        self.results.gpu_peak_train_gib = peak_gib(self.precision.device)
        if self.results.gpu_peak_train_gib is not None:
            click.echo(f"GPU memory: peak {self.results.gpu_peak_load_gib} GiB while loading, "
                       f"{self.results.gpu_peak_train_gib} GiB while training (tensors; --dry-run predicts both)")
        if self.stopper.agreed():
            return self.stop_with_checkpoint()
        return self.finish()

    # --- setup
    def setup(self, force: bool = False) -> None:
        """Tokenizer, data, the run's identity (checked against --resume), then the model."""
        self.tokenizer, self.vocab_before, self.tokens = self.setup_tokenizer()
        self.data = self.setup_data(self.tokenizer)
        self.fingerprint = fingerprint_base(self.model_path)
        # processes: data-parallel runs resume on another count only with the same global batch
        self.identity = run_identity(self.cfg.to_dict(), self.files, self.tokenizer, self.fingerprint,
                                     distributed.world_size())
        if self.checkpoint is not None:
            # Held-out bpc before training was measured on the untrained model: keep that number.
            self.results.bpc_before = self.check_identity(self.checkpoint, self.identity, force)
        with translate_oom(self.cfg.memory_levers(), "loading the model"):
            self.results.bpc_base, self.built = self.setup_model(self.tokenizer, self.tokens)
        self.results.kernels = self.built.kernels
        self.model = self.built.model
        self.collator = PackedCollator.for_model(self.tokenizer, self.model.get_base_model(), self.precision.dtype)

    def setup_tokenizer(self):
        """The tokenizer with the markers registered, its size before, and the marker tokens."""
        tokenizer = load_tokenizer(self.model_path, self.cfg.trust_remote_code)
        vocab_before = len(tokenizer)
        tokens = register_markers(tokenizer, self.markers)
        echo_markers(tokens)
        return tokenizer, vocab_before, tokens

    def setup_data(self, tokenizer) -> PackedData:
        # Data-parallel: rank 0 builds the cache, the other ranks then read it (never build it twice).
        d = distributed.main_first(
            lambda: prepare_data(self.files, tokenizer, self.cfg.blocks(), peftko_home() / "datasets"))
        click.echo(
            f"data: {d.train_docs} training / {d.val_docs} held-out documents, {len(d.train)} blocks of "
            f"{d.block_len} tokens (seq_len {self.cfg.seq_len}), {d.real_token_fraction:.1%} real tokens"
            + (" (from cache)" if d.from_cache else "")
        )
        if d.held_out:
            click.echo(f"held out: {shown(d.held_out)}")
        processes = distributed.world_size()
        for note in (short_data_note(self.cfg.steps(), len(d.train), processes),
                     passes_note(self.cfg.steps(), len(d.train), processes)):
            if note:
                click.echo(note)
        return d

    def check_identity(self, checkpoint: Path, identity: RunIdentity, force: bool) -> float | None:
        """On --resume, refuse (before loading) a checkpoint of another shape, and, unless forced, a
        changed config, corpus or base. Nothing is written here. Returns the recorded bpc_before."""
        rows = trained_rows(self.tokens, syntax_pieces(self.tokenizer, self.tokens))
        check_adapter_shape(checkpoint, RunIdentityRecord.read(self.output), self.cfg.lora(), rows)
        record = check_resume(self.output, identity, force)
        click.echo(f"resuming from {checkpoint} (step {step_of(checkpoint)})")
        return record.bpc_before if record else None

    def setup_model(self, tokenizer, tokens) -> tuple[float | None, TrainableModel]:
        """Load the base, measure it as loaded, then make it trainable."""
        cfg = self.cfg
        click.echo(f"loading {self.model_path} ({cfg.quant}, {self.precision.dtype_name}, {self.precision.device})")
        base = load(self.model_path, cfg.base_loading(), self.precision)
        bpc_base = self.base_bpc(base)
        built = make_trainable(base, tokenizer, tokens, cfg.lora(), self.precision, cfg.liger, cfg.seed)
        if built.kernels:
            click.echo(built.kernels)
        click.echo(f"trainable parameters: {built.trainable_params:,} "
                   f"(LoRA r={cfg.lora_r} + {len(tokens)} marker rows{pieces_note(built.piece_rows)})")
        return bpc_base, built

    def check_disk(self) -> None:
        need = output_bytes_needed(self.built.trainable_params, self.cfg.save_steps, self.cfg.save_total_limit,
                                   tokenizer_bytes(self.model_path),
                                   planned_steps(self.cfg.steps(), len(self.data.train), distributed.world_size()))
        check_disk_space(self.output, need)

    # --- measure, train, save
    def base_bpc(self, model) -> float | None:
        """Held-out bits per character of the base as loaded, with its own tokenizer (markers in pieces:
        bits per character compare across tokenizers). Loaded here, only with a held-out split: a
        262k-entry tokenizer takes seconds to load."""
        if self.data.val_text is None:
            return None
        base_tokenizer = load_tokenizer(self.model_path, self.cfg.trust_remote_code)
        blocks = pack_texts(self.data.val_text["text"], base_tokenizer, self.cfg.seq_len)
        collator = PackedCollator.for_model(base_tokenizer, model, self.precision.dtype)
        return self.shared_bpc(model, blocks, collator)

    def held_out_bpc(self) -> float | None:
        if self.data.val is None:
            return None
        return self.shared_bpc(self.model, self.data.val, self.collator)

    def shared_bpc(self, model, blocks, collator) -> float:
        """Bits per character over all the held-out blocks: data-parallel, each rank measures its
        share and the sums are added, so every block counts once (the unwrapped model: no DDP sync)."""
        nll, _ = held_out_nll(model, distributed.my_share(blocks), collator, self.cfg.batch_size,
                              self.precision.device)
        (nll,) = distributed.sum_over_ranks(nll)
        return bits_per_char(nll, self.data.val_chars)

    def make_trainer(self, guard):
        keep = [self.keeper] if self.keeper else []
        return make_trainer(self.model, self.cfg, self.precision, self.output, self.data.train, self.data.val,
                            self.collator, callbacks=[guard, StopOnSignal(self.stopper), BeforeFirstStep(self.commit),
                                                      *keep])

    def train(self, trainer, guard) -> tuple[float, int, int]:
        """trainer.train() with the stop-on-signal and non-finite guards around it: (loss, steps, tokens)."""
        with self.stopper.during("train"):
            resume = str(self.checkpoint) if self.checkpoint else None
            result = trainer.train(resume_from_checkpoint=resume)
        if guard.diverged:
            raise guard.diverged_error(self.cfg.lr, self.cfg.embedding_lr, self.output, latest_checkpoint(self.output))
        check_finite_parameters(self.model, self.cfg.lr, self.cfg.embedding_lr)
        return result.training_loss, trainer.state.global_step, int(trainer.state.num_input_tokens_seen or 0)

    def commit(self) -> None:
        """The run's first write, once every check has passed and the trainer has loaded what it
        resumes from: remove what --force replaces, trim the log, record the run (rank 0 only)."""
        if not distributed.is_main():
            return
        remove_entries(self.replace, first=MANIFEST)
        if self.checkpoint is not None:
            trim_metrics(self.output, step_of(self.checkpoint))
        resumed_from = self.checkpoint.name if self.checkpoint is not None else None
        write_run_record(self.output, RunIdentityRecord(self.identity, self.results.bpc_before, resumed_from))

    def evaluate(self) -> tuple[float | None, float | None]:
        """(eval_loss, bpc_after) on the held-out data, None without it; first, with keep_best, the
        weights of the lowest held-out loss are put back if a later evaluation was worse."""
        if self.data.val is None:
            return None, None
        kept = self.keeper.restore() if self.keeper else None
        if kept is None:
            return final_eval_loss(self.trainer), self.held_out_bpc()
        self.results.kept_step = kept.step
        last_loss, last_step = self.keeper.last
        distributed.on_main(lambda: click.echo(
            f"kept the adapter of step {kept.step}, the lowest held-out loss ({kept.loss:.4f}; step {last_step}: "
            f"{last_loss:.4f}). --no-keep-best keeps the last step's"))
        return kept.loss, self.held_out_bpc()

    def sampled_structure(self) -> dict | None:
        """With `samples`: continuations of the held-out documents by the weights being saved, scored
        as `peftko eval --samples` scores them (pairs closed, book ended, whole markers only)."""
        if not self.cfg.samples or self.data.val_text is None:
            return None
        info = adapter_info(self.output, self.model_path, self.cfg.quant, self.precision, self.markers,
                            self.cfg.doc_end_marker)
        info.stop_ids = stop_ids(self.model, self.tokenizer, info.doc_end_marker)
        self.model.eval()  # no dropout in the samples; training is over
        score = structure_score(self.model, self.tokenizer, info, list(self.data.val_text["text"]), list(self.markers),
                                SampleOptions(self.cfg.samples, self.cfg.sample_tokens),
                                self.cfg.doc_end_marker or DEFAULT_DOC_END,
                                self.cfg.marker_pattern, self.cfg.seed)
        distributed.on_main(lambda: click.echo(describe(score)))
        return score

    def manifest(self) -> RunRecord:
        """What peftko.json records (save_final adds the files it wrote and the adapter's hash)."""
        built = self.built
        return RunRecord(
            peftko_version=__version__,
            base_model=str(self.model_path.resolve()),
            base_fingerprint=self.fingerprint,
            base_terms=terms_files(self.model_path),
            markers=[t.entry() for t in built.tokens],
            marker_piece_rows=built.piece_rows,
            vocab=Vocab(tokenizer_before=self.vocab_before, tokenizer_after=len(self.tokenizer),
                        rows_before=built.rows_before, rows_after=built.rows_after),
            tied_embeddings=built.tied,
            quantization=self.cfg.quant,
            compute_dtype=self.precision.dtype_name,
            config=self.cfg.to_dict(),
            corpus=corpus_record(self.data),
            results=self.results,
        )

    def finish(self) -> int:
        """Final evaluation, then the adapter. A signal during the evaluation writes a checkpoint
        instead; one during the save lets the save complete, then stops."""
        # Data-parallel, the evaluation is shared: no rank may leave it alone, so a signal waits for its end.
        phase = "evaluate together" if distributed.active() else "evaluate"
        try:
            with self.stopper.during(phase), translate_oom(self.cfg.memory_levers(), "evaluating"):
                self.results.eval_loss, self.results.bpc_after = self.evaluate()
                self.results.structure = self.sampled_structure()
        except Interrupted:
            return self.stop_with_checkpoint()
        if distributed.active() and self.stopper.agreed():
            return self.stop_with_checkpoint()
        if not distributed.is_main():
            return self.stopper.exit_code  # rank 0 writes the adapter and the report
        with self.stopper.during("save"):
            log_bpc(self.output, self.results)
            save_final(self.output, self.model, self.tokenizer, self.manifest())
        echo_done(self.output, self.results, registered=bool(self.tokens))
        write_report_or_warn(self.output)
        if self.stopper.signum:
            click.echo(f"peftko: stopped by {self.stopper.name} after the adapter was written; "
                       "the run is complete.", err=True)
        return self.stopper.exit_code

    def stop_with_checkpoint(self) -> int:
        with self.stopper.during("save"):
            self.trainer.save_checkpoint_now()
        return echo_stopped(self.output, self.stopper)


def corpus_record(d: PackedData) -> CorpusRecord:
    """What the model card reports of the corpus: the whole, and the training and held-out parts."""
    return CorpusRecord(d.train_docs + d.val_docs, d.train_chars + d.val_chars,
                        training=CorpusPart(d.train_docs, d.train_chars, d.train_tokens),
                        held_out=CorpusPart(d.val_docs, d.val_chars, d.val_tokens, d.held_out))


def shown(names: list[str], at_most: int = 10) -> str:
    more = f" and {len(names) - at_most} more (all in peftko.json)" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def echo_stopped(output: Path, stopper) -> int:
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


def pieces_note(rows: list[int]) -> str:
    return f" + {len(rows)} rows of their old pieces" if rows else ""


def log_bpc(output: Path, results: Results) -> None:
    if results.bpc_before is None:
        return
    record = {"step": results.steps, "bpc_base": results.bpc_base,
              "bpc_before": results.bpc_before, "bpc_after": results.bpc_after}
    with open(output / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def echo_done(output: Path, results: Results, registered: bool = True) -> None:
    if results.bpc_before is not None:
        base = results.bpc_base
        before = "with the markers registered" if registered else "before training"
        click.echo("held-out bits per character: "
                   + (f"base model {base:.3f} (its own tokenizer), " if base is not None else "")
                   + f"{results.bpc_before:.3f} {before}, {results.bpc_after:.3f} after training")
    click.echo(f"adapter written to {output}{os.sep} (adapter_model.safetensors, tokenizer, peftko.json)")
    click.echo(f"next: peftko merge {output} --output {output}-merged")

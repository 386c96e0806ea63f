"""One training run, as the steps a reader expects: tokenizer -> data -> model -> train -> save.

Each step is a function that takes what it needs and returns what it makes, as a frozen record
(Run, Setup, Trained, Evaluation, Results): nothing is stored on the side, so the order of the
steps is the order of the lines in run_training().
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from peftko import __version__
from peftko.core import distributed
from peftko.core.config import DEFAULT_DOC_END, TrainConfig
from peftko.core.errors import Interrupted
from peftko.core.paths import peftko_home
from peftko.core.paths import shown as shown_path
from peftko.core.progress import say, warn
from peftko.core.signals import Stopper
from peftko.evaluate.heldout import bits_per_char, held_out_nll
from peftko.evaluate.structure import SampleOptions, describe, structure_score
from peftko.model.base import Precision, load_tokenizer, terms_files
from peftko.model.builder import TrainableModel, load, make_trainable
from peftko.model.built_base import Rebuilt, confirm
from peftko.model.inference import adapter_info, stop_ids
from peftko.model.token_rows import register_markers, piece_rows, trained_rows
from peftko.run.checkpoints import clean_leftovers, latest_checkpoint, step_of, trim_metrics
from peftko.run.identity import run_identity, start_fingerprint
from peftko.run.layout import MANIFEST, METRICS
from peftko.run.run_folder import save_final
from peftko.run.ownership import remove_entries
from peftko.run.plot import write_report_or_warn
from peftko.run.records import (BaseFingerprint, CorpusPart, CorpusRecord, Results, RunIdentity, RunIdentityRecord,
                                RunRecord, Vocab)
from peftko.run.grammar_record import MarkerGrammar
from peftko.run.resume import check_adapter_shape, check_resume, resume_point, write_run_record
from peftko.train.best import KeepBest, back_to_registered
from peftko.train.caches import token_cache_note
from peftko.train.callbacks import BeforeFirstStep, StopOnSignal
from peftko.data.collate import PackedCollator
from peftko.train.disk import check_disk_space, output_bytes_needed, tokenizer_bytes
from peftko.train.gpu_memory import peak_gib, reset_peak
from peftko.train.nonfinite import NonFiniteGuard, check_finite_parameters
from peftko.train.oom import translate_oom
from peftko.data.packing import PackedData, pack_texts, prepare_data
from peftko.train.rerun import resume_command
from peftko.train.trainer import (final_eval_loss, make_trainer, passes_note, planned_steps, short_data_note,
                                  warmup_note)


@dataclass(frozen=True)
class Run:
    """What the command resolved before anything slow: the run's inputs, fixed for its whole length."""

    cfg: TrainConfig
    model_path: Path
    precision: Precision
    output: Path
    markers: list[str]
    files: list
    stopper: Stopper = field(default_factory=lambda: Stopper("before training began"))  # the command's handler
    replace: tuple[Path, ...] = ()  # what --force removes, at the run's first write
    grammar: MarkerGrammar | None = None  # the corpus's marker grammar (peftko.corpus.grammar), kept in peftko.json


@dataclass(frozen=True)
class Setup:
    """What setup() makes: the tokenizer with its markers, the packed data, the run's identity, the
    trainable model (and the base's held-out bits per character, measured on it as loaded)."""

    tokenizer: object
    vocab_before: int
    tokens: list  # the registered markers (model.token_rows.MarkerToken)
    data: PackedData
    fingerprint: BaseFingerprint
    identity: RunIdentity
    recorded_bpc_before: float | None  # --resume: measured on the untrained model, kept from run.json
    bpc_base: float | None
    built: TrainableModel
    collator: PackedCollator

    @property
    def model(self):
        return self.built.model


@dataclass(frozen=True)
class Trained:
    """What train() leaves: the trainer (for a checkpoint on a stop) and what the steps measured."""

    trainer: object
    keeper: KeepBest | None
    train_loss: float
    steps: int
    tokens_seen: int
    skipped_steps: int


@dataclass(frozen=True)
class Evaluation:
    eval_loss: float | None = None
    bpc_after: float | None = None
    kept_step: int | None = None
    structure: dict | None = None


def run_training(run: Run, resume: bool = False, force: bool = False) -> int:
    """The steps of a run in order: setup, the base measured, train, evaluate, save."""
    checkpoint = resume_point(run.output) if resume else None  # before any slow step
    distributed.on_main(lambda: clean_leftovers(run.output))
    s = setup(run, checkpoint, force)
    check_disk(run, s)
    load_peak = peak_gib(run.precision.device)
    reset_peak(run.precision.device)
    with translate_oom(run.cfg.memory_levers(), "training"):
        bpc_before = s.recorded_bpc_before if checkpoint is not None else held_out_bpc(run, s)
        trained = train(run, s, checkpoint, bpc_before)
    train_peak = peak_gib(run.precision.device)
    if train_peak is not None:
        say(f"GPU memory: peak {load_peak} GiB while loading, "
            f"{train_peak} GiB while training (tensors; --dry-run predicts both)")
    if run.stopper.agreed():
        return stop_with_checkpoint(run, trained.trainer)
    results = Results(bpc_base=s.bpc_base, kernels=s.built.kernels, bpc_before=bpc_before,
                      train_loss=trained.train_loss, steps=trained.steps, tokens_seen=trained.tokens_seen,
                      skipped_steps=trained.skipped_steps, gpu_peak_load_gib=load_peak, gpu_peak_train_gib=train_peak)
    return finish(run, s, trained, results)


# --- setup
def setup(run: Run, checkpoint: Path | None = None, force: bool = False) -> Setup:
    """Tokenizer, data, the run's identity (checked against --resume), then the model."""
    try:
        return _setup(run, checkpoint, force)
    except Rebuilt:  # a built base found damaged is built again: all that was read from it, again
        return _setup(run, checkpoint, force)


def _setup(run: Run, checkpoint: Path | None, force: bool) -> Setup:
    # Every byte of the base is hashed in the background while the tokenizer, the data and the model
    # load (one read of the disk: the loader finds the pages the hash read); a resume needs it first.
    pending = start_fingerprint(run.model_path)
    tokenizer, vocab_before, tokens = setup_tokenizer(run)
    data = setup_data(run, tokenizer)

    def identity_of(fingerprint):
        # processes: data-parallel runs resume on another count only with the same global batch
        return run_identity(run.cfg.to_dict(), run.files, tokenizer, fingerprint, distributed.world_size())

    identity = recorded = None
    if checkpoint:
        confirm(run.model_path)
        identity = identity_of(pending.result())
        recorded = check_identity(run, checkpoint, identity, tokenizer, tokens, force)
    with translate_oom(run.cfg.memory_levers(), "loading the model"):
        bpc_base, built = setup_model(run, tokenizer, tokens, data)
    fingerprint = pending.result()
    identity = identity or identity_of(fingerprint)
    collator = PackedCollator.for_model(tokenizer, built.model.get_base_model(), run.precision.dtype)
    return Setup(tokenizer, vocab_before, tokens, data, fingerprint, identity, recorded, bpc_base, built, collator)


def setup_tokenizer(run: Run):
    """The tokenizer with the markers registered, its size before, and the marker tokens."""
    tokenizer = load_tokenizer(run.model_path, run.cfg.trust_remote_code)
    vocab_before = len(tokenizer)
    tokens = register_markers(tokenizer, run.markers)
    echo_markers(tokens)
    return tokenizer, vocab_before, tokens


def setup_data(run: Run, tokenizer) -> PackedData:
    # Data-parallel: rank 0 builds the cache, the other ranks then read it (never build it twice).
    d = distributed.main_first(
        lambda: prepare_data(run.files, tokenizer, run.cfg.blocks(), peftko_home() / "datasets"))
    say(
        f"data: {d.train_docs} training / {d.val_docs} held-out documents, {len(d.train)} blocks of "
        f"{d.block_len} tokens (seq_len {run.cfg.seq_len}), {d.real_token_fraction:.1%} real tokens"
        + (" (from cache)" if d.from_cache else "")
    )
    if d.held_out:
        say(f"held out: {shown(d.held_out)}")
    note = None if d.from_cache or not distributed.is_main() else token_cache_note(d.cache_dir)
    if note:
        say(note)
    processes = distributed.world_size()
    for note in (short_data_note(run.cfg.steps(), len(d.train), processes),
                 passes_note(run.cfg.steps(), len(d.train), processes),
                 warmup_note(run.cfg, len(d.train), processes)):
        if note:
            say(note)
    return d


def check_identity(run: Run, checkpoint: Path, identity: RunIdentity, tokenizer, tokens,
                   force: bool) -> float | None:
    """On --resume, refuse (before loading) a checkpoint of another shape, and, unless forced, a
    changed config, corpus or base. Nothing is written here. Returns the recorded bpc_before."""
    rows = trained_rows(tokens, piece_rows(tokenizer, tokens))
    check_adapter_shape(checkpoint, RunIdentityRecord.read(run.output), run.cfg.lora(), rows)
    record = check_resume(run.output, identity, force)
    say(f"resuming from {checkpoint} (step {step_of(checkpoint)})")
    return record.bpc_before if record else None


def setup_model(run: Run, tokenizer, tokens, data: PackedData) -> tuple[float | None, TrainableModel]:
    """Load the base, measure it as loaded, then make it trainable."""
    cfg = run.cfg
    say(f"loading {shown_path(run.model_path)} ({cfg.quant}, {run.precision.dtype_name}, {run.precision.device})")
    base = load(run.model_path, cfg.base_loading(), run.precision)
    confirm(run.model_path)  # a built base's bytes, hashed while it loaded, before any use
    bpc_base = base_bpc(run, base, data)
    built = make_trainable(base, tokenizer, tokens, cfg.lora(), run.precision, cfg.liger, cfg.seed)
    if built.kernels:
        say(built.kernels)
    say(f"trainable parameters: {built.trainable_params:,} "
        f"(LoRA r={cfg.lora_r} + {len(tokens)} marker rows{pieces_note(built.piece_rows)})")
    return bpc_base, built


def check_disk(run: Run, s: Setup) -> None:
    need = output_bytes_needed(s.built.trainable_params, run.cfg.save_steps, run.cfg.save_total_limit,
                               tokenizer_bytes(run.model_path),
                               planned_steps(run.cfg.steps(), len(s.data.train), distributed.world_size()))
    check_disk_space(run.output, need)


# --- measure
def base_bpc(run: Run, model, data: PackedData) -> float | None:
    """Held-out bits per character of the base as loaded, with its own tokenizer (markers in pieces:
    bits per character compare across tokenizers). Loaded here, only with a held-out split: a
    262k-entry tokenizer takes seconds to load."""
    if data.val_text is None:
        return None
    base_tokenizer = load_tokenizer(run.model_path, run.cfg.trust_remote_code)
    blocks = pack_texts(data.val_text["text"], base_tokenizer, run.cfg.seq_len)
    collator = PackedCollator.for_model(base_tokenizer, model, run.precision.dtype)
    return shared_bpc(run, model, blocks, collator, data.val_chars)


def held_out_bpc(run: Run, s: Setup) -> float | None:
    if s.data.val is None:
        return None
    return shared_bpc(run, s.model, s.data.val, s.collator, s.data.val_chars)


def shared_bpc(run: Run, model, blocks, collator, chars: int) -> float:
    """Bits per character over all the held-out blocks: data-parallel, each rank measures its
    share and the sums are added, so every block counts once (the unwrapped model: no DDP sync)."""
    nll, _ = shared_nll(run, model, blocks, collator)
    return bits_per_char(nll, chars)


def shared_nll(run: Run, model, blocks, collator) -> tuple[float, float]:
    nll, count = held_out_nll(model, distributed.my_share(blocks), collator, run.cfg.batch_size, run.precision.device)
    nll, count = distributed.sum_over_ranks(nll, count)
    return nll, count


def held_out_loss(run: Run, s: Setup) -> tuple[float, float]:
    """(mean loss per predicted token, bits per character) of the model as it is now."""
    nll, count = shared_nll(run, s.model, s.data.val, s.collator)
    return nll / max(count, 1), bits_per_char(nll, s.data.val_chars)


def training_block_loss(run: Run, s: Setup) -> float:
    nll, count = held_out_nll(s.model, s.data.train.select([0]), s.collator, 1, run.precision.device)
    return nll / max(count, 1)


# --- train
def train(run: Run, s: Setup, checkpoint: Path | None, bpc_before: float | None) -> Trained:
    """trainer.train() with the stop-on-signal, non-finite and keep-best callbacks around it."""
    cfg = run.cfg
    guard = NonFiniteGuard(cfg.max_bad_steps, scaler_skips=run.precision.fp16)
    keeper = KeepBest(s.model) if cfg.keep_best and s.data.val is not None else None
    first_write = BeforeFirstStep(lambda: commit(run, s.identity, checkpoint, bpc_before))
    trainer = make_trainer(s.model, cfg, run.precision, run.output, s.data.train, s.data.val, s.collator,
                           callbacks=[guard, StopOnSignal(run.stopper), first_write, *([keeper] if keeper else [])])
    with run.stopper.during("train"):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if guard.diverged:
        raise guard.diverged_error(cfg.lr, cfg.embedding_lr, run.output, latest_checkpoint(run.output))
    # Skipped steps change nothing, unless the model itself now overflows: one training block decides
    last_loss = training_block_loss(run, s) if guard.in_a_row else None
    check_finite_parameters(s.model, cfg.lr, cfg.embedding_lr, last_loss)
    return Trained(trainer, keeper, result.training_loss, trainer.state.global_step,
                   int(trainer.state.num_input_tokens_seen or 0), guard.skipped)


def commit(run: Run, identity: RunIdentity, checkpoint: Path | None, bpc_before: float | None) -> None:
    """The run's first write, once every check has passed and the trainer has loaded what it
    resumes from: remove what --force replaces, trim the log, record the run (rank 0 only)."""
    if not distributed.is_main():
        return
    remove_entries(list(run.replace), first=MANIFEST)
    if checkpoint is not None:
        trim_metrics(run.output, step_of(checkpoint))
    resumed_from = checkpoint.name if checkpoint is not None else None
    write_run_record(run.output, RunIdentityRecord(identity, bpc_before, resumed_from))


# --- evaluate and save
def final_evaluation(run: Run, s: Setup, trained: Trained, bpc_before: float | None = None) -> Evaluation:
    """eval_loss and bpc_after on the held-out data (none without it); first, with keep_best, the
    weights of the lowest held-out loss are put back if a later evaluation was worse, and the
    markers as registered (step 0) if every trained state is worse than them."""
    if s.data.val is None:
        return Evaluation()
    kept = trained.keeper.restore() if trained.keeper else None
    if kept is None:
        e = Evaluation(final_eval_loss(trained.trainer), held_out_bpc(run, s), None)
    else:
        last_loss, last_step = trained.keeper.last
        distributed.on_main(lambda: say(
            f"kept the adapter of step {kept.step}, the lowest held-out loss ({kept.loss:.4f}; step {last_step}: "
            f"{last_loss:.4f}). --no-keep-best keeps the last step's"))
        e = Evaluation(kept.loss, held_out_bpc(run, s), kept.step)
    if back_to_registered(trained.keeper, run.cfg.keep_best, bpc_before, e.bpc_after):
        loss, bpc = held_out_loss(run, s)
        e = Evaluation(loss, bpc, 0)
    return dataclasses.replace(e, structure=sampled_structure(run, s))


def sampled_structure(run: Run, s: Setup) -> dict | None:
    """With `samples`: continuations of the held-out documents by the weights being saved, scored
    as `peftko eval --samples` scores them (pairs closed, book ended, whole markers only)."""
    cfg = run.cfg
    if not cfg.samples or s.data.val_text is None:
        return None
    info = adapter_info(run.output, run.model_path, cfg.quant, run.precision, run.markers, cfg.doc_end_marker)
    info.stop_ids = stop_ids(s.model, s.tokenizer, info.doc_end_marker)
    info.grammar = run.grammar  # scored in both modes: free, and strict where the corpus has a grammar
    s.model.eval()  # no dropout in the samples; training is over
    score = structure_score(s.model, s.tokenizer, info, list(s.data.val_text["text"]), list(run.markers),
                            SampleOptions(cfg.samples, cfg.sample_tokens), cfg.doc_end_marker or DEFAULT_DOC_END,
                            cfg.marker_pattern, cfg.seed)
    distributed.on_main(lambda: say(describe(score)))
    return score


def manifest(run: Run, s: Setup, results: Results) -> RunRecord:
    """What peftko.json records (save_final adds the files it wrote and the adapter's hash)."""
    built = s.built
    return RunRecord(
        peftko_version=__version__,
        base_model=str(run.model_path.resolve()),
        base_fingerprint=s.fingerprint,
        base_terms=terms_files(run.model_path),
        markers=[t.entry() for t in built.tokens],
        marker_piece_rows=built.piece_rows,
        vocab=Vocab(tokenizer_before=s.vocab_before, tokenizer_after=len(s.tokenizer),
                    rows_before=built.rows_before, rows_after=built.rows_after),
        tied_embeddings=built.tied,
        quantization=run.cfg.quant,
        compute_dtype=run.precision.dtype_name,
        config=run.cfg.to_dict(),
        corpus=corpus_record(s.data),
        results=results,
        grammar=run.grammar,
    )


def finish(run: Run, s: Setup, trained: Trained, results: Results) -> int:
    """Final evaluation, then the adapter. A signal during the evaluation writes a checkpoint
    instead; one during the save lets the save complete, then stops."""
    # Data-parallel, the evaluation is shared: no rank may leave it alone, so a signal waits for its end.
    phase = "evaluate together" if distributed.active() else "evaluate"
    try:
        with run.stopper.during(phase), translate_oom(run.cfg.memory_levers(), "evaluating"):
            e = final_evaluation(run, s, trained, results.bpc_before)
    except Interrupted:
        return stop_with_checkpoint(run, trained.trainer)
    if distributed.active() and run.stopper.agreed():
        return stop_with_checkpoint(run, trained.trainer)
    if not distributed.is_main():
        return run.stopper.exit_code  # rank 0 writes the adapter and the report
    results = dataclasses.replace(results, eval_loss=e.eval_loss, bpc_after=e.bpc_after, kept_step=e.kept_step,
                                  structure=e.structure)
    with run.stopper.during("save"):
        log_bpc(run.output, results)
        save_final(run.output, s.model, s.tokenizer, manifest(run, s, results))
        # From here a stop cuts nothing that matters: say so, not "before training began"
        run.stopper.unfinished = (f"after the adapter was written: the run in {run.output} is complete. "
                                  f"Next: peftko merge {run.output} --output {run.output}-merged")
    echo_done(run.output, results, registered=bool(s.tokens))
    write_report_or_warn(run.output)
    if run.stopper.signum:
        say(f"peftko: stopped by {run.stopper.name} after the adapter was written; "
            "the run is complete.", err=True)
    return run.stopper.exit_code


def stop_with_checkpoint(run: Run, trainer) -> int:
    with run.stopper.during("save"):
        trainer.save_checkpoint_now()
    return echo_stopped(run.output, run.stopper)


def corpus_record(d: PackedData) -> CorpusRecord:
    """What the model card reports of the corpus: the whole, and the training and held-out parts."""
    return CorpusRecord(d.train_docs + d.val_docs, d.train_chars + d.val_chars,
                        training=CorpusPart(d.train_docs, d.train_chars, d.train_tokens),
                        held_out=CorpusPart(d.val_docs, d.val_chars, d.val_tokens, d.held_out))


def shown(names: list[str], at_most: int = 10) -> str:
    more = f" and {len(names) - at_most} more (all in peftko.json)" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def echo_stopped(output: Path, stopper) -> int:
    say(f"peftko: stopped by {stopper.name}; checkpoint written to {latest_checkpoint(output)}.\n"
        f"Continue with: {resume_command(output)}", err=True)
    return stopper.exit_code


def echo_markers(tokens) -> None:
    if not tokens:
        return
    say("markers registered (one token each):")
    width = max(len(t.marker) for t in tokens)
    for t in tokens:
        say(f"  {t.marker:<{width}}  {len(t.pieces)} pieces before -> id {t.id}")


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
        say("held-out bits per character: "
            + (f"base model {base:.3f} (its own tokenizer), " if base is not None else "")
            + f"{results.bpc_before:.3f} {before}, {results.bpc_after:.3f} after training")
        if results.worse_after_training:
            warn(f"warning: the adapter is worse than no training: held-out bits per character rose from "
                 f"{results.bpc_before:.3f} ({before}) to {results.bpc_after:.3f} after training. "
                 "Lower --lr, train fewer steps, or add text")
    say(f"adapter written to {output}{os.sep} (adapter_model.safetensors, tokenizer, peftko.json)")
    say(f"next: peftko merge {output} --output {output}-merged")

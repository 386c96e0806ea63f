"""One training run, as the steps a reader expects: tokenizer -> data -> model -> train -> save."""

from __future__ import annotations

import os
from pathlib import Path

import click

from peftko import __version__
from peftko.config import TrainConfig


class TrainingSession:
    def __init__(self, cfg: TrainConfig, model_path: Path, precision, output: Path, markers, files):
        self.cfg, self.model_path, self.precision = cfg, model_path, precision
        self.output, self.markers, self.files = output, markers, files
        self.results: dict = {}

    # --- setup
    def setup_tokenizer(self) -> None:
        from peftko.base_model import load_tokenizer
        from peftko.token_rows import register_markers

        self.tokenizer = load_tokenizer(self.model_path, self.cfg.trust_remote_code)
        self.vocab_before = len(self.tokenizer)
        self.tokens = register_markers(self.tokenizer, self.markers)
        from peftko.train_command import echo_markers

        echo_markers(self.tokens)

    def setup_data(self) -> None:
        from peftko.packing import prepare_data
        from peftko.tiny_base import peftko_home

        self.data = prepare_data(self.files, self.tokenizer, self.cfg, peftko_home() / "datasets")
        d = self.data
        click.echo(
            f"data: {d.train_docs} training / {d.val_docs} held-out documents, {len(d.train)} blocks of "
            f"{self.cfg.seq_len} tokens, {d.real_token_fraction:.1%} real tokens"
            + (" (from cache)" if d.from_cache else "")
        )

    def setup_model(self) -> None:
        import transformers

        from peftko.base_model import load_base
        from peftko.collate import PackedCollator
        from peftko.run_dir import fingerprint_base
        from peftko.token_rows import embedding_modules, grow_embeddings, init_marker_rows
        from peftko.training import attach_adapters

        cfg = self.cfg
        self.fingerprint = fingerprint_base(self.model_path)
        click.echo(f"loading {self.model_path} ({cfg.quant}, {self.precision.dtype}, {self.precision.device})")
        model = load_base(self.model_path, cfg.quant, self.precision, cfg.attn_implementation,
                          cfg.trust_remote_code, cfg.allow_pickle)
        self.rows_before, self.rows_after = grow_embeddings(model, self.tokenizer)
        init_marker_rows(model, self.tokens)
        self.tied = embedding_modules(model)[2]
        transformers.set_seed(cfg.seed)  # LoRA's random A matrices come next
        self.model = attach_adapters(model, cfg, self.tokens)
        attn = model.config._attn_implementation
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.collator = PackedCollator(pad, attn, self.precision.dtype)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        click.echo(f"trainable parameters: {trainable:,} (LoRA r={cfg.lora_r} + {len(self.tokens)} marker rows)")

    # --- measure, train, save
    def held_out_bpc(self) -> float | None:
        from peftko.evaluation import bits_per_char, held_out_nll

        if self.data.val is None:
            return None
        nll, _ = held_out_nll(self.model, self.data.val, self.collator, self.cfg.batch_size,
                              self.precision.device)
        return bits_per_char(nll, self.data.val_chars)

    def train(self, resume: bool) -> None:
        from peftko.training import make_trainer

        self.trainer = make_trainer(self.model, self.cfg, self.precision, self.output,
                                    self.data.train, self.data.val, self.collator)
        checkpoint = latest_checkpoint(self.output) if resume else None
        result = self.trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        self.results["train_loss"] = result.training_loss
        self.results["steps"] = self.trainer.state.global_step
        if self.data.val is not None:
            self.results["eval_loss"] = self.trainer.evaluate()["eval_loss"]

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

    def run(self, resume: bool = False, force: bool = False) -> int:
        from peftko.run_dir import save_final, write_json_atomic

        self.setup_tokenizer()
        self.setup_data()
        self.setup_model()
        self.results["bpc_before"] = self.held_out_bpc()
        self.train(resume)
        self.results["bpc_after"] = self.held_out_bpc()
        log_bpc(self.output, self.results)
        save_final(self.output, self.model, self.tokenizer, self.manifest())
        echo_done(self.output, self.results)
        return 0


def latest_checkpoint(output: Path) -> Path | None:
    done = [p for p in output.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def log_bpc(output: Path, results: dict) -> None:
    import json

    if results.get("bpc_before") is None:
        return
    record = {"step": results["steps"], "bpc_before": results["bpc_before"], "bpc_after": results["bpc_after"]}
    with open(output / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def echo_done(output: Path, results: dict) -> None:
    if results.get("bpc_before") is not None:
        click.echo(f"held-out bits per character: {results['bpc_before']:.3f} before -> "
                   f"{results['bpc_after']:.3f} after training")
    click.echo(f"adapter written to {output}{os.sep} (adapter_model.safetensors, tokenizer, peftko.json)")
    click.echo(f"next: peftko merge {output} --output {output}-merged")

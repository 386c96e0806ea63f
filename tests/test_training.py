"""The training path itself: seeds, gradient checkpointing in train mode, dtypes, learning rates."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from transformers import TrainerCallback

from peftko.model.base import pick_precision
from peftko.cli import main
from peftko.core.config import load_config
from peftko.train.session import Run, setup
from peftko.corpus.documents import find_files, scan_file
from peftko.model.adapters import TOKEN_ROW_PARAM
from peftko.train.trainer import make_trainer
from tests.conftest import train_args


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


@pytest.mark.slow  # whole lora-train runs; the setup()-level tests above and below stay fast
def test_same_seed_same_losses(tiny_bases, small_corpus, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        r = CliRunner().invoke(main, train_args(tiny_bases["llama-untied"], small_corpus, out,
                                                "--quant", "4bit", "--lora-dropout", "0.1"))
        assert r.exit_code == 0, r.output
        runs.append(losses(out))
    assert runs[0] == runs[1] and len(runs[0]) == 6


def session(tiny_bases, small_corpus, tmp_path, quant="4bit", **flags):
    cfg = load_config(None, {"model": str(tiny_bases["llama-untied"]), "data": [str(small_corpus)],
                             "output": str(tmp_path), "quant": quant, "seq_len": "64", "batch_size": "2",
                             "grad_accum": "1", "max_steps": "3", "lr": "1e-3", "embedding_lr": "7e-3",
                             "device": "cpu", **flags})
    files = [scan_file(p) for p in find_files([small_corpus])]
    run = Run(cfg, tiny_bases["llama-untied"], pick_precision("cpu"), tmp_path, ["|SOUND|>", "|END_OF_BOOK|>"], files)
    made = setup(run)
    # the run's inputs and what setup() made, side by side, as the tests below read them
    return SimpleNamespace(cfg=run.cfg, precision=run.precision, model=made.model, data=made.data,
                           collator=made.collator, tokens=made.tokens, built=made.built)


class Spy(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        checkpointing = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        self.seen.append((model.training, any(checkpointing)))


def test_gradient_checkpointing_is_active_in_train_mode(tiny_bases, small_corpus, tmp_path):
    s = session(tiny_bases, small_corpus, tmp_path)
    s.model.eval()  # from_pretrained returns eval mode; the Trainer must switch it
    spy = Spy()
    trainer = make_trainer(s.model, s.cfg, s.precision, tmp_path, s.data.train, None, s.collator, [spy])
    trainer.train()
    assert spy.seen and all(training and checkpointing for training, checkpointing in spy.seen)


def test_frozen_weights_keep_their_dtype_and_trainables_are_fp32(tiny_bases, small_corpus, tmp_path):
    s = session(tiny_bases, small_corpus, tmp_path, quant="none")
    trainable = {n: p for n, p in s.model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in s.model.named_parameters() if not p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert {p.dtype for p in frozen.values()} == {s.precision.dtype}
    assert any(TOKEN_ROW_PARAM in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("embed_tokens.weight" in n or "lm_head.weight" in n for n in trainable)


def test_marker_rows_get_their_own_learning_rate(tiny_bases, small_corpus, tmp_path):
    s = session(tiny_bases, small_corpus, tmp_path)
    trainer = make_trainer(s.model, s.cfg, s.precision, tmp_path, s.data.train, None, s.collator)
    groups = trainer.optimizer.param_groups
    n = len(s.tokens) + len(s.built.piece_rows)  # the markers' rows and their syntax pieces'
    rows = [g for g in groups if any(p.shape[0] == n and p.shape[1] == 64 for p in g["params"])]
    assert len(groups) == 2 and rows and rows[0]["lr"] == 7e-3 and rows[0]["weight_decay"] == 0.0
    assert [g for g in groups if g is not rows[0]][0]["lr"] == 1e-3


def test_only_marker_rows_receive_gradient(tiny_bases, small_corpus, tmp_path):
    """After real steps, the embedding rows outside the markers (and their syntax pieces) are bit-identical."""
    s = session(tiny_bases, small_corpus, tmp_path)
    emb = s.model.get_input_embeddings()
    before = emb(torch.arange(emb.token_adapter.base_layer.weight.shape[0])).detach().clone()
    make_trainer(s.model, s.cfg, s.precision, tmp_path, s.data.train, None, s.collator).train()
    after = emb(torch.arange(before.shape[0])).detach()
    ids = [t.id for t in s.tokens]
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    # A marker absent from the sampled blocks gets no gradient, so "changed" may be a subset.
    assert changed and set(changed) <= set(ids) | set(s.built.piece_rows)
    assert set(changed) & set(ids)  # the markers' own rows train


@pytest.mark.slow  # whole lora-train runs; the setup()-level tests above and below stay fast
def test_skip_bad_files_trains_on_the_rest_and_says_what_it_skipped(tiny_bases, small_corpus, tmp_path):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    (corpus / "scan.txt").write_bytes(b"\x00\x01\x02PK\x03\x04" * 200)
    (corpus / "empty.txt").write_bytes(b"")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, train_args(tiny_bases["llama-tied"], corpus, out, "--quant", "none",
                                            "--skip-bad-files", "--max-steps", "1"))
    assert r.exit_code == 0, r.output
    assert "skipping 1 unreadable file(s)" in r.output and "scan.txt" in r.output
    assert "skipping empty file" in r.output and "empty.txt" in r.output
    assert (out / "peftko.json").exists()


@pytest.mark.slow  # whole lora-train runs; the setup()-level tests above and below stay fast
def test_explicit_marker_list_is_used_as_given(tiny_bases, small_corpus, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, train_args(tiny_bases["llama-tied"], small_corpus, out, "--quant", "none",
                                            "--max-steps", "1", "--markers", "|SOUND|>,|END_OF_BOOK|>"))
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "peftko.json").read_text())
    assert [m["marker"] for m in manifest["markers"]] == ["|SOUND|>", "|END_OF_BOOK|>"]


def test_a_corpus_without_markers_trains_plain_lora(tiny_bases, tmp_path):
    corpus = tmp_path / "plain"
    corpus.mkdir()
    (corpus / "a.txt").write_text("옛날 옛적에 작은 마을이 있었습니다.\n" * 80, encoding="utf-8")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, train_args(tiny_bases["llama-untied"], corpus, out, "--quant", "none",
                                            "--max-steps", "2", "--val-fraction", "0"))
    assert r.exit_code == 0, r.output
    assert "no marker matching" in r.output
    manifest = json.loads((out / "peftko.json").read_text())
    assert manifest["markers"] == [] and manifest["vocab"]["rows_after"] == manifest["vocab"]["rows_before"]


def test_offloaded_checkpoints_only_where_there_is_a_gpu_to_free(tmp_path):
    """--offload-checkpoints asks transformers to hold the checkpointed hidden states in pinned host
    memory; on the CPU there is nothing to move and no pinned allocator, so it is not asked there."""
    from peftko.model.base import Precision
    from peftko.train.trainer import checkpointing_kwargs, training_arguments

    cfg = load_config(None, {"offload_checkpoints": "true", "device": "cpu"})
    cpu = pick_precision("cpu")
    assert checkpointing_kwargs(cfg.offload_checkpoints, Precision(torch.device("cuda"), torch.bfloat16))["offload"] is True
    assert checkpointing_kwargs(cfg.offload_checkpoints, cpu) == {"use_reentrant": False, "offload": False}
    args = training_arguments(cfg, cpu, tmp_path, n_blocks=10, has_eval=False)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False, "offload": False}
    plain = load_config(None, {"device": "cpu"})
    assert checkpointing_kwargs(plain.offload_checkpoints, Precision(torch.device("cuda"), torch.bfloat16))["offload"] is False

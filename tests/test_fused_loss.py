"""peftko's own fused loss trains exactly what the model's own loss trains.

On CUDA the inner sum is Liger's fused kernel; here on the CPU it is the same sum with full logits,
so what is checked is the part peftko adds: the marker rows written into the frozen matrix and
taken out again, and the marker rows' gradient computed apart (peftko/model/fused_loss.py).
"""

from __future__ import annotations

import pytest
import torch

from peftko.model import fused_loss
from peftko.model.base import Precision, load_tokenizer
from peftko.core.config import TrainConfig
from peftko.model.builder import build_trainable
from peftko.model.tiny_base import build_tiny_base
from peftko.model.token_rows import register_markers, token_rows_layer
from peftko.model.adapters import TOKEN_ROW_PARAM

CPU = Precision(torch.device("cpu"), torch.float32)
MARKERS = ["|START_OF_TITLE|>", "|SOUND|>", "|END_OF_BOOK|>"]


def make_model(directory, tie: bool):
    base = build_tiny_base(directory, tie=tie)
    tokenizer = load_tokenizer(base)
    tokens = register_markers(tokenizer, MARKERS)
    model = build_trainable(base, tokenizer, tokens, TrainConfig(quant="none", lora_dropout=0.0), CPU).model
    torch.manual_seed(0)
    with torch.no_grad():  # trained-looking rows and LoRA B, so every gradient is non-trivial
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model, [t.id for t in tokens]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model_and_ids(request, tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("base") / "b", tie=request.param)


def a_batch(marker_ids, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (2, 48), generator=g)
    ids[:, ::5] = torch.tensor(marker_ids)[torch.randint(0, len(marker_ids), (10,), generator=g)]
    labels = ids.clone()
    labels[0, 20] = labels[1, :3] = -100  # packing boundaries and padding
    return ids, labels


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def uninstall(model):
    base = model.get_base_model()
    base.__dict__.pop("forward", None)
    base._peftko_loss_installed = False


def own_then_fused(model, ids, labels, **kwargs):
    """(loss, grads) from the model's own loss, then from peftko's, in training mode."""
    model.train()
    uninstall(model)
    own = loss_and_grads(model, ids, labels, **kwargs)
    fused_loss.install(model.get_base_model())
    try:
        return own, loss_and_grads(model, ids, labels, **kwargs)
    finally:
        uninstall(model)


def test_same_loss_and_gradients_as_the_models_own_loss(model_and_ids):
    model, marker_ids = model_and_ids
    (ref_loss, ref), (loss, got) = own_then_fused(model, *a_batch(marker_ids))
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert any(TOKEN_ROW_PARAM in n for n in got) and got.keys() == ref.keys()
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-7), name
        assert ref[name].abs().sum() > 0, name  # the comparison is not between zeros


def test_gradient_accumulation_scaling(model_and_ids):
    """With num_items_in_batch (the Trainer's gradient accumulation) the loss is the sum over it."""
    model, marker_ids = model_and_ids
    (ref_loss, ref), (loss, got) = own_then_fused(model, *a_batch(marker_ids, seed=2),
                                                  num_items_in_batch=torch.tensor(500))
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-8), name


def test_soft_capped_logits(model_and_ids):
    """Gemma-2/3 cap their logits (config.final_logit_softcapping): the rows' gradient goes through it."""
    model, marker_ids = model_and_ids
    base = model.get_base_model()
    ids, labels = a_batch(marker_ids, seed=3)
    model.train()
    uninstall(model)
    model.zero_grad(set_to_none=True)
    hidden = base.get_decoder()(input_ids=ids)[0]
    logits = 2.0 * torch.tanh(base.get_output_embeddings()(hidden) / 2.0)
    ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    fused_loss.install(base)
    base.config.final_logit_softcapping = 2.0
    try:
        loss, got = loss_and_grads(model, ids, labels)
    finally:
        base.config.final_logit_softcapping = None
        uninstall(model)
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-5)
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-7), name


def test_the_frozen_matrix_gets_its_rows_back_bit_for_bit(model_and_ids):
    model, marker_ids = model_and_ids
    lm_head = model.get_base_model().get_output_embeddings()
    weight = token_rows_layer(lm_head).get_base_layer().weight
    before = weight.detach().clone()
    ids, labels = a_batch(marker_ids)
    hidden = torch.randn(2, 48, weight.shape[1])
    with pytest.raises(RuntimeError, match="boom"):
        with fused_loss.token_rows_written(lm_head) as (w, rows):
            assert w is weight and rows
            assert not torch.equal(w[rows[0][0]], before[rows[0][0]])  # the deltas are in
            raise RuntimeError("boom")
    assert torch.equal(weight, before)
    fused_loss.causal_lm_loss(hidden, lm_head, labels).backward()
    assert torch.equal(weight, before) and weight.grad is None


def test_evaluation_and_generation_paths(model_and_ids):
    """Evaluation with skip_logits uses the fused loss (no logits); a call without labels, or in
    eval mode without skip_logits, is the model's own forward with its logits."""
    model, marker_ids = model_and_ids
    base = model.get_base_model()
    ids, labels = a_batch(marker_ids)
    model.eval()
    uninstall(model)
    with torch.no_grad():
        own = model(input_ids=ids, labels=labels)
    fused_loss.install(base)
    try:
        with torch.no_grad():
            fused = model(input_ids=ids, labels=labels, skip_logits=True)
            plain = model(input_ids=ids, labels=labels)
            logits_only = model(input_ids=ids)
    finally:
        uninstall(model)
        model.train()
    assert fused.logits is None and torch.allclose(fused.loss, own.loss, atol=1e-5)
    assert torch.equal(plain.logits, own.logits) and torch.equal(logits_only.logits, own.logits)


@pytest.mark.gpu
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_on_cuda_liger_kernel_gives_the_same_gradients(tmp_path, tie):
    """The real thing: Liger's fused kernel inside peftko's loss, against the model's own loss."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from peftko.model.kernels import liger_installed

    if not liger_installed():
        pytest.skip("needs liger-kernel (pip install 'peftko[gpu]')")
    base_dir = build_tiny_base(tmp_path / "b", tie=tie)
    tokenizer = load_tokenizer(base_dir)
    tokens = register_markers(tokenizer, MARKERS)
    precision = Precision(torch.device("cuda"), torch.float32)
    built = build_trainable(base_dir, tokenizer, tokens, TrainConfig(quant="none", liger="on", lora_dropout=0.0),
                            precision)
    model = built.model
    assert "fused linear cross-entropy" in built.kernels and "off" not in built.kernels
    assert fused_loss.installed(model.get_base_model())
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids, labels = (t.cuda() for t in a_batch([t.id for t in tokens]))
    (ref_loss, ref), (loss, got) = own_then_fused(model, ids, labels)
    assert torch.allclose(loss, ref_loss, rtol=1e-4)
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-3, atol=1e-6), name
        assert ref[name].abs().sum() > 0, name

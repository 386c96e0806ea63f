"""Liger kernels switch on only where they can, and never hide the marker rows of lm_head.

Liger itself needs triton and a CUDA card; what runs on the CPU is the part that decides
correctness: the weight a fused loss would read from lm_head is the weight lm_head multiplies by,
and a loss computed from it trains the marker rows exactly as the model's own loss does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftko.model import fused_loss
from peftko.model.base import Precision, load_tokenizer
from peftko.core.config import TrainConfig
from peftko.core.errors import UserError
from peftko.model.kernels import apply_fast_kernels, fused_ce_active, fused_loss_kwargs, fused_loss_sees_token_rows, liger_would_apply
from peftko.model.builder import build_trainable
from peftko.model.tiny_base import build_tiny_base
from peftko.model.token_rows import register_markers, token_rows_layer
from peftko.model.adapters import TOKEN_ROW_PARAM

CPU = Precision(torch.device("cpu"), torch.float32)
MARKERS = ["|START_OF_TITLE|>", "|SOUND|>"]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def peft_model(request, tmp_path_factory):
    base = build_tiny_base(tmp_path_factory.mktemp("base") / "b", tie=request.param)
    tokenizer = load_tokenizer(base)
    tokens = register_markers(tokenizer, MARKERS)
    model = build_trainable(base, tokenizer, tokens, TrainConfig(quant="none"), CPU).model
    with torch.no_grad():  # move the rows away from their initial values, as training would
        for name, p in model.named_parameters():
            if TOKEN_ROW_PARAM in name:
                p.add_(torch.randn_like(p))
    return model, [t.id for t in tokens]


def lm_head_of(model):
    return model.get_base_model().get_output_embeddings()


def delta_params(model):
    return {n: p for n, p in model.named_parameters() if TOKEN_ROW_PARAM in n}


def test_lm_head_carries_token_rows(peft_model):
    model, _ = peft_model
    assert token_rows_layer(lm_head_of(model)) is not None


def test_the_fused_loss_multiplies_by_what_the_wrapped_module_does(peft_model):
    model, ids = peft_model
    lm_head = lm_head_of(model)
    h = torch.randn(3, 5, model.config.hidden_size)
    with torch.no_grad():
        wrapped = lm_head(h)
        base = token_rows_layer(lm_head).get_base_layer().weight.clone()
        with fused_loss.token_rows_written(lm_head) as (eff, _):
            assert torch.allclose(F.linear(h, eff), wrapped, atol=1e-6)
            # The marker rows differ from the frozen base: using the base would be wrong.
            assert not torch.allclose(eff[ids], base[ids])


def test_fused_style_loss_trains_marker_rows_like_the_model(peft_model):
    """A loss that reads lm_head.weight and does the matmul itself (what Liger's FLCE does)
    gives the model's loss and the same gradients on the marker rows."""
    model, ids = peft_model
    base = model.get_base_model()
    torch.manual_seed(1)
    input_ids = torch.randint(0, base.config.vocab_size, (2, 16))
    input_ids[:, ::4] = ids[0]
    labels = input_ids.clone()
    rows = delta_params(model)

    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels)
    out.loss.backward()
    expected = {n: p.grad.clone() for n, p in rows.items()}

    model.zero_grad(set_to_none=True)
    hidden = base.model(input_ids=input_ids).last_hidden_state
    logits = hidden @ lm_head_of(model).weight.t()  # Liger: lm_head_weight=lm_head.weight
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
    loss.backward()

    assert torch.allclose(loss, out.loss, atol=1e-5)
    for name, p in rows.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.allclose(p.grad, expected[name], atol=1e-5), name
    model.zero_grad(set_to_none=True)


def test_installed_peft_lets_the_fused_loss_see_the_rows(peft_model):
    model, _ = peft_model
    assert fused_loss_sees_token_rows(lm_head_of(model))


def test_a_wrapper_that_exposes_only_the_base_weight_is_refused(peft_model, monkeypatch):
    """Older peft answered `wrapper.weight` with the frozen base matrix: FLCE must then stay off."""
    from peft.utils.other import TrainableTokensWrapper

    model, _ = peft_model
    monkeypatch.setattr(TrainableTokensWrapper, "_getattr_wrapped",
                        lambda self, name, modules: modules["token_adapter"].get_base_layer().weight)
    assert not fused_loss_sees_token_rows(lm_head_of(model))


def test_plain_linear_has_nothing_to_hide():
    assert fused_loss_sees_token_rows(torch.nn.Linear(4, 3))
    lin = torch.nn.Linear(4, 3)
    with fused_loss.token_rows_written(lin) as (weight, rows):
        assert weight is lin.weight and rows == []


def test_kernels_are_off_on_the_cpu(peft_model):
    model, _ = peft_model
    assert apply_fast_kernels(model, "auto", CPU) is None
    assert apply_fast_kernels(model, "off", CPU) is None
    assert not fused_ce_active(model)
    with pytest.raises(UserError, match="CUDA"):
        apply_fast_kernels(model, "on", CPU)
    assert not liger_would_apply("auto", "cpu", "llama")


def test_missing_liger_on_cuda_falls_back_or_explains(peft_model, monkeypatch):
    import peftko.model.kernels as kernels

    model, _ = peft_model
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    cuda = Precision(torch.device("cuda"), torch.bfloat16)  # never touched: the check comes first
    assert apply_fast_kernels(model, "auto", cuda) is None
    with pytest.raises(UserError, match="pip install"):
        apply_fast_kernels(model, "on", cuda)
    assert not liger_would_apply("auto", "cuda", "llama")


class FakeLiger:
    """Stands in for liger_kernel's model_type -> apply function table (no triton on the CPU)."""

    def __init__(self):
        self.calls = []

    def table(self):
        def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True,
                                        rms_norm=True, swiglu=True, model=None):
            self.calls.append(dict(rope=rope, cross_entropy=cross_entropy, rms_norm=rms_norm, swiglu=swiglu,
                                   fused_linear_cross_entropy=fused_linear_cross_entropy, model=model))

        return {"llama": apply_liger_kernel_to_llama}


@pytest.fixture
def fake_liger(monkeypatch):
    import peftko.model.kernels as kernels

    fake = FakeLiger()
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    monkeypatch.setattr(kernels, "_liger_apply_functions", fake.table)
    return fake


@pytest.fixture
def fresh_model(tmp_path):
    base = build_tiny_base(tmp_path / "b", tie=False)
    tokenizer = load_tokenizer(base)
    tokens = register_markers(tokenizer, MARKERS)
    return build_trainable(base, tokenizer, tokens, TrainConfig(quant="none"), CPU).model


CUDA = Precision(torch.device("cuda"), torch.bfloat16)  # a label only: nothing is moved to a GPU


def test_liger_applies_all_four_kernels_to_the_transformers_model(fake_liger, fresh_model):
    description = apply_fast_kernels(fresh_model, "auto", CUDA)
    assert description == "Liger kernels: fused linear cross-entropy, RMSNorm, RoPE, SwiGLU"
    (call,) = fake_liger.calls
    assert call["model"] is fresh_model.get_base_model()  # the LlamaForCausalLM, not the PeftModel
    # Llama's loss is peftko's own (fused_loss.py: Liger's kernel, no full weight gradient), not Liger's forward.
    assert not call["fused_linear_cross_entropy"] and not call["cross_entropy"]
    assert fused_loss.installed(fresh_model.get_base_model())
    assert fused_ce_active(fresh_model)
    assert fused_loss_kwargs(fresh_model) == {"skip_logits": True}
    assert liger_would_apply("auto", "cuda", "llama")
    # Idempotent: the lead may call it from setup_model while the benchmark calls it too.
    assert apply_fast_kernels(fresh_model, "auto", CUDA) == description
    assert len(fake_liger.calls) == 1


def test_other_architectures_keep_liger_own_fused_forward(fake_liger, fresh_model, monkeypatch):
    """An architecture whose head peftko's loss does not know gets Liger's fused forward, when the
    marker rows are visible to it through lm_head.weight."""
    monkeypatch.setattr(fused_loss, "PLAIN_HEAD_TYPES", frozenset())
    description = apply_fast_kernels(fresh_model, "auto", CUDA)
    assert description == "Liger kernels: fused linear cross-entropy, RMSNorm, RoPE, SwiGLU"
    assert fake_liger.calls[0]["fused_linear_cross_entropy"] is True
    assert not fused_loss.installed(fresh_model.get_base_model()) and fused_ce_active(fresh_model)


def test_flce_stays_off_when_it_would_hide_the_marker_rows(fake_liger, fresh_model, monkeypatch):
    from peft.utils.other import TrainableTokensWrapper

    monkeypatch.setattr(fused_loss, "PLAIN_HEAD_TYPES", frozenset())

    monkeypatch.setattr(TrainableTokensWrapper, "_getattr_wrapped",
                        lambda self, name, modules: modules["token_adapter"].get_base_layer().weight)
    description = apply_fast_kernels(fresh_model, "on", CUDA)
    assert "fused linear cross-entropy off" in description and "RMSNorm" in description
    assert fake_liger.calls[0]["fused_linear_cross_entropy"] is False
    assert not fused_ce_active(fresh_model)
    assert fused_loss_kwargs(fresh_model) == {}


def test_unsupported_architecture(fake_liger, fresh_model, monkeypatch):
    monkeypatch.setattr(fresh_model.get_base_model().config, "model_type", "gpt_neox")
    assert apply_fast_kernels(fresh_model, "auto", CUDA) is None
    with pytest.raises(UserError, match="gpt_neox"):
        apply_fast_kernels(fresh_model, "on", CUDA)
    assert not liger_would_apply("auto", "cuda", "gpt_neox")


def test_liger_leaves_the_modeling_module_to_other_models(fresh_model, monkeypatch, tmp_path):
    """Like Liger's real apply functions, the stand-in also rewrites modeling_llama: a norm class and the
    RoPE function (whose triton kernel fails on CPU tensors). A model built afterwards, on the CPU,
    must get neither; the patched model keeps its RoPE on CUDA tensors."""
    import peftko.model.kernels as kernels
    from transformers.models.llama import modeling_llama

    original_norm, original_rope = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(modeling_llama, "LlamaRMSNorm", original_norm)  # restored whatever happens
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original_rope)

    def triton_rope(q, k, *args, **kwargs):
        raise ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")

    def apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=None):
        modeling_llama.apply_rotary_pos_emb = triton_rope
        modeling_llama.LlamaRMSNorm = torch.nn.Identity

    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    monkeypatch.setattr(kernels, "_liger_apply_functions", lambda: {"llama": apply_liger_kernel_to_llama})
    assert apply_fast_kernels(fresh_model, "auto", CUDA)

    assert modeling_llama.LlamaRMSNorm is original_norm
    base = build_tiny_base(tmp_path / "later", tie=False)
    later = load_tokenizer(base)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    ids = torch.tensor([later("옛날 옛적에")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()  # the CPU model ran the original RoPE
    cuda_like = torch.zeros(1).to("meta")  # stands for a CUDA tensor below
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type == "meta"))
    with pytest.raises(ValueError, match="Triton"):
        modeling_llama.apply_rotary_pos_emb(cuda_like, cuda_like, None, None)

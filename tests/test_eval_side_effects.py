"""Evaluating must not change what is trained, on any CPU.

bitsandbytes repacks a Linear4bit's weights for an inference-only kernel when the layer runs in
eval mode without gradients on a CPU with AVX512-BF16, and keeps them repacked (peftko.model.quantized).
This machine may lack that instruction set, so `cpu_repack` forces bitsandbytes' own CPU probe to
answer yes: the layers are built believing the CPU has it, and bitsandbytes' real repack code runs.
The properties are checked with the real probe too, so a CPU that has it tests the real thing.
"""

from __future__ import annotations

import hashlib

import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt

from peftko.model.base import load_base, load_tokenizer, pick_precision
from peftko.data.collate import PackedCollator
from peftko.core.config import load_config
from peftko.evaluate.heldout import held_out_nll
from peftko.model.quantized import quantized_layers_kept
from peftko.data.packing import pack_texts
from peftko.model.tiny_base import sample_texts
from peftko.model.token_rows import grow_embeddings, init_marker_rows, register_markers
from peftko.model.adapters import attach_adapters
from peftko.train.trainer import make_trainer

MARKERS = ["|START_OF_TITLE|>", "|END_OF_TITLE|>", "|SOUND|>", "|END_OF_BOOK|>"]
CPU = pick_precision("cpu")


@pytest.fixture(params=["real-probe", "forced-probe"])
def cpu_repack(request, monkeypatch):
    """'forced-probe': Linear4bit layers built from now on believe the CPU has AVX512-BF16."""
    if request.param == "forced-probe":
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    return request.param


def trainable_model(base, quant: str, tmp_path, precision=CPU):
    """The session's model path, step by step, with no evaluation on the way."""
    tokenizer = load_tokenizer(base)
    tokens = register_markers(tokenizer, MARKERS)
    model = load_base(base, quant, precision)
    grow_embeddings(model, tokenizer)
    init_marker_rows(model, tokens)
    cfg = load_config(None, {"model": str(base), "output": str(tmp_path), "lora_r": "4", "lora_alpha": "8",
                             "batch_size": "2", "seq_len": "64", "device": precision.device.type,
                             "max_steps": "1"})
    torch.manual_seed(0)
    blocks = pack_texts(sample_texts(strip_markers=False)[:1], tokenizer, 64)[:4]
    return attach_adapters(model, cfg.lora(), tokens), cfg, blocks, PackedCollator.for_model(tokenizer, model,
                                                                                           precision.dtype)


def gradients(model, batch) -> dict[str, torch.Tensor]:
    """On CUDA under bf16 autocast, as the Trainer trains there: its evaluate() wraps the model's
    forward in that autocast for good (accelerate's prepare_model), and so does train()."""
    device = next(p.device for p in model.parameters() if p.requires_grad)
    batch = {k: v.to(device) for k, v in batch.items()}
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def layer_state(model) -> list:
    """What a quantized layer computes with: its weight bytes, where they live, its quant state."""
    state = []
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            qs = m.weight.quant_state
            state.append((name, m.weight.data.data_ptr(), _digest(m.weight.data),
                          getattr(qs, "packing_format_for_cpu", False), qs.nested, qs.dtype,
                          _digest(qs.absmax), sorted(vars(qs))))
        elif isinstance(m, Linear8bitLt):
            s = m.state
            state.append((name, m.weight.data.data_ptr(), _digest(m.weight.data), s.has_fp16_weights,
                          None if s.CB is None else _digest(s.CB), None if s.SCB is None else _digest(s.SCB)))
    assert state, "no quantized layer found: the test would check nothing"
    return state


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("base", ["llama-untied", pytest.param("qwen2-padded", marks=pytest.mark.slow),
                                  pytest.param("gpt-neox", marks=pytest.mark.slow)])
def test_4bit_gradients_do_not_depend_on_an_evaluation_before(tiny_bases, tmp_path, cpu_repack, base):
    """qwen2 and gpt-neox have biased linears: the inference-only kernel's `result += bias` fails there."""
    check_evaluation_changes_nothing(tiny_bases[base], "4bit", tmp_path)


def test_8bit_gradients_do_not_depend_on_an_evaluation_before(tiny_bases, tmp_path):
    """Linear8bitLt takes another CPU path in eval (int8 matmul) but keeps no state from it."""
    check_evaluation_changes_nothing(tiny_bases["llama-tied"], "8bit", tmp_path)


def check_evaluation_changes_nothing(base, quant: str, tmp_path, precision=CPU) -> None:
    """Same batch, same model: LoRA and marker-row gradients before == after held_out_nll and trainer.evaluate."""
    model, cfg, blocks, collator = trainable_model(base, quant, tmp_path, precision)
    batch = collator(blocks[:2])
    before = gradients(model, batch)
    state = layer_state(model)

    held_out_nll(model, blocks, collator, 2, precision.device)
    assert layer_state(model) == state
    after_held_out = gradients(model, batch)

    trainer = make_trainer(model, cfg, precision, tmp_path, blocks, blocks, collator)
    trainer.evaluate()
    assert layer_state(model) == state
    after_trainer_eval = gradients(model, batch)

    assert before.keys() == after_held_out.keys() == after_trainer_eval.keys()
    assert any("lora_A" in n for n in before)
    for name in before:
        assert torch.equal(before[name], after_held_out[name]), f"{name} changed after held_out_nll"
        assert torch.equal(before[name], after_trainer_eval[name]), f"{name} changed after trainer.evaluate"


def test_forced_probe_makes_bitsandbytes_repack(tiny_bases, tmp_path, monkeypatch):
    """The premise of the forced-probe cases: unprotected, an eval forward repacks the weights."""
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model, _, blocks, collator = trainable_model(tiny_bases["llama-untied"], "4bit", tmp_path)
    model.eval()
    with torch.no_grad():
        model(**collator(blocks[:1]))
    packed = [getattr(m.weight.quant_state, "packing_format_for_cpu", False)
              for m in model.modules() if isinstance(m, Linear4bit)]
    assert packed and all(packed), "bitsandbytes no longer repacks on this trigger: revisit peftko.model.quantized"


def test_a_repack_on_another_trigger_is_undone_exactly(tiny_bases, tmp_path):
    """Should bitsandbytes repack for a reason the switch does not cover, the layers come back intact."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model, _, blocks, collator = trainable_model(tiny_bases["llama-untied"], "4bit", tmp_path)
    batch = collator(blocks[:2])
    before, state = gradients(model, batch), layer_state(model)
    with quantized_layers_kept(model):
        for m in model.modules():
            if isinstance(m, Linear4bit):  # exactly what Linear4bit.forward does on such a CPU
                m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data,
                                                                                     m.weight.quant_state)
        assert layer_state(model) != state
    assert layer_state(model) == state
    after = gradients(model, batch)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("base", ["llama-tied", "qwen2-padded"])
def test_held_out_nll_equals_the_models_own_loss_without_an_fp32_copy_of_all_logits(tiny_bases, tmp_path,
                                                                                   monkeypatch, base):
    """Without the fused loss, evaluation sums the loss over chunks of positions: the same number as
    the model's own loss, but no fp32 tensor of every logit of a batch (6 GiB at 4 x 2048 x 128k)."""
    model, _, blocks, collator = trainable_model(tiny_bases[base], "none", tmp_path)
    model.eval()
    expected, predicted = 0.0, 0
    with torch.no_grad():
        for b in blocks:  # the model's own (mean) loss, block by block, weighted back to a sum
            batch = collator([b])
            n = int((batch["labels"][:, 1:] != -100).sum())
            expected, predicted = expected + float(model(**batch).loss) * n, predicted + n
    seen = []
    real_ce = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda x, *a, **kw: seen.append(x.shape) or real_ce(x, *a, **kw))
    nll, count = held_out_nll(model, blocks, collator, 4, CPU.device)
    assert count == predicted and nll == pytest.approx(expected, rel=1e-5)
    vocab = model.get_output_embeddings().weight.shape[0]
    assert seen and max(s[0] for s in seen) <= 256, "the loss ran on more than one chunk of positions"
    assert all(s[1] == vocab for s in seen) and len(seen) >= len(blocks)

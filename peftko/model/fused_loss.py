"""The training loss with no full logits and no full-vocabulary weight gradient.

Why: Liger's fused linear cross-entropy (FLCE) never materialises the batch x seq_len x vocab
logits, but when the lm_head weight it is given requires a gradient it accumulates a full V x H
weight gradient (1 GiB on the Llama-3-8B shape) of which peftko keeps only the marker rows; and
peft's `lm_head.weight` is itself a merged V x H copy (another 1 GiB). Both were measured on an
H100 (benchmarks/RESULTS.md) and kept the 8B training peak above 10 GiB.

Here the loss is computed against the frozen base matrix with the marker rows written into it in
place for the duration (`token_rows_written`), so FLCE sees exactly the matrix lm_head multiplies
by, computes the gradient for the hidden states, and allocates no weight gradient. The marker
rows' own gradient is added by `marker_rows_term`: for cross-entropy, dL/dz = softmax - onehot,
so the rows' gradient is sum_t (p[t,m] - [y_t = m]) h_t / N, which needs only the per-token
log-sum-exp (one more chunked pass over the vocabulary, no gradient) and the K marker logits.
The term's value is zero (x - x.detach()), so the loss reads the same.

`install` puts this loss into a model's forward (training, or evaluation with skip_logits=True,
as Liger's own forward does); generation and plain calls go to the model's class forward.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from peftko.model.token_rows import active_token_names, token_rows_layer

IGNORE = -100

# Causal LMs whose logits are lm_head(decoder(x)) (optionally soft-capped by
# config.final_logit_softcapping) and whose decoder is `get_decoder()`: the loss here is exact for
# them. Other Liger-supported types keep Liger's own fused loss (peftko.model.kernels).
PLAIN_HEAD_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi3", "olmo2", "smollm3",
})


def installed(model) -> bool:
    return getattr(model, "_peftko_loss_installed", False)


def install(model) -> None:
    """Make `model` (a transformers causal LM, not the PeftModel) compute its loss here."""
    if installed(model):
        return
    model.forward = types.MethodType(_forward, model)
    model._peftko_loss_installed = True


def _forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, skip_logits=None,
             num_items_in_batch=None, **kwargs):
    fused = labels is not None and (skip_logits if skip_logits is not None else self.training)
    if not fused:
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, labels=labels, **kwargs)
    kwargs.pop("logits_to_keep", None)
    outputs = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 **kwargs)
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss = causal_lm_loss(outputs[0], self.get_output_embeddings(), labels, softcap, num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss)


def causal_lm_loss(hidden: torch.Tensor, lm_head, labels: torch.Tensor, softcap: float | None = None,
                   num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy of `lm_head(hidden)` against `labels` (B x L, -100 = ignored), as a
    causal LM's own loss: the mean over predicted positions, or their sum over num_items_in_batch
    (gradient accumulation). Gradients reach `hidden` and lm_head's trainable token rows."""
    targets = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    denom = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum().clamp(min=1)
    if torch.is_tensor(denom):
        denom = denom.to(hidden.device)
    with token_rows_written(lm_head) as (weight, rows):
        loss = linear_cross_entropy(hidden, weight, targets, softcap) / denom
        if rows and torch.is_grad_enabled():
            loss = loss + marker_rows_term(hidden, targets, weight, rows, softcap, denom)
    return loss


def linear_cross_entropy(hidden, weight, targets, softcap=None) -> torch.Tensor:
    """sum over targets != -100 of cross_entropy(hidden @ weight.T): Liger's fused kernel on CUDA,
    the same sum with full logits elsewhere (the CPU, where the tests check the rest)."""
    if hidden.is_cuda:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden.contiguous(), weight, targets, ignore_index=IGNORE,
                                                reduction="sum", softcap=softcap)
    # Liger computes the hidden states' gradient in its forward and keeps no reference to the
    # matrix; a plain matmul would save it for backward, and token_rows_written changes it after.
    logits = _capped((hidden @ weight.detach().clone().t()).float(), softcap)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


@contextlib.contextmanager
def token_rows_written(lm_head):
    """Yield (weight, rows): the matrix lm_head multiplies by, with no gradient of its own, and
    [(row indices, trainable delta)] for its trainable token rows (empty without any).

    With peft's token rows the base matrix gets the deltas written into it in place, and gets its
    own rows back afterwards, bit for bit, even on error: no merged V x H copy is made. The write
    bumps the tensor's version, so if autograd had saved this matrix the backward would refuse
    loudly rather than compute with the wrong rows.
    """
    layer = token_rows_layer(lm_head)
    if layer is None:
        yield lm_head.weight, []
        return
    weight = layer.get_base_layer().weight
    # Disabled adapters multiply by the base matrix alone; merged ones have their rows in it already.
    live = not (getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False))
    rows = [(torch.as_tensor(layer.token_indices[n], device=weight.device), layer.trainable_tokens_delta[n])
            for n in (active_token_names(layer) if live else [])]
    saved = []
    try:
        with torch.no_grad():
            for index, delta in rows:
                saved.append((index, weight.index_select(0, index)))
                weight.index_copy_(0, index, delta.to(weight.dtype))
        yield weight, [(i, d) for i, d in rows if d.requires_grad]
    finally:
        with torch.no_grad():
            for index, original in reversed(saved):
                weight.index_copy_(0, index, original)


def marker_rows_term(hidden, targets, weight, rows, softcap, denom) -> torch.Tensor:
    """A zero whose gradient with respect to each delta is the cross-entropy's gradient for its rows.

    dL/dW_m = sum_t (p[t, m] - [y_t = m]) dz[t, m]/dW_m / denom, with p = exp(z - logsumexp_t).
    The hidden states are detached: their gradient already comes from the fused loss.
    """
    # Every position, ignored ones masked out of the coefficient: selecting the valid rows instead
    # would wait for the GPU (a boolean index needs its count) in the middle of the step.
    h, valid = hidden.detach(), (targets != IGNORE).float()[:, None]
    lse = _logsumexp(h, weight, softcap)
    term = hidden.new_zeros((), dtype=torch.float32)
    for index, delta in rows:
        z = _capped((h @ delta.t().to(h.dtype)).float(), softcap)  # tokens x K, differentiable in delta
        with torch.no_grad():
            coef = ((z - lse[:, None]).exp() - (targets[:, None] == index[None, :]).float()) * valid
            coef /= denom
        contribution = (coef * z).sum()
        term = term + contribution - contribution.detach()
    return term


@torch.no_grad()
def _logsumexp(h: torch.Tensor, weight: torch.Tensor, softcap) -> torch.Tensor:
    """Per-token log-sum-exp of the (capped) logits, a chunk of tokens at a time: each chunk's
    logits are about the size of `h` itself, as in Liger's own chunking."""
    n, vocab = h.shape[0], weight.shape[0]
    chunk = max(64, (n * h.shape[1]) // vocab)
    out = torch.empty(n, dtype=torch.float32, device=h.device)
    for s in range(0, n, chunk):
        out[s:s + chunk] = torch.logsumexp(_capped((h[s:s + chunk] @ weight.t()).float(), softcap), dim=-1)
    return out


def _capped(logits: torch.Tensor, softcap) -> torch.Tensor:
    return logits if not softcap else softcap * torch.tanh(logits / softcap)

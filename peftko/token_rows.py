"""Markers as tokens: register them, grow the embedding matrix, initialise and train their rows.

Initialisation: each new row starts as the mean of the embedding rows of the pieces the BASE
tokenizer split that marker into (EEVE's choice for Korean vocabulary expansion). The marker
then starts where its spelled-out form already pointed the model, instead of at a random or
average-of-everything point, so the first steps do not spend their gradient undoing noise. The
same is done for the lm_head rows of untied models, so the marker is as likely to be emitted as
its first piece was. Tied models share one row for both.

Training: only these rows change, through peft's `trainable_token_indices`, which stores a
small delta for the listed ids instead of a copy of the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftko.errors import UserError


@dataclass(frozen=True)
class MarkerToken:
    marker: str
    id: int
    pieces: list[int]  # base-tokenizer ids the marker was split into before registration

    def to_json(self) -> dict:
        return {"marker": self.marker, "id": self.id, "pieces_before": len(self.pieces), "piece_ids": self.pieces}


def register_markers(tokenizer, markers: list[str]) -> list[MarkerToken]:
    """Add each marker as ONE token that matches exactly (no normalisation, no stripping)."""
    from tokenizers import AddedToken

    pieces = {m: tokenizer(m, add_special_tokens=False)["input_ids"] for m in markers}
    new = [m for m in markers if len(pieces[m]) != 1 or tokenizer.convert_ids_to_tokens(pieces[m][0]) != m]
    tokenizer.add_tokens(
        [AddedToken(m, normalized=False, lstrip=False, rstrip=False, single_word=False) for m in new]
    )
    tokens = []
    for m in markers:
        ids = tokenizer(m, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UserError(f"marker {m!r} is still {len(ids)} tokens after registration; check the tokenizer")
        tokens.append(MarkerToken(m, ids[0], pieces[m]))
    return tokens


def embedding_modules(model) -> tuple[str, str | None, bool]:
    """(input embedding name, output embedding name or None, tied?) found by identity, not by name.

    GPT-NeoX calls them embed_in/embed_out, Llama embed_tokens/lm_head; peft matches these names.
    """
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n}
    tied = out is not None and out.weight.data_ptr() == inp.weight.data_ptr()
    return names[id(inp)], (names[id(out)] if out is not None and not tied else None), tied


def grow_embeddings(model, tokenizer) -> tuple[int, int]:
    """Make room for every tokenizer id. Never shrink: padded vocabularies (Qwen) keep their rows."""
    before = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > before:
        # mean_resizing=False: our own init below overwrites the new rows anyway.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return before, model.get_input_embeddings().weight.shape[0]


@torch.no_grad()
def init_marker_rows(model, tokens: list[MarkerToken]) -> None:
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != weights[0].data_ptr():
        weights.append(out.weight)
    for w in weights:
        for t in tokens:
            if t.pieces != [t.id]:
                w[t.id] = w[t.pieces].float().mean(0).to(w.dtype)


def trainable_token_indices(model, tokens: list[MarkerToken]) -> dict[str, list[int]]:
    """peft's spec: input embedding always, lm_head too when it is a separate matrix."""
    ids = sorted({t.id for t in tokens})
    inp, out, _tied = embedding_modules(model)
    spec = {inp: ids}
    if out is not None:
        spec[out] = ids
    return spec

"""Markers as tokens: register them, grow the embedding matrix, initialise and train their rows.

Initialisation: each new row starts as the mean of the embedding rows of the pieces the BASE
tokenizer split that marker into (EEVE's choice for Korean vocabulary expansion), the pieces with
letters or digits only (`START`, `TITLE`; not `|`, `_`, `|>`: meaning_pieces says why). The marker
then starts where its spelled-out form already pointed the model, instead of at a random or
average-of-everything point, so the first steps do not spend their gradient undoing noise. The
same is done for the lm_head rows of untied models, so the marker is as likely to be emitted as
its first piece was. Tied models share one row for both.

Spacing: once registered, a marker must read back exactly as written (`round_trip_problems`).
Legacy SentencePiece tokenizers (Llama-2, Mistral v0.1) prepend "▁" after every added token, so
their pre-tokenizer is switched to prepend once per text, as transformers' legacy=False does.

Training: only these rows change, through peft's `trainable_token_indices`, which stores a
small delta for the listed ids instead of a copy of the whole matrix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from peftko.core.errors import UserError
from peftko.run.records import MarkerEntry

SPIECE = "\u2581"  # SentencePiece's visible space, "▁"
# Each marker at the start, right before and after Korean, before a newline and before a space.
PROBE = "{m}반딧불이 숲{m}\n{m} 쉿! 조용히{m}반딧불이{m}"


@dataclass(frozen=True)
class MarkerToken:
    marker: str
    id: int
    pieces: list[int]  # base-tokenizer ids the marker was split into before registration
    init_ids: list[int] = field(default_factory=list)  # the pieces its row starts from (meaning_pieces)

    def entry(self) -> MarkerEntry:
        """As peftko.json records it."""
        return MarkerEntry(self.marker, self.id, len(self.pieces), list(self.pieces), list(self.init_ids))


def register_markers(tokenizer, markers: list[str]) -> list[MarkerToken]:
    """Add each marker as ONE token that matches exactly (no normalisation, no stripping)."""
    from tokenizers import AddedToken

    pieces = {m: tokenizer(m, add_special_tokens=False)["input_ids"] for m in markers}
    new = [m for m in markers if len(pieces[m]) != 1 or tokenizer.convert_ids_to_tokens(pieces[m][0]) != m]
    tokenizer.add_tokens(
        [AddedToken(m, normalized=False, lstrip=False, rstrip=False, single_word=False) for m in new]
    )
    if round_trip_problems(tokenizer, markers):
        prefix_first_segment_only(tokenizer)
    check_round_trip(tokenizer, markers)
    tokens = []
    for m in markers:
        ids = tokenizer(m, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UserError(f"marker {m!r} is still {len(ids)} tokens after registration; check the tokenizer")
        tokens.append(MarkerToken(m, ids[0], pieces[m], meaning_pieces(tokenizer, pieces[m])))
    return tokens


def has_letters(tokenizer, piece: int) -> bool:
    """Whether a piece carries a letter or digit (`START`, `소리`), or is marker syntax only (`|`, `_`, `|>`)."""
    return any(c.isalnum() for c in tokenizer.decode([piece]))


def meaning_pieces(tokenizer, pieces: list[int]) -> list[int]:
    """The pieces a marker's row starts from: those with a letter or digit (`START`, `TITLE`, `소리`).

    An <unk> piece (no byte fallback) or a special token says nothing about the marker. Nor do the
    syntax pieces every marker shares (`|`, `_`, `|>`: piece_rows): averaged in, they made
    `|START_OF_TITLE|>` and `|END_OF_TITLE|>` start 6/7 the same row, and pointed every marker row at
    `|` and `|>`, so raising a marker's logit raised theirs (a real base then wrote `|` for a marker).
    A marker with no such piece starts from its non-special pieces.
    """
    special = set(tokenizer.all_special_ids)
    usable = [p for p in pieces if p not in special]
    words = [p for p in usable if has_letters(tokenizer, p)]
    return words or usable


def round_trip_problems(tokenizer, markers: list[str]) -> list[tuple[str, str, str]]:
    """(marker, probe text, what decode(encode(probe)) gave) for each marker whose text does not survive.

    The property every tokenizer family must have once the markers are registered: training data
    and generated text read back exactly as written, with no space added or dropped around a marker.
    """
    problems = []
    for m in markers:
        text = PROBE.format(m=m)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if back != text:
            problems.append((m, text, back))
    return problems


def check_round_trip(tokenizer, markers: list[str]) -> None:
    problems = round_trip_problems(tokenizer, markers)
    if problems:
        m, text, back = problems[0]
        others = f" (and {len(problems) - 1} more markers)" if len(problems) > 1 else ""
        raise UserError(
            f"marker {m!r}{others} does not read back as written with this tokenizer: {text!r} "
            f"decodes to {back!r}, so training data and generated text would differ from the corpus. "
            "Use a base whose tokenizer keeps text exactly (byte fallback, or byte-level BPE)"
        )


def prefix_first_segment_only(tokenizer) -> bool:
    """Make a legacy SentencePiece tokenizer prepend "▁" once per text, not after every added token.

    Legacy Llama-2-style tokenizers prepend "▁" to every piece of text between added tokens, either
    with a Metaspace pre-tokenizer (prepend_scheme "always") or with a normalizer Prepend("▁"), so
    "|SOUND|>쉿" decodes as "|SOUND|> 쉿". This does what transformers' legacy=False does: a Metaspace
    with prepend_scheme "first". Text without added tokens is one piece, so it tokenizes as before
    (except a text that starts with a space under the normalizer style: one "▁" there, not two).
    Returns whether anything changed. The change lives in the backend (tokenizer.json) and, for
    classes that rebuild their backend from `legacy` when loaded, in that flag too.
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    changed = _metaspace_first(spec) | _prepend_normalizer_to_metaspace(spec)
    if not changed:
        return False
    fixed = Tokenizer.from_str(json.dumps(spec))
    backend.normalizer, backend.pre_tokenizer = fixed.normalizer, fixed.pre_tokenizer
    backend.decoder = fixed.decoder
    if getattr(tokenizer, "legacy", None):
        tokenizer.legacy = False
        tokenizer.init_kwargs["legacy"] = False
    return True


def _components(node):
    """A normalizer/pre-tokenizer/decoder node and, for a Sequence, its members."""
    if not isinstance(node, dict):
        return []
    members = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
    return [node] + [c for m in members for c in _components(m)]


def _metaspace_first(spec: dict) -> bool:
    changed = False
    for node in _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder")):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "always":
            node["prepend_scheme"] = "first"
            changed = True
    return changed


def _prepend_normalizer_to_metaspace(spec: dict) -> bool:
    norm = spec.get("normalizer")
    is_prepend = lambda n: n.get("type") == "Prepend" and n.get("prepend") == SPIECE  # noqa: E731
    if not isinstance(norm, dict):
        return False
    if is_prepend(norm):
        spec["normalizer"] = None
    elif norm.get("type") == "Sequence" and any(is_prepend(n) for n in norm["normalizers"]):
        norm["normalizers"] = [n for n in norm["normalizers"] if not is_prepend(n)]
    else:
        return False
    first = {"type": "Metaspace", "replacement": SPIECE, "prepend_scheme": "first", "split": False}
    pre = spec.get("pre_tokenizer")
    if pre is None:
        spec["pre_tokenizer"] = first
    elif pre.get("type") == "Sequence":
        pre["pretokenizers"].insert(0, first)
    else:
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [first, pre]}
    return True


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
    """Each marker row := mean of its pieces' rows; with no usable piece, the mean of the base's rows.

    New markers are appended after the base vocabulary, so the smallest new id is its size (rows
    past it in a padded matrix, as in Qwen, were never trained and stay out of the mean).
    """
    new = [t for t in tokens if t.pieces != [t.id]]
    known_rows = min((t.id for t in new), default=0)
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != weights[0].data_ptr():
        weights.append(out.weight)
    for w in weights:
        fallback = None
        for t in new:  # a marker that was already one base token keeps its trained row
            if t.init_ids:
                w[t.id] = w[t.init_ids].float().mean(0).to(w.dtype)
            else:
                fallback = _mean_of_rows(w, known_rows) if fallback is None else fallback
                w[t.id] = fallback


def _mean_of_rows(w: torch.Tensor, rows: int, chunk: int = 8192) -> torch.Tensor:
    # In chunks: a float copy of a 128k x 4096 matrix would cost 2 GB at load time.
    total = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
    for start in range(0, rows, chunk):
        total += w[start : min(rows, start + chunk)].float().sum(0)
    return (total / max(rows, 1)).to(w.dtype)


def piece_rows(tokenizer, tokens: list[MarkerToken]) -> list[int]:
    """The base-vocabulary pieces the markers were split into that are marker syntax only: no letter
    or digit in them (`|`, `|>`, `_`, `<|`, SentencePiece's `▁|`).

    Registering a marker leaves its old pieces in the vocabulary. Their rows are not trained by
    default, and a marker row starts as the mean of them (init_marker_rows), so wherever training
    raises a marker's logit it raises theirs too: a pretrained base then writes `|>` or `|SOUND|`
    where a marker should be. Training these rows as well lets the loss push them down, since the
    corpus, read with the markers registered, never has them. Pieces with letters (`SOUND`, `TITLE`)
    are words the base needs elsewhere and stay frozen.
    """
    special = set(tokenizer.all_special_ids)
    marker_ids = {t.id for t in tokens}
    pieces = {p for t in tokens if t.pieces != [t.id] for p in t.pieces} - special - marker_ids
    return sorted(p for p in pieces if not has_letters(tokenizer, p))


def trained_rows(tokens: list[MarkerToken] | list[MarkerEntry], pieces: list[int] = ()) -> list[int]:
    """The embedding rows a run trains: the markers' and their syntax pieces' (piece_rows). What
    training hands peft, what --resume expects a checkpoint to hold and what merge checks the
    adapter against (from peftko.json's markers), from this one definition."""
    return sorted({t.id for t in tokens} | set(pieces))


def trainable_token_indices(model, tokens: list[MarkerToken], pieces: list[int] = ()) -> dict[str, list[int]]:
    """peft's spec: input embedding always, lm_head too when it is a separate matrix; the marker rows
    and the rows of their syntax pieces (trained_rows)."""
    ids = trained_rows(tokens, pieces)
    inp, out, _tied = embedding_modules(model)
    spec = {inp: ids}
    if out is not None:
        spec[out] = ids
    return spec


def token_rows_layer(module):
    """peft's TrainableTokensLayer behind `module` (a TrainableTokensWrapper or the layer itself), or None."""
    layer = getattr(module, "token_adapter", None)
    if layer is None and hasattr(module, "trainable_tokens_delta") and hasattr(module, "token_indices"):
        layer = module
    return layer


def active_token_names(layer) -> list[str]:
    """The active adapters of a TrainableTokensLayer that hold token rows, in peft's order."""
    return [n for n in layer.active_adapters if n in layer.trainable_tokens_delta]

"""The rules of `peftko eval`: bits per character of a corpus, with and without the markers, and
per marker.

The corpus is read exactly as `lora-train` reads it (peftko.corpus.reading). Each document is
tokenised on its own (with the tokenizer's BOS, no EOS) and every token is scored by the model's
negative log-likelihood (NLL) given the tokens before it.

Rules, used everywhere (eval, ablate, the tests):
- Windows: a document longer than --seq-len tokens is scored in windows of --seq-len tokens that
  overlap by ONE token: each window starts fresh (no context from the window before) and
  predicts all its tokens but the first, so every token of the document except its very first
  is predicted exactly once.
- The first token of a document is never predicted. With a BOS token it has no characters; without
  one (e.g. Qwen) its characters are left out of every denominator.
- Markers: a marker span is one occurrence of a marker in the text (the markers found by
  --marker-pattern, plus the model's registered markers). A token is a MARKER TOKEN when any of its
  characters (offset_mapping) lie inside a marker span; its NLL goes to that marker (the first
  one it touches) and never to the story text. Story-text characters a marker token also covers
  (a BPE piece `다|` when markers are not single tokens) are left out of the story-text count too.
- bits_per_char      = NLL of all predicted tokens (bits) / characters of the document.
  bits_per_char_text = NLL of the predicted non-marker tokens / characters outside marker spans
                       and outside marker tokens.
- Per marker: count (occurrences); bits_per_occurrence (NLL of all tokens of an occurrence, summed,
  averaged over the occurrences that are not the document's unpredicted first token); top1 (how
  often the model's highest-ranked token at the position before an occurrence is its first token).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from peftko.core.errors import UserError
from peftko.core.progress import phase
from peftko.corpus.lint import marker_regex
from peftko.model.base import DEFAULT_SEQ_LEN

LN2 = math.log(2)


@dataclass
class MarkerStats:
    count: int = 0
    nll: float = 0.0  # nats, over every token of the predicted occurrences
    predicted: int = 0  # occurrences whose first token was predicted (not the document's first token)
    top1: int = 0

    def to_json(self) -> dict:
        return {"count": self.count,
                "bits_per_occurrence": self.nll / LN2 / self.predicted if self.predicted else None,
                "top1": self.top1 / self.predicted if self.predicted else None}


@dataclass
class Scores:
    """Sums over documents; the ratios are computed at the end."""

    documents: int = 0
    chars: int = 0  # characters read
    scored_chars: int = 0  # characters in the bits_per_char denominator
    text_chars: int = 0  # characters in the bits_per_char_text denominator
    tokens: int = 0
    nll: float = 0.0  # nats, every predicted token
    text_nll: float = 0.0  # nats, predicted non-marker tokens
    markers: dict[str, MarkerStats] = field(default_factory=dict)
    per_document_text: list[float | None] = field(default_factory=list)  # each document's bits_per_char_text

    def to_json(self) -> dict:
        return {
            "bits_per_char": _ratio(self.nll / LN2, self.scored_chars),
            "bits_per_char_text": _ratio(self.text_nll / LN2, self.text_chars),
            "tokens_per_char": _ratio(self.tokens, self.chars),
            "documents": self.documents,
            "chars": self.chars,
            "text_chars": self.text_chars,
            "tokens": self.tokens,
            "markers": {m: s.to_json() for m, s in sorted(self.markers.items())},
            "per_document_bits_per_char_text": self.per_document_text,
        }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


# --- scoring


@torch.no_grad()
def token_nll(model, ids: list[int], seq_len: int, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(NLL in nats, model's top-1 id) for tokens 1..n-1 of `ids`, in windows overlapping by one token."""
    n = len(ids)
    nll, top = np.zeros(n), np.full(n, -1, dtype=np.int64)
    starts = list(range(0, max(n - 1, 0), seq_len - 1))
    for b in range(0, len(starts), batch_size):
        chunk = [ids[s : s + seq_len] for s in starts[b : b + batch_size]]
        width = max(len(c) for c in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, c in enumerate(chunk):
            x[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits
        for i, (s, c) in enumerate(zip(starts[b : b + batch_size], chunk)):
            # One row at a time: a float32 copy of the whole batch's logits is GBs with a 128k vocabulary.
            logp = torch.log_softmax(logits[i, : len(c) - 1].float(), dim=-1)
            target = torch.tensor(c[1:], device=logp.device)
            nll[s + 1 : s + len(c)] = (-logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)).cpu().numpy()
            top[s + 1 : s + len(c)] = logp.argmax(-1).cpu().numpy()
    return nll, top


def score_document(model, tokenizer, text: str, rx: re.Pattern | None, seq_len: int, batch_size: int,
                   device, scores: Scores) -> None:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    nll, top = token_nll(model, ids, seq_len, batch_size, device)
    spans = [(m.start(), m.end(), m.group()) for m in rx.finditer(text)] if rx else []
    in_marker = np.zeros(len(text), dtype=bool)
    for s, e, _ in spans:
        in_marker[s:e] = True
    counted = ~in_marker  # story-text characters in the text denominator
    first_chars = offsets[0][1] - offsets[0][0] if ids else 0  # the unpredicted first token
    if ids:
        counted[offsets[0][0] : offsets[0][1]] = False
    is_marker = _assign_tokens(offsets, spans, scores, nll, top, ids)
    for t, (s, e) in enumerate(offsets):
        if is_marker[t]:
            counted[s:e] = False
    predicted_text = [t for t in range(1, len(ids)) if not is_marker[t]]
    scores.documents += 1
    scores.chars += len(text)
    scores.scored_chars += len(text) - first_chars
    scores.text_chars += int(counted.sum())
    scores.tokens += sum(1 for s, e in offsets if e > s)  # the text's own tokens, not BOS
    scores.nll += float(nll[1:].sum())
    scores.text_nll += float(nll[predicted_text].sum())


def _assign_tokens(offsets, spans, scores: Scores, nll, top, ids) -> list[bool]:
    """Mark each token touching a marker span; add its NLL (and the top-1 check) to that marker."""
    is_marker = [False] * len(offsets)
    t = 0
    for s, e, marker in spans:
        stats = scores.markers.setdefault(marker, MarkerStats())
        stats.count += 1
        while t < len(offsets) and offsets[t][1] <= s:
            t += 1
        touched = []
        for u in range(t, len(offsets)):
            a, b = offsets[u]
            if a >= e:
                break
            if b > a and b > s and not is_marker[u]:  # not BOS, not given to the previous marker
                is_marker[u] = True
                touched.append(u)
        if touched and touched[0] > 0:  # an occurrence opening the document is never predicted
            stats.predicted += 1
            stats.nll += float(nll[touched].sum())
            stats.top1 += int(top[touched[0]] == ids[touched[0]])
    return is_marker


def evaluate_texts(model, tokenizer, texts, markers, seq_len: int, batch_size: int, device) -> Scores:
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("eval needs a fast tokenizer (offset mapping) to tell marker tokens from text; "
                        "this model only has a slow one")
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len}: at least 2 tokens are needed to predict one")
    rx = marker_regex(markers)
    scores = Scores()
    with phase("evaluate", len(texts), "documents") as progress:
        for text in texts:
            nll, chars = scores.text_nll, scores.text_chars
            score_document(model, tokenizer, text, rx, seq_len, batch_size, device, scores)
            # Per document too: ablate's verdict counts the books each variant wins, not only the sums.
            scores.per_document_text.append(_ratio((scores.text_nll - nll) / LN2, scores.text_chars - chars))
            progress.advance()
    return scores


def default_seq_len(model) -> int:
    """Windows of min(2048, the model's context) tokens."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN

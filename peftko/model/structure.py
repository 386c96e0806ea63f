"""`generate --structure strict`: a logits processor that keeps the corpus's marker grammar.

At each step the grammar's state (peftko.corpus.grammar.GrammarState, followed from the prompt and
every token written since) says which markers may come next. Forbidden, and so given no
probability:
- a marker the grammar does not allow here (an END without its START, a block the corpus never
  had here, the book end while a block is open, a marker right after itself where the corpus never
  repeats it, the END of a block with nothing inside where the corpus never leaves it empty: an
  empty title is well-formed to a parser and useless to a reader);
- a piece of a marker (`|`, `OF`, `END`, `TITLE`, `|>`) where the whole marker is one token, unless
  the corpus also writes that piece as plain text (MarkerGrammar.text_pieces): spelled in pieces, a
  marker is text to every reader downstream;
- a line break inside a block the corpus always closes on its own line (a title), and the base's
  end-of-sequence while a block is open.
Every other token keeps its logit: text is the model's.

A grammar that only forbids moves the forbidden probability onto whatever text was next most
likely, and that is where marker words leak in as text (`"OF"`, `ENDOF`): the issue measured it in
llama.cpp. So the probability taken from forbidden tokens goes to what the structure needs (the
closer of the innermost open block, or the book end once all is closed), and only where nothing is
needed is it spread over the rest as plain renormalisation does. Near the token limit the closers
are forced, one per token left, so a strict sample always ends as a well-formed book.

Greedy decoding (temperature 0) picks one token, and a sum of many small forbidden shares given to
one closer outvotes every single text token even where text holds most of the probability: the
demo's model, one quotation mark into a title, gave the forbidden tokens 12.5 % (no one over 4.5 %)
and its best Korean token 4.0 %, and greedy closed every block after one character. So under greedy
the pooled share closes a block only when it is the majority (over half of the probability);
otherwise the closer competes with its own probability, as every other token does. Sampling keeps
the pooled share: there the probabilities are drawn from, not compared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from peftko.core.errors import UserError
from peftko.corpus.grammar import GrammarState, follow
from peftko.run.grammar_record import MarkerGrammar

STRUCTURES = ("strict", "free")
NO_PATTERN = r"(?!)"  # the state follows the grammar's own markers, found literally
_BLANK = re.compile(r"(?:[\s▁ĠĊĉč]|<0x(?:0[9ADad]|20)>)+")  # raw token strings that may decode to whitespace
_NEWLINE = re.compile(r"\n|Ċ|<0x0[Aa]>")


@dataclass(frozen=True)
class Guide:
    """The tokenizer's view of a grammar, built once per model: ids of the markers and of the text
    tokens that matter to the structure."""

    grammar: MarkerGrammar
    pattern: str
    doc_end: str | None
    marker_ids: dict[str, int]  # grammar markers that are one token here
    fragments: torch.Tensor  # bool per id: a piece of a whole marker, never written as text by the corpus
    newlines: torch.Tensor  # bool per id: holds a line break
    blanks: frozenset  # ids that decode to whitespace only
    ends: frozenset  # the base's end-of-sequence ids (not the book end)

    @property
    def id_marker(self) -> dict[int, str]:
        return {i: m for m, i in self.marker_ids.items()}


def single_token_ids(tokenizer, markers) -> dict[str, int]:
    ids = {}
    for m in markers:
        got = tokenizer(m, add_special_tokens=False)["input_ids"]
        if len(got) == 1:
            ids[m] = got[0]
    return ids


def build_guide(grammar: MarkerGrammar, tokenizer, stop_ids: list[int], doc_end: str | None, rows: int,
                pattern: str = NO_PATTERN) -> Guide:
    """The guide for `tokenizer`; `rows` is the model's vocabulary (its logits' width)."""
    marker_ids = single_token_ids(tokenizer, grammar.markers)
    whole = [m for m in grammar.markers if m in marker_ids]  # "where the whole marker exists"
    pieces = {m[i:j] for m in whole for i in range(len(m)) for j in range(i + 1, len(m) + 1)} - set(grammar.text_pieces)
    alphabet = "".join(sorted({c for m in whole for c in m}))
    run = re.compile(f"[{re.escape(alphabet)}]+") if alphabet else None
    bars = "".join(c for c in alphabet if not c.isalnum())  # the markers' punctuation: | > _
    bar_run = re.compile(f"[{re.escape(bars)}]+") if bars else None
    fragments, newlines = torch.zeros(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.bool)
    blanks = set()
    vocab = tokenizer.get_vocab()
    markers = set(marker_ids.values())
    for raw, i in vocab.items():
        if i >= rows or i in markers:
            continue
        # Decoding 100k+ tokens one by one costs seconds: only raw strings that can matter are decoded.
        interesting = (run is not None and run.search(raw)) or _NEWLINE.search(raw) or _BLANK.fullmatch(raw)
        if not interesting:
            continue
        text = tokenizer.decode([i])
        if "\n" in text:
            newlines[i] = True
        if not text.strip() and text:
            blanks.add(i)
        # A piece: the token is one (`OF`, ` END)`), or it carries the markers' punctuation (`x|`, `|>`)
        # that the corpus never writes as text.
        if run is not None and (_core(text, alphabet) in pieces
                                or (bar_run is not None and any(r in pieces for r in bar_run.findall(text)))):
            fragments[i] = True
    end_id = marker_ids.get(doc_end) if doc_end else None
    ends = frozenset(i for i in stop_ids if i != end_id and i not in markers)
    return Guide(grammar, pattern, doc_end, marker_ids, fragments, newlines, frozenset(blanks), ends)


def _core(text: str, alphabet: str) -> str:
    """The token's text without whitespace and the punctuation around it (`"OF`, ` END)` -> OF, END),
    when what is left is written only in the markers' characters; else "" (`Suits`, `Of`, `LOCK` are
    words, not pieces of `|START_OF_TITLE|>`: a corpus's text is the model's, whatever its letters)."""
    core = text.strip()
    while core and core[0] not in alphabet and not core[0].isalnum():
        core = core[1:]
    while core and core[-1] not in alphabet and not core[-1].isalnum():
        core = core[:-1]
    return core if core and all(c in alphabet for c in core) else ""


def check_structure(structure: str, grammar: MarkerGrammar | None, where: str) -> None:
    """Strict without a grammar is refused: there is nothing to keep."""
    if structure == "strict" and grammar is None:
        raise UserError(f"--structure strict: {where} records no marker grammar (trained before peftko kept one, or "
                        "on a corpus without markers). Pass --structure free, or train again to record it.")


class StructureProcessor(LogitsProcessor):
    """One generate() call's processor (one state per row; the prompt is the same for each row)."""

    def __init__(self, guide: Guide, prompt: str, prompt_tokens: int, budget: int, greedy: bool = False):
        self.guide, self.prompt_tokens, self.budget, self.greedy = guide, prompt_tokens, budget, greedy
        self.start = follow(guide.grammar, prompt, guide.pattern, guide.doc_end)
        self.states: list[GrammarState] = []
        self.seen: list[int] = []
        self.id_marker = guide.id_marker
        self.redirected = 0.0  # probability moved from forbidden tokens to what the structure needed
        self.forced = 0  # closers forced at the token limit

    def _state(self, row: int, ids: torch.Tensor) -> GrammarState:
        while len(self.states) <= row:
            self.states.append(self.start.copy())
            self.seen.append(self.prompt_tokens)
        state = self.states[row]
        for token in ids[self.seen[row]:].tolist():
            marker = self.id_marker.get(token)
            if marker is not None:
                state.step(marker)
            elif token not in self.guide.blanks:
                state.text("x")  # any non-blank text parts a marker from its repeat
        self.seen[row] = len(ids)
        return state

    def forbidden(self, state: GrammarState, width: int, device) -> torch.Tensor:
        g = self.guide
        mask = g.fragments[:width].to(device).clone()
        for marker, i in g.marker_ids.items():
            if i < width and not state.allowed(marker):
                mask[i] = True
        if state.one_line_open():
            mask |= g.newlines[:width].to(device)
        if state.to_close():
            for i in g.ends:
                if i < width:
                    mask[i] = True
        return mask

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for row in range(scores.shape[0]):
            state = self._state(row, input_ids[row])
            need = state.needed()
            need_id = self.guide.marker_ids.get(need) if need else None
            left = self.budget - (input_ids.shape[1] - self.prompt_tokens)
            logits = scores[row].float()
            closer = state.closer()
            closer_id = self.guide.marker_ids.get(closer) if closer else None
            if closer_id is not None and left <= state.to_close():  # only the closers still fit, empty or not
                mask = torch.ones_like(logits, dtype=torch.bool)
                mask[closer_id] = False
                self.forced += 1
            else:
                mask = self.forbidden(state, logits.shape[0], logits.device)
                if need_id is not None:
                    mask[need_id] = False
            scores[row] = self._redirect(logits, mask, need_id).to(scores.dtype)
        return scores

    def _redirect(self, logits: torch.Tensor, mask: torch.Tensor, need_id: int | None) -> torch.Tensor:
        total = torch.logsumexp(logits, 0)
        if not torch.isfinite(total):
            return logits
        probs = torch.exp(logits - total)
        moved = probs[mask].sum()
        out = logits.masked_fill(mask, float("-inf"))
        if need_id is not None and moved > 0 and not (self.greedy and probs[need_id] + moved <= 0.5):
            # The same normaliser as before: the closer gets its own share plus all that was forbidden.
            out[need_id] = total + torch.log(probs[need_id] + moved)
            self.redirected += float(moved)
        if not torch.isfinite(out).any():  # everything forbidden and nothing needed: leave the step as it was
            return logits
        return out

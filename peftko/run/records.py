"""The three JSON files a run or a merge writes, as typed records; read and checked here, nowhere else.

- peftko.json, RunRecord: a finished training run (base and fingerprint, markers and their ids,
  vocabulary sizes, the resolved config, the corpus, the results, the files and the adapter's hash).
- run.json, RunIdentityRecord: what the run trains on (peftko.run.identity), for --resume.
- peftko-merge.json, MergeRecord: a merged model's mark (which adapter, which base, the dtype, the
  files peftko wrote there, which a later --force may replace).

`from_json(data, path)` refuses what the readers could not rely on, with a UserError that names the
file; `to_json()` writes the key names the files have always had, and `"format"` (FORMAT_VERSION),
so a folder written before these records reads alike. tests/test_layering.py keeps every other
module from parsing the files by hand.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from peftko.core.errors import UserError
from peftko.run.grammar_record import MarkerGrammar
from peftko.run.layout import FORMAT_VERSION, MANIFEST, MERGE_MARK, RUN_FILE
from peftko.run.record_rules import (FLAG, INTEGER, INTEGERS, NAMES, NUMBER, OBJECT, SEAL, TEXT, Rules, check as _check,
                                     is_int as _is_int, present as _present)


def _read(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


# --- peftko.json
@dataclass(frozen=True)
class BaseFingerprint:
    """peftko.run.identity.fingerprint_base: config.json's SHA-256 and each weight file's SHA-256.

    `scheme` "sha256": every byte hashed; absent: a run recorded before that, whose weight hashes
    are sampled (peftko.run.identity.sampled_fingerprint checks a base against them)."""

    config_sha256: str | None = None
    weights: dict[str, str] | None = None
    scheme: str | None = None

    RULES: ClassVar[Rules] = {"config_sha256": TEXT, "weights": OBJECT, "scheme": TEXT}

    def to_json(self) -> dict:
        return _present({"config_sha256": self.config_sha256, "weights": self.weights, "scheme": self.scheme})

    @classmethod
    def from_json(cls, data: dict) -> BaseFingerprint:
        return cls(data.get("config_sha256"), data.get("weights"), data.get("scheme"))


@dataclass(frozen=True)
class MarkerEntry:
    """One registered marker: its token id, and the base-tokenizer pieces it was split into before."""

    marker: str
    id: int
    pieces_before: int | None = None
    piece_ids: list[int] | None = None
    init_ids: list[int] | None = None  # the pieces its embedding row started from

    RULES: ClassVar[Rules] = {"pieces_before": INTEGER, "piece_ids": INTEGERS, "init_ids": INTEGERS}

    def to_json(self) -> dict:
        return _present({"marker": self.marker, "id": self.id, "pieces_before": self.pieces_before,
                         "piece_ids": self.piece_ids, "init_ids": self.init_ids})

    @classmethod
    def from_json(cls, data: dict) -> MarkerEntry:
        return cls(data["marker"], data["id"], data.get("pieces_before"), data.get("piece_ids"), data.get("init_ids"))


@dataclass(frozen=True)
class Vocab:
    """Tokenizer sizes and embedding rows, before and after the markers were added."""

    rows_after: int  # what merge and reload grow the base's embeddings to
    tokenizer_before: int | None = None
    tokenizer_after: int | None = None
    rows_before: int | None = None

    RULES: ClassVar[Rules] = {"tokenizer_before": INTEGER, "tokenizer_after": INTEGER, "rows_before": INTEGER}

    def to_json(self) -> dict:
        return _present({"tokenizer_before": self.tokenizer_before, "tokenizer_after": self.tokenizer_after,
                         "rows_before": self.rows_before, "rows_after": self.rows_after})

    @classmethod
    def from_json(cls, data: dict) -> Vocab:
        return cls(data["rows_after"], data.get("tokenizer_before"), data.get("tokenizer_after"),
                   data.get("rows_before"))


@dataclass(frozen=True)
class CorpusPart:
    """The training or the held-out part of the corpus (names: the held-out documents)."""

    documents: int | None = None
    characters: int | None = None
    tokens: int | None = None
    names: list[str] | None = None

    RULES: ClassVar[Rules] = {"documents": INTEGER, "characters": INTEGER, "tokens": INTEGER, "names": NAMES}

    def to_json(self) -> dict:
        return _present(asdict(self))

    @classmethod
    def from_json(cls, data: dict) -> CorpusPart:
        return cls(*(data.get(k) for k in cls.RULES))


@dataclass(frozen=True)
class CorpusRecord:
    """What the model card reports of the corpus: the whole, and its training and held-out parts."""

    documents: int | None = None
    characters: int | None = None
    training: CorpusPart | None = None
    held_out: CorpusPart | None = None

    RULES: ClassVar[Rules] = {"documents": INTEGER, "characters": INTEGER, "training": OBJECT, "held_out": OBJECT}

    def to_json(self) -> dict:
        parts = {k: getattr(self, k).to_json() if getattr(self, k) else None for k in ("training", "held_out")}
        return _present({"documents": self.documents, "characters": self.characters, **parts})

    @classmethod
    def from_json(cls, data: dict) -> CorpusRecord:
        part = {k: CorpusPart.from_json(data[k]) if isinstance(data.get(k), dict) else None
                for k in ("training", "held_out")}
        return cls(data.get("documents"), data.get("characters"), **part)

    @staticmethod
    def problems(data: dict) -> list[str]:
        return _check(data, CorpusRecord.RULES, "corpus.") + [
            p for k in ("training", "held_out") if isinstance(data.get(k), dict)
            for p in _check(data[k], CorpusPart.RULES, f"corpus.{k}.")]


def worse_after_training(bpc_before, bpc_after) -> bool:
    """Compared as printed (3 decimals): a difference nobody is shown is no verdict."""
    numbers = [x for x in (bpc_before, bpc_after) if isinstance(x, (int, float))]
    return len(numbers) == 2 and round(bpc_after, 3) > round(bpc_before, 3)


@dataclass
class Results:
    """What the run measured; written into peftko.json under "results". Filled in as training goes."""

    bpc_base: float | None = None  # held-out bits per character of the base, its own tokenizer
    kernels: str | None = None
    bpc_before: float | None = None  # with the markers registered, before training
    train_loss: float | None = None
    steps: int | None = None
    tokens_seen: int | None = None  # every input position the steps processed (the Trainer's count)
    skipped_steps: int | None = None
    eval_loss: float | None = None  # absent from the manifest without held-out data
    kept_step: int | None = None  # the step whose adapter was kept (lowest held-out loss), when not the last
    bpc_after: float | None = None
    structure: dict | None = None  # with `samples`: held-out continuations scored (peftko.evaluate.structure)
    gpu_peak_load_gib: float | None = None  # CUDA only: loading (and the base's evaluation)
    gpu_peak_train_gib: float | None = None  # CUDA only: training, its evaluations included

    # Left out of the file when None (the others are written as null: "measured nothing").
    OPTIONAL: ClassVar[tuple[str, ...]] = ("eval_loss", "kept_step", "structure", "gpu_peak_load_gib",
                                           "gpu_peak_train_gib")
    RULES: ClassVar[Rules] = {
        "bpc_base": NUMBER, "kernels": TEXT, "bpc_before": NUMBER, "train_loss": NUMBER, "steps": INTEGER,
        "tokens_seen": INTEGER, "skipped_steps": INTEGER, "eval_loss": NUMBER, "kept_step": INTEGER,
        "bpc_after": NUMBER, "structure": OBJECT, "gpu_peak_load_gib": NUMBER, "gpu_peak_train_gib": NUMBER}

    @property
    def worse_after_training(self) -> bool:
        """Held-out bits per character after training above those with the markers registered:
        the adapter predicts the held-out documents worse than no training at all."""
        return worse_after_training(self.bpc_before, self.bpc_after)

    def to_json(self) -> dict:
        record = asdict(self)
        for optional in self.OPTIONAL:
            if record[optional] is None:
                del record[optional]
        return record

    @classmethod
    def from_json(cls, data: dict) -> Results:
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


# What every reader of peftko.json relies on; a file without it is refused with these names.
MANIFEST_SHAPE = {"base_model": str, "base_fingerprint": dict, "markers": list, "vocab": dict, "config": dict}
# The rest, checked where present (a run saved by an older peftko may lack some).
RUN_RULES = {"format": INTEGER, "peftko_version": TEXT, "base_terms": NAMES, "marker_piece_rows": INTEGERS,
             "tied_embeddings": FLAG, "quantization": TEXT, "compute_dtype": TEXT, "corpus": OBJECT,
             "results": OBJECT, "files": NAMES, "grammar": OBJECT, "seal": SEAL}


def manifest_problems(data) -> list[str]:
    """Why DATA is not a peftko.json the readers can rely on; [] when it is."""
    if not isinstance(data, dict):
        return [f"it holds a JSON {type(data).__name__}, not an object"]
    problems = [f"'{k}' is missing" if k not in data else f"'{k}' must be a {t.__name__}"
                for k, t in MANIFEST_SHAPE.items() if not isinstance(data.get(k), t)]
    if isinstance(data.get("vocab"), dict) and not _is_int(data["vocab"].get("rows_after")):
        problems.append("'vocab.rows_after' must be an integer")
    if isinstance(data.get("markers"), list) and not all(
            isinstance(m, dict) and isinstance(m.get("marker"), str) and _is_int(m.get("id"))
            for m in data["markers"]):
        problems.append("each entry of 'markers' needs a text 'marker' and an integer 'id'")
    if not isinstance(data.get("adapter_sha256", ""), str):
        problems.append("'adapter_sha256' must be a string")
    return problems + _part_problems(data)


def _part_problems(data: dict) -> list[str]:
    """The types of the parts beyond MANIFEST_SHAPE, inside the parts it checks as a whole too."""
    problems = _check(data, RUN_RULES)
    for key, part in (("base_fingerprint", BaseFingerprint), ("vocab", Vocab), ("results", Results)):
        if isinstance(data.get(key), dict):
            problems += _check(data[key], part.RULES, f"{key}.")
    if isinstance(data.get("markers"), list):
        problems += [p for i, m in enumerate(data["markers"]) if isinstance(m, dict)
                     for p in _check(m, MarkerEntry.RULES, f"markers[{i}].")]
    if isinstance(data.get("corpus"), dict):
        problems += CorpusRecord.problems(data["corpus"])
    return problems + (MarkerGrammar.problems(data["grammar"]) if isinstance(data.get("grammar"), dict) else [])


@dataclass(frozen=True)
class RunRecord:
    """peftko.json: what a finished training run records. Written last: its presence means complete."""

    base_model: str  # the base's folder, resolved, as training saw it
    base_fingerprint: BaseFingerprint
    markers: list[MarkerEntry]
    vocab: Vocab
    config: dict  # TrainConfig.to_dict(), resolved
    version: int | None = FORMAT_VERSION  # "format" on disk
    peftko_version: str | None = None
    base_terms: list[str] | None = None  # the base's licence files (peftko.model.base.terms_files)
    marker_piece_rows: list[int] | None = None  # old marker pieces trained too (piece_rows)
    tied_embeddings: bool | None = None
    quantization: str | None = None
    compute_dtype: str | None = None
    corpus: CorpusRecord | None = None
    results: Results = field(default_factory=Results)
    files: list[str] | None = None  # what save_final wrote: what a later --force may replace
    adapter_sha256: str | None = None  # checked by every reader (runs saved before it was kept have none)
    grammar: MarkerGrammar | None = None  # the corpus's marker grammar (runs saved before it was kept have none)
    seal: dict[str, str] | None = None  # file -> SHA-256 of each file the run wrote (peftko.run.seal)

    # The fields kept as the file has them, under the same name.
    AS_WRITTEN: ClassVar[tuple[str, ...]] = ("peftko_version", "base_terms", "marker_piece_rows", "tied_embeddings",
                                             "quantization", "compute_dtype", "files", "adapter_sha256", "seal")

    def to_json(self) -> dict:
        return _present({
            "format": self.version, "peftko_version": self.peftko_version, "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint.to_json(), "base_terms": self.base_terms,
            "markers": [m.to_json() for m in self.markers], "marker_piece_rows": self.marker_piece_rows,
            "vocab": self.vocab.to_json(), "tied_embeddings": self.tied_embeddings,
            "quantization": self.quantization, "compute_dtype": self.compute_dtype, "config": self.config,
            "corpus": self.corpus.to_json() if self.corpus else None, "results": self.results.to_json(),
            "files": self.files, "adapter_sha256": self.adapter_sha256,
            "grammar": self.grammar.to_json() if self.grammar else None, "seal": self.seal,
        })

    @classmethod
    def from_json(cls, data, path: Path) -> RunRecord:
        problems = manifest_problems(data)
        if problems:
            raise UserError(f"{path} is not a peftko manifest: {'; '.join(problems)}. "
                            "Restore the file from the training run, or train again.")
        corpus = data.get("corpus")
        return cls(
            base_model=data["base_model"], base_fingerprint=BaseFingerprint.from_json(data["base_fingerprint"]),
            markers=[MarkerEntry.from_json(m) for m in data["markers"]], vocab=Vocab.from_json(data["vocab"]),
            config=data["config"], version=data.get("format"),
            corpus=CorpusRecord.from_json(corpus) if corpus is not None else None,
            results=Results.from_json(data.get("results") or {}), **{k: data.get(k) for k in cls.AS_WRITTEN},
            grammar=MarkerGrammar.from_json(data["grammar"]) if data.get("grammar") is not None else None,
        )

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord:
        """RUN_DIR/peftko.json, or a UserError naming it: unreadable, or not of peftko's shape."""
        path = Path(run_dir) / MANIFEST
        return cls.from_json(_read(path), path)

    @classmethod
    def peek(cls, run_dir: Path) -> RunRecord | None:
        """The record, or None where there is none that reads (for the ownership rules, which refuse
        what they cannot read as peftko's, and never fail on it)."""
        return _or_none(cls.read, run_dir, MANIFEST)

    @staticmethod
    def results_of(run_dir: Path) -> Results | None:
        """The "results" alone, also of an otherwise incomplete peftko.json: the report draws what it has."""
        try:
            data = _read(Path(run_dir) / MANIFEST)
        except UserError:
            return None  # an unfinished run has no peftko.json yet
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, dict) or _check(results, Results.RULES):
            return None
        return Results.from_json(results)

    # What the readers ask of the recorded config.
    @property
    def marker_names(self) -> list[str]:
        return [m.marker for m in self.markers]

    @property
    def doc_end_marker(self) -> str | None:
        return self.config.get("doc_end_marker")

    def book_end(self) -> MarkerEntry | None:
        """The document-end marker, when it is one of the registered markers (one token): generation
        stops there only then."""
        end = self.doc_end_marker
        return next((m for m in self.markers if end and m.marker == end), None)

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.config.get("trust_remote_code"))

    @property
    def allow_pickle(self) -> bool:
        return bool(self.config.get("allow_pickle"))

    @property
    def attn_implementation(self) -> str:
        return self.config.get("attn_implementation", "auto")


def _or_none(read, folder: Path, name: str):
    """read(FOLDER), or None where FOLDER/NAME is missing or does not read as peftko's."""
    if not (Path(folder) / name).is_file():
        return None
    try:
        return read(folder)
    except UserError:
        return None


# --- run.json
@dataclass(frozen=True)
class RunIdentity:
    """What a run trains on (peftko.run.identity.run_identity); --resume compares two of them."""

    config: dict  # TrainConfig.to_dict(); a key added to TrainConfig later reads as its default
    corpus: list[list]  # [name, size, sha256] per file, in reading order
    tokenizer: str  # tokenizer_fingerprint, markers registered
    base: BaseFingerprint
    processes: int | None = None  # data-parallel processes; runs recorded before it was kept: 1

    def to_json(self) -> dict:
        return _present({"config": self.config, "corpus": self.corpus, "tokenizer": self.tokenizer,
                         "base": self.base.to_json(), "processes": self.processes})

    @classmethod
    def from_json(cls, data: dict) -> RunIdentity:
        return cls(data["config"], data["corpus"], data["tokenizer"], BaseFingerprint.from_json(data["base"]),
                   data.get("processes"))

    @staticmethod
    def is_whole(data) -> bool:
        """The shape --resume relies on: a config, a corpus list of [name, size, sha256], a tokenizer
        and a base with its weights."""
        return (isinstance(data, dict) and isinstance(data.get("config"), dict)
                and isinstance(data.get("corpus"), list) and isinstance(data.get("tokenizer"), str)
                and isinstance(data.get("base"), dict) and isinstance(data["base"].get("weights"), dict)
                and all(isinstance(e, list) and len(e) == 3 for e in data["corpus"]))


@dataclass(frozen=True)
class RunIdentityRecord:
    """run.json: the run's identity, written when training starts (peftko.run.resume)."""

    identity: RunIdentity
    bpc_before: float | None = None  # measured on the untrained model: a resumed run keeps it
    resumed_from: str | None = None  # the checkpoint's folder name, on --resume
    version: int | None = FORMAT_VERSION  # "format" on disk; runs recorded before it was kept have none

    RULES: ClassVar[Rules] = {"format": INTEGER, "bpc_before": NUMBER, "resumed_from": TEXT}

    def to_json(self) -> dict:
        # bpc_before is written also when not measured (null), as it always was; resumed_from only on --resume.
        record = _present({"format": self.version, "identity": self.identity.to_json()})
        return {**record, "bpc_before": self.bpc_before, **_present({"resumed_from": self.resumed_from})}

    @classmethod
    def from_json(cls, data, path: Path) -> RunIdentityRecord:
        if not RunIdentity.is_whole(data.get("identity") if isinstance(data, dict) else None):
            raise UserError(f"{path} is not a peftko run record (its identity is missing or malformed): restore it, "
                            "or start again without --resume")
        problems = _check(data, cls.RULES) + _check(data["identity"], {"processes": INTEGER}, "identity.")
        if problems:
            raise UserError(f"{path} is not a peftko run record ({'; '.join(problems)}): restore it, "
                            "or start again without --resume")
        return cls(RunIdentity.from_json(data["identity"]), data.get("bpc_before"), data.get("resumed_from"),
                   data.get("format"))

    @classmethod
    def read(cls, output: Path) -> RunIdentityRecord | None:
        """OUTPUT/run.json; None when there is none, a UserError naming it when it does not read."""
        path = Path(output) / RUN_FILE
        if not path.is_file():
            return None
        return cls.from_json(_read(path), path)

    @staticmethod
    def marks(output: Path) -> bool:
        """Whether OUTPUT/run.json says a training run began here: an object with an "identity" object
        (a looser test than `read`: a damaged identity still marks the folder as a run's)."""
        try:
            data = _read(Path(output) / RUN_FILE)
        except UserError:
            return False
        return isinstance(data, dict) and isinstance(data.get("identity"), dict)


# --- peftko-merge.json
@dataclass(frozen=True)
class MergeRecord:
    """peftko-merge.json: written last into a merged model; what it is, its dtype, which files are ours."""

    adapter: str  # the run directory merged, resolved
    base_model: str  # the base merged into, resolved
    dtype: str  # what the merged weights are in; `generate` and `eval` compute in it
    files: list[str] = field(default_factory=list)  # what a later --force may replace
    version: int | None = FORMAT_VERSION  # "format" on disk
    grammar: MarkerGrammar | None = None  # the run's marker grammar, copied: `generate --structure strict` reads it
    seal: dict[str, str] | None = None  # file -> SHA-256 of each file the merge wrote (peftko.run.seal)

    RULES: ClassVar[Rules] = {"format": INTEGER, "adapter": TEXT, "base_model": TEXT, "dtype": TEXT, "files": NAMES,
                              "grammar": OBJECT, "seal": SEAL}

    def to_json(self) -> dict:
        return _present({"format": self.version, "adapter": self.adapter, "base_model": self.base_model,
                         "dtype": self.dtype, "files": self.files,
                         "grammar": self.grammar.to_json() if self.grammar else None, "seal": self.seal})

    @classmethod
    def from_json(cls, data, path: Path) -> MergeRecord:
        if not isinstance(data, dict):
            problems = [f"it holds a JSON {type(data).__name__}, not an object"]
        else:
            problems = [f"'{k}' is missing" for k in ("adapter", "base_model", "dtype") if data.get(k) is None]
            problems += _check(data, cls.RULES)
            problems += MarkerGrammar.problems(data["grammar"]) if isinstance(data.get("grammar"), dict) else []
        if problems:
            raise UserError(f"{path} is not a peftko merge mark: {'; '.join(problems)}. Restore it, "
                            "or merge again into a new --output.")
        grammar = MarkerGrammar.from_json(data["grammar"]) if data.get("grammar") is not None else None
        return cls(data["adapter"], data["base_model"], data["dtype"], data.get("files") or [], data.get("format"), grammar,
                   data.get("seal"))

    @classmethod
    def read(cls, merged: Path) -> MergeRecord:
        path = Path(merged) / MERGE_MARK
        return cls.from_json(_read(path), path)

    @classmethod
    def peek(cls, merged: Path) -> MergeRecord | None:
        """The mark, or None where there is none that reads: a folder peftko did not write, or a damaged
        mark (then only the mark itself is peftko's, and the dtype is chosen as for any model)."""
        return _or_none(cls.read, merged, MERGE_MARK)

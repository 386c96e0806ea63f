"""`peftko ablate`: should the markers be registered, kept as plain text, or deleted? Measured.

Three LoRA runs with the same base, data split, seed, steps and every other setting:
  registered  markers are single added tokens (the lora-train default);
  as-text     markers stay in the text but are not registered (an empty marker list), so the
              base tokenizer splits them into pieces;
  deleted     markers are removed from every document AFTER the corpus is split into documents.
              The deleted documents are written, in the same order, one JSONL record each, to
              DIR/deleted-data/corpus.jsonl: lora-train then sees the same number of documents
              and its seeded split holds out the same ones. (Deleting can leave a blank first or
              last line, which lora-train trims as in any document.)
Each variant is trained by `run_lora_train` into DIR/<variant>/ and scored on the held-out
documents with the rules of `peftko eval` (peftko/evaluate/scoring.py); `deleted` is scored on
its own, marker-free text. The structure score (peftko/evaluate/structure.py) samples
continuations of the held-out documents' first three quarters and counts those whose START_/END_
pairs balance and that end with the book-end marker.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from peftko.commands.lora_train import run_lora_train, training_inputs
from peftko.core.atomic import replaced_on_success, write_json_atomic
from peftko.core.config import TrainConfig
from peftko.core.errors import Interrupted, UserError
from peftko.core.progress import Result, emit, say
from peftko.corpus.documents import iter_documents
from peftko.corpus.lint import marker_regex
from peftko.corpus.reading import choose_markers, documents_of, read_corpus
from peftko.evaluate.scoring import default_seq_len, evaluate_texts
from peftko.evaluate.structure import SampleOptions, overall_top1, structure_score
from peftko.evaluate.verdict import verdict
from peftko.model.base import resolve_model_path
from peftko.model.inference import load_for_inference
from peftko.model.memory_plan import read_config, shape_from_config
from peftko.run.checkpoints import latest_checkpoint
from peftko.run.ownership import check_place
from peftko.run.records import RunIdentityRecord, RunRecord
from peftko.run.resume import RESUMABLE_KEYS
from peftko.data.packing import choose_val_docs

DELETED_DATA = "deleted-data"


def delete_markers(text: str, rx: re.Pattern) -> str:
    return rx.sub("", text)


def write_deleted_corpus(docs: list[str], rx: re.Pattern, folder: Path) -> tuple[Path, list[str]]:
    """The documents without markers, one JSONL record each, read back as lora-train will read them."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    with replaced_on_success(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": delete_markers(doc, rx)}, ensure_ascii=False) + "\n")
    back = list(iter_documents(path, "utf-8", "text", ""))
    if len(back) != len(docs):
        raise UserError(f"{len(docs) - len(back)} document(s) hold nothing but markers; deleting the markers "
                        "would empty them and shift the held-out split. Remove those documents first.")
    return path, back


def variant_configs(cfg: TrainConfig, out: Path, deleted_path: Path) -> dict[str, TrainConfig]:
    """Every setting the same but the output, the marker list and (deleted) the data. The variants do
    not sample at the end of training (`samples`): ablate samples each of them itself, alike."""
    cfg = dataclasses.replace(cfg, samples=0)
    return {
        "registered": dataclasses.replace(cfg, output=str(out / "registered")),
        "as-text": dataclasses.replace(cfg, output=str(out / "as-text"), markers=[]),
        "deleted": dataclasses.replace(cfg, output=str(out / "deleted"), markers=[], data=[str(deleted_path)],
                                       jsonl_field="text"),
    }


def evaluate_variant(name: str, run_dir: Path, held_out: list[str], markers: list[str], cfg: TrainConfig,
                     opts: SampleOptions) -> dict:
    """Held-out scores of one trained variant, by the rules of `peftko eval`, and its structure score."""
    model, tokenizer, info = load_for_inference(run_dir, device=cfg.device)
    seq_len = cfg.seq_len if isinstance(cfg.seq_len, int) else default_seq_len(model)
    scored = markers if name != "deleted" else []
    scores = evaluate_texts(model, tokenizer, held_out, scored, seq_len, cfg.batch_size,
                            next(model.parameters()).device).to_json()
    results = RunRecord.read(run_dir).results
    row = {"variant": name, "dir": str(run_dir), "vocab": len(tokenizer),
           "registered_markers": len(info.markers), "train_loss": results.train_loss,
           "bpc_text": scores["bits_per_char_text"], "bpc": None, "marker_top1": None, "structure": None,
           "tokens_per_char": scores["tokens_per_char"], "held_out_chars": scores["chars"], "eval": scores}
    if name != "deleted":
        row["bpc"] = scores["bits_per_char"]
        row["marker_top1"] = overall_top1(scores["markers"])
        row["structure"] = structure_score(model, tokenizer, info, held_out, markers, opts, cfg.doc_end_marker,
                                           cfg.marker_pattern, cfg.seed)
    return row


def train_variant(name: str, vcfg: TrainConfig, force: bool) -> None:
    """Train one variant, or carry on where an interrupted ablate left it: a finished variant of the
    same settings is kept, one with a checkpoint resumes (lora-train checks it is the same run), one
    stopped before its first checkpoint starts again (--force replaces only what that run wrote)."""
    folder = Path(vcfg.output)
    finished = None if force else RunRecord.peek(folder)
    if finished is not None and same_settings(finished.config, vcfg):
        say(f"kept: {folder} is this variant, trained to the end by an earlier ablate")
        return
    resume = not force and finished is None and latest_checkpoint(folder) is not None
    restart = not force and not resume and RunIdentityRecord.marks(folder)
    code = run_lora_train(vcfg, resume=resume, force=force or restart)
    if code in (130, 143):
        raise Interrupted(code - 128, f"while training the {name} variant; its checkpoint, if one was written, "
                          f"is in {folder}. Run the same ablate command again (or with --resume) to continue: "
                          "finished variants are kept and this one resumes.")
    if code != 0:
        raise UserError(f"training the {name} variant stopped (exit {code}); nothing was compared")


def same_settings(recorded: dict, cfg: TrainConfig) -> bool:
    """A finished variant may be kept when only what --resume lets change differs (and seq_len, which
    lora-train records resolved when the config says auto)."""
    now = cfg.to_dict()
    free = RESUMABLE_KEYS | ({"seq_len"} if cfg.seq_len == "auto" else set())
    return all(recorded.get(k) == now.get(k) for k in (set(recorded) | set(now)) - free)


TOY_PARAMS = 50e6  # below this a base is a toy (the built-in tiny-llama: random weights, briefly trained)


def toy_base_note(model_path: Path) -> str:
    """A sign test can be "sure" about a toy base: say that the verdict is about that toy."""
    try:
        params = shape_from_config(read_config(model_path)).total_params
    except (KeyError, TypeError, ValueError, OSError):
        return ""
    if params >= TOY_PARAMS:
        return ""
    return (f" Note: the base has {params / 1e6:.1f} M parameters, a toy initialised at random (like builtin:tiny-llama): "
            "the verdict says what markers do for it, not for a pretrained base; run ablate on the base you will train.")


def run_ablate(cfg: TrainConfig, opts: SampleOptions = SampleOptions(), force: bool = False,
               as_json: bool = False) -> dict:
    out = Path(cfg.output)
    # Before anything is written (DIR/deleted-data first): never into the corpus or the base.
    check_place(out, training_inputs(cfg, resolve_model_path(cfg.model)))
    if (out / "ablation.json").exists() and not force:
        raise UserError(f"{out} already holds an ablation; pass --force to run it again, or choose another --output")
    # The corpus and its markers as lora-train reads and chooses them (its summary, its refusals).
    report, files = read_corpus(cfg.corpus())
    markers = choose_markers(cfg.corpus(), report)
    docs = documents_of(files, cfg.jsonl_field, cfg.doc_end_marker)
    val = sorted(choose_val_docs(len(docs), cfg.val_fraction, cfg.seed))
    if not val:
        raise UserError("ablate compares held-out documents: use --val-fraction above 0 and a corpus "
                        f"of two documents or more (found {len(docs)})")
    if not markers:
        raise UserError("the corpus has no markers: there is nothing to ablate")
    deleted_path, deleted_docs = write_deleted_corpus(docs, marker_regex(markers), out / DELETED_DATA)
    rows = []
    for name, vcfg in variant_configs(cfg, out, deleted_path).items():
        say(f"\n=== ablate: {name} ===")
        train_variant(name, vcfg, force)
        held_out = [(deleted_docs if name == "deleted" else docs)[i] for i in val]
        rows.append(evaluate_variant(name, Path(vcfg.output), held_out, markers, vcfg, opts))
    answer = verdict(rows) + toy_base_note(resolve_model_path(cfg.model))
    result = {"held_out_documents": val, "markers": markers, "sampling": dataclasses.asdict(opts),
              "config": cfg.to_dict(), "variants": rows, "verdict": answer}
    write_json_atomic(out / "ablation.json", result)
    table = render_table(rows)
    with replaced_on_success(out / "ablation.md") as tmp:
        tmp.write_text(table + "\n\n" + answer + "\n", encoding="utf-8")
    chart = write_chart(rows, out / "ablation.png")
    emit(Result("ablation", result))
    say(json.dumps(result, ensure_ascii=False) if as_json else "\n" + table + "\n\n" + answer)
    say(f"written: {out / 'ablation.json'}, {out / 'ablation.md'}" + (f", {chart}" if chart else ""),
        err=as_json)
    return result


def _f(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def render_table(rows: list[dict]) -> str:
    lines = ["| variant | held-out bpc, story text | held-out bpc, whole text | marker top-1 | structure "
             "(balanced, ends with marker, whole markers only) | marker fragments per sample | structure, "
             "--structure strict | tokens/char | vocab |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["structure"]
        strict = (s or {}).get("strict")
        lines.append(f"| {r['variant']} | {_f(r['bpc_text'])} | {_f(r['bpc'])} | {_f(r['marker_top1'], '.1%')} | "
                     f"{_structure(s)} | {'n/a' if s is None else format(s['fragments_per_sample'], '.1f')} | "
                     f"{_structure(strict)} | {_f(r['tokens_per_char'])} | {r['vocab']} |")
    return "\n".join(lines)


def _structure(s: dict | None) -> str:
    """A structure score's cell; strict's is n/a where the markers are not tokens (nothing to keep)."""
    return "n/a" if s is None else (f"{s['structure']:.2f} ({s['balanced']:.2f}, {s['ends_with_marker']:.2f}, "
                                    f"{s['whole_markers_only']:.2f}; {s['samples']} samples)")


def write_chart(rows: list[dict], path: Path) -> Path | None:
    """Held-out bits per character per variant (English labels only, no CJK font needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("note: matplotlib is not installed; no chart written", err=True)
        return None
    names = [r["variant"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["bpc_text"] or 0 for r in rows], width=0.4, label="story text")
    ax.bar([i + 0.2 for i in x], [r["bpc"] or 0 for r in rows], width=0.4, label="whole text (with markers)")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("held-out bits per character")
    ax.set_title("peftko ablate: markers registered / as text / deleted")
    ax.legend()
    fig.tight_layout()
    with replaced_on_success(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path

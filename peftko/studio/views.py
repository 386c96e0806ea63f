"""What the pages show, read from the corpus and the run folders (never from the studio's memory)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from peftko.core.config import BUILTIN_DATA, BUILTIN_MODEL, DEFAULT_MARKER_PATTERN
from peftko.core.errors import UserError
from peftko.corpus.documents import iter_lines, scan_file
from peftko.corpus.scan import scan_corpus
from peftko.run.layout import LOCK, MANIFEST, METRICS, REPORT, RUN_FILE
from peftko.run.plot import read_history
from peftko.run.records import MergeRecord, RunRecord
from peftko.studio.jobs import STUDIO_DIR
from peftko.studio.sandbox import Root

BUILTIN_BASES = (BUILTIN_MODEL, "builtin:gemma-3-270m")
BOOK_MAX_LINES = 3000
RUN_DEPTH = 4
MARKER = re.compile(DEFAULT_MARKER_PATTERN)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # a source checkout's presets, when there is one


# --- Corpus
def corpus_report(root: Root, corpus: str) -> dict:
    """`peftko markers` as JSON, with paths as the page names them."""
    path = root.corpus(corpus)
    report = scan_corpus([path], DEFAULT_MARKER_PATTERN).to_json()
    base = path if path.is_dir() else path.parent
    for entry in report["files"]:
        entry["name"] = _relative(Path(entry["path"]), base)
    for p in report["problems"]:
        p["name"] = _relative(Path(p["path"]), base)
    del report["pieces"], report["tokens_per_syllable"]
    report["corpus"] = corpus
    return report


def book(root: Root, corpus: str, name: str) -> dict:
    """One file of the corpus as lines of text and marker pieces, with the problems of each line."""
    base = root.corpus(corpus)
    folder = base if base.is_dir() else base.parent
    path = (folder / name).resolve()
    if folder not in path.parents and path != base:
        raise UserError(f"{name}: not a file of the corpus {corpus}")
    if not path.is_file():
        raise UserError(f"{name}: no such file in the corpus {corpus}")
    scan = scan_file(path)
    if scan.status != "ok":
        raise UserError(f"{name}: {scan.describe()}")
    problems: dict[int, list[str]] = {}
    for p in scan_corpus([base], DEFAULT_MARKER_PATTERN).problems:  # the corpus's, as its report lists them
        if Path(p.path).resolve() == path:
            problems.setdefault(p.line, []).append(p.text)
    lines = []
    for number, text in enumerate(iter_lines(path, scan.encoding), start=1):
        if number > BOOK_MAX_LINES:
            break
        lines.append({"n": number, "parts": split_markers(text.rstrip("\n")), "problems": problems.get(number, [])})
    return {"name": name, "encoding": scan.encoding, "lines": lines, "cut": number > BOOK_MAX_LINES if lines else False}


def split_markers(text: str) -> list[list[str]]:
    """[["t", text], ["m", marker], ...]: the page draws each marker as a chip."""
    parts, at = [], 0
    for m in MARKER.finditer(text):
        if m.start() > at:
            parts.append(["t", text[at:m.start()]])
        parts.append(["m", m.group()])
        at = m.end()
    if at < len(text) or not parts:
        parts.append(["t", text[at:]])
    return parts


# --- Train
def choices(root: Root) -> dict:
    """What the Train and Try pages offer: presets, bases, corpora, folders, runs."""
    presets = {}
    for folder in (CONFIGS, root.path / "configs"):
        if folder.is_dir():
            for f in sorted(folder.glob("*.yaml")):
                presets[f.name] = root.shown(f)
    return {"presets": [{"name": n, "path": p} for n, p in sorted(presets.items())], "bases": list(BUILTIN_BASES),
            "corpora": [BUILTIN_DATA], "folders": root.folders(), "root": str(root.path)}


def metrics(root: Root, run: str) -> dict:
    """The curves of a run folder (metrics.jsonl): training loss, held-out loss, learning rate by step."""
    folder = root.inside(run, must_exist=False)
    if not (folder / METRICS).is_file():
        return {"loss": [], "eval_loss": [], "lr": [], "results": {}}
    history = read_history(folder)
    return {"loss": [[r["step"], r["loss"]] for r in history.train if _number(r.get("loss"))],
            "lr": [[r["step"], r["lr"]] for r in history.train if _number(r.get("lr"))],
            "eval_loss": [[r["step"], r["eval_loss"]] for r in history.evals if _number(r.get("eval_loss"))],
            "results": history.results}


# --- Runs
def runs(root: Root) -> list[dict]:
    """Every run folder under the root (a peftko.json, or a run.json of one still training), and every
    merged model, newest first."""
    found = []
    for folder in _walk(root.path, RUN_DEPTH):
        if (folder / MANIFEST).is_file() or (folder / RUN_FILE).is_file():
            found.append(_run(root, folder))
        elif (merged := MergeRecord.peek(folder)) is not None:
            found.append({"path": root.shown(folder), "kind": "merged", "mtime": folder.stat().st_mtime,
                          "adapter": root.shown(Path(merged.adapter)), "dtype": merged.dtype})
    return sorted(found, key=lambda r: -r["mtime"])


def _run(root: Root, folder: Path) -> dict:
    entry = {"path": root.shown(folder), "kind": "run", "mtime": folder.stat().st_mtime,
             "complete": False, "report": (folder / REPORT).is_file(), "locked": (folder / LOCK).exists(),
             "checkpoints": sorted(p.name for p in folder.glob("checkpoint-*") if p.is_dir())}
    try:
        record = RunRecord.read(folder) if (folder / MANIFEST).is_file() else None
    except UserError as e:
        entry["problem"] = str(e)
        record = None
    if record is not None:
        r = record.results
        entry.update(complete=True, base=record.config.get("model") or record.base_model,
                     markers=record.marker_names, steps=r.steps, bpc_base=r.bpc_base, bpc_before=r.bpc_before,
                     bpc_after=r.bpc_after, kept_step=r.kept_step, eval_loss=r.eval_loss, train_loss=r.train_loss,
                     structure=r.structure)
    return entry


def runs_record(folder: Path) -> RunRecord | None:
    """The run's peftko.json, or None where it has none that reads."""
    return RunRecord.peek(folder)


def _walk(top: Path, depth: int):
    level = [top]
    for _ in range(depth):
        nxt = []
        for folder in level:
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            for e in entries:
                if e.is_dir() and not e.is_symlink() and not e.name.startswith(".") \
                        and not e.name.startswith("checkpoint-") and e.name != STUDIO_DIR:
                    yield e
                    nxt.append(e)
        level = nxt


# --- Markers: keep or delete? (what `peftko ablate` wrote)
ABLATION, ABLATION_CHART = "ablation.json", "ablation.png"


def ablation(root: Root, folder: str) -> dict:
    """An ablate output folder's verdict and its rows (ablation.json); {"done": False} before it is written."""
    path = root.inside(folder, must_exist=False) / ABLATION
    if not path.is_file():
        return {"done": False}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = [{k: r.get(k) for k in ("variant", "bpc_text", "bpc", "marker_top1", "tokens_per_char", "vocab",
                                        "structure")} for r in data["variants"]]
        return {"done": True, "verdict": str(data["verdict"]), "variants": rows, "markers": data.get("markers", []),
                "held_out": len(data.get("held_out_documents", [])),
                "chart": (path.parent / ABLATION_CHART).is_file()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{root.shown(path)}: not an ablation peftko ablate wrote ({e})") from None


def ablation_chart(root: Root, folder: str) -> Path:
    path = root.inside(folder) / ABLATION_CHART
    if not path.is_file():
        raise UserError(f"{folder}: no {ABLATION_CHART}")
    return path


def image(root: Root, run: str) -> Path:
    """A run's report.png, under the root."""
    path = root.inside(run) / REPORT
    if not path.is_file():
        raise UserError(f"{run}: no {REPORT} yet")
    return path


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return path.name


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")

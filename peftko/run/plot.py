"""`peftko report RUN_DIR`: one picture of a run, RUN_DIR/report.png.

Everything comes from the run directory: metrics.jsonl (one JSON object per log: loss, lr,
grad_norm and tokens_seen from training; eval_loss from the held-out documents; a last line with
the bits per character) and the "results" of peftko.json when the run finished: the step whose
adapter keep_best kept, ringed on the held-out loss, and with `samples` the structure of sampled
continuations (pairs closed, book ended, whole markers only, marker fragments per sample). A run that is
still going, or was stopped, is plotted as far as it got.

Labels are Korean first. matplotlib's own font (DejaVu Sans) has no Hangul, so the NanumGothic
file that the koreanize-matplotlib package ships (SIL Open Font License) is registered by path;
importing that package instead would change matplotlib's global settings as a side effect.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from peftko.core.atomic import replaced_on_success
from peftko.core.errors import UserError
from peftko.core.progress import say, warn
from peftko.run.layout import METRICS, REPORT as REPORT_FILE
from peftko.run.records import RunRecord, worse_after_training

FONT_PACKAGE, FONT_FILE = "koreanize_matplotlib", "fonts/NanumGothic.ttf"

TOKENS = "학습한 토큰 수 (tokens seen)"
TRAIN_LOSS = "학습 손실 (training loss)"
EVAL_LOSS = "검증 손실 (held-out loss)"
LOSS = "손실 (loss)"
LR = "학습률 (learning rate)"
GRAD_NORM = "기울기 노름 (gradient norm)"
SKIPPED = "건너뛴 스텝 (skipped non-finite steps)"
BPC = "문자당 비트 (bits per character), 낮을수록 좋음 (lower is better)"
BPC_BARS = (  # results key, label, colour
    ("bpc_base", "기본 모델\n(base, its own tokenizer)", "tab:gray"),
    ("bpc_before", "마커 등록 후\n(markers registered)", "tab:blue"),
    ("bpc_after", "학습 후\n(trained)", "tab:green"),
)
NOT_MEASURED = "측정하지 않음\n(not measured: no held-out documents)"
NOT_YET = "아직 측정하지 않음\n(not measured yet:\nthe run has not finished)"
KEPT = "남긴 어댑터 (kept adapter): step {step}"
STRUCTURE = "생성 구조 (structure of {n} samples)\n마커 조각 (marker fragments): 샘플당 {frag:.1f} per sample"
WORSE_LABEL = "학습 후: 나빠짐\n(trained: worse)"
STRUCTURE_BARS = (  # results["structure"] key, label, colour
    ("balanced", "쌍 닫힘\n(pairs closed)", "tab:blue"),
    ("ends_with_marker", "책 끝 마커\n(book ended)", "tab:orange"),
    ("whole_markers_only", "온전한 마커만\n(whole markers)", "tab:green"),
    ("structure", "셋 다\n(all three)", "tab:purple"),
)
STRUCTURE_NOT_MEASURED = "생성 구조: 측정하지 않음\n(structure not measured:\ntrain with samples: 1 or more)"


@dataclass
class RunHistory:
    """What a run logged, split by kind of record."""

    name: str
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    results: dict = field(default_factory=dict)

    @property
    def non_finite(self) -> list[dict]:
        """Logged training records whose loss or gradient norm is NaN/inf: steps the guard skipped."""
        return [r for r in self.train if not all(_finite(r.get(k)) for k in ("loss", "grad_norm"))]


def _finite(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))


def read_history(run_dir: Path) -> RunHistory:
    """metrics.jsonl and peftko.json of RUN_DIR, or a UserError saying what is missing."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS
    if not metrics.is_file():
        raise UserError(f"{metrics} not found: RUN_DIR must be the --output of `peftko lora-train` "
                        "(it is written from the first logged step on)")
    history = RunHistory(name=run_dir.resolve().name)
    # errors="replace": a line damaged mid-file (a crash, a full disk, stray bytes) fails to parse
    # below and is skipped; the rest still plots.
    with open(metrics, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            if "loss" in record:
                history.train.append(record)
            elif "eval_loss" in record:
                history.evals.append(record)
            elif "bpc_after" in record:
                history.results.update({k: v for k, v in record.items() if k.startswith("bpc_")})
    history.results.update(_manifest_results(run_dir))
    return history


def _manifest_results(run_dir: Path) -> dict:
    """What peftko.json recorded; a value it did not record leaves metrics.jsonl's in place."""
    results = RunRecord.results_of(run_dir)  # None: an unfinished run has no peftko.json yet
    return {k: v for k, v in results.to_json().items() if v is not None} if results else {}


def hangul_font() -> Path:
    """The NanumGothic file shipped by koreanize-matplotlib, found without importing the package."""
    spec = importlib.util.find_spec(FONT_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / FONT_FILE
        if path.is_file():
            return path
    raise UserError("the Korean font for report.png is missing; install it with: "
                    "pip install koreanize-matplotlib")


def _font_family() -> list[str]:
    """Register NanumGothic with matplotlib; DejaVu Sans after it covers what Nanum lacks (the minus sign)."""
    from matplotlib import font_manager

    path = hangul_font()
    name = font_manager.FontProperties(fname=path).get_name()
    if not any(f.fname == str(path) for f in font_manager.fontManager.ttflist):
        font_manager.fontManager.addfont(str(path))
    return [name, "DejaVu Sans"]


def write_report(run_dir: Path) -> Path:
    """Draw RUN_DIR/report.png (written to a temporary file, then renamed in) and return its path."""
    import matplotlib
    from matplotlib.figure import Figure  # a bare Figure draws with Agg: no display, no pyplot state

    run_dir = Path(run_dir)
    history = read_history(run_dir)
    if not history.train and not history.evals:
        raise UserError(f"{run_dir / METRICS} holds no logged step yet: nothing to plot")
    with matplotlib.rc_context({"font.family": _font_family(), "axes.grid": True, "grid.alpha": 0.3}):
        fig = Figure(figsize=(15, 8), dpi=110, layout="constrained")
        axes = fig.subplot_mosaic([["loss", "loss", "lr"], ["grad", "bpc", "structure"]])
        loss_ax, lr_ax, grad_ax, bpc_ax = (axes[k] for k in ("loss", "lr", "grad", "bpc"))
        _plot_loss(loss_ax, history)
        _plot_line(lr_ax, history.train, "lr", LR, "tab:green")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        _plot_line(grad_ax, history.train, "grad_norm", GRAD_NORM, "tab:purple")
        _mark_skipped(grad_ax, history)
        _plot_bpc(bpc_ax, history.results)
        _plot_structure(axes["structure"], history.results.get("structure"))
        steps = history.results.get("steps") or max(r["step"] for r in history.train + history.evals)
        fig.suptitle(f"{history.name}: {steps} 스텝 (steps)", fontsize=14)
        path = run_dir / REPORT_FILE
        with replaced_on_success(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    return path


def _tokens(record: dict) -> float:
    x = record.get("tokens_seen")
    return x if isinstance(x, (int, float)) and _finite(x) else 0


def _series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(_tokens(r), r[key]) for r in records if r.get(key) is not None and _finite(r[key])]
    return [x for x, _ in points], [y for _, y in points]


def _tokens_axis(ax, title: str) -> None:
    from matplotlib.ticker import EngFormatter

    ax.set_title(title)
    ax.set_xlabel(TOKENS)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _plot_loss(ax, history: RunHistory) -> None:
    ax.plot(*_series(history.train, "loss"), label=TRAIN_LOSS, color="tab:blue")
    if history.evals:
        ax.plot(*_series(history.evals, "eval_loss"), "o-", label=EVAL_LOSS, color="tab:orange")
    _mark_kept(ax, history)
    _mark_skipped(ax, history)
    _tokens_axis(ax, LOSS)
    ax.legend()


def _plot_line(ax, records: list[dict], key: str, title: str, color: str) -> None:
    ax.plot(*_series(records, key), color=color)
    _tokens_axis(ax, title)


def _mark_skipped(ax, history: RunHistory) -> None:
    """A red line where a logged step had a non-finite loss or gradient norm; the count in the legend."""
    bad = history.non_finite
    count = history.results.get("skipped_steps", len(bad))
    for i, record in enumerate(bad):
        ax.axvline(_tokens(record), color="tab:red", alpha=0.6,
                   label=f"{SKIPPED}: {count}" if i == 0 else None)
    if count and not bad:  # skipped between logged steps: say so without a position
        ax.plot([], [], color="tab:red", label=f"{SKIPPED}: {count}")
    if count:
        ax.legend()


def _mark_kept(ax, history: RunHistory) -> None:
    """A ring round the evaluation whose adapter keep_best kept, when it is not the last step's."""
    step = history.results.get("kept_step")
    kept = [r for r in history.evals if r["step"] == step and _finite(r.get("eval_loss"))]
    if kept:
        ax.plot(_tokens(kept[-1]), kept[-1]["eval_loss"], "o", markersize=14, markerfacecolor="none",
                markeredgewidth=2, color="tab:red", label=KEPT.format(step=step))


def _plot_structure(ax, structure: dict | None) -> None:
    if not structure:
        ax.text(0.5, 0.5, STRUCTURE_NOT_MEASURED, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    ax.set_title(STRUCTURE.format(n=structure["samples"], frag=structure["fragments_per_sample"]))
    labels, values, colors = zip(*((label, 100 * structure[key], color) for key, label, color in STRUCTURE_BARS))
    drawn = ax.bar(labels, values, color=colors)
    ax.bar_label(drawn, fmt="%.0f%%")
    ax.set_ylim(0, 115)
    ax.grid(False, axis="x")


def _plot_bpc(ax, results: dict) -> None:
    ax.set_title(BPC)
    bars = [(label, results[key], color) for key, label, color in BPC_BARS if results.get(key) is not None]
    if not bars:
        # A finished run records its steps (peftko.json); before that, the bars are still to come.
        why = NOT_MEASURED if results.get("steps") is not None else NOT_YET
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    if worse_after_training(results.get("bpc_before"), results.get("bpc_after")):
        # Green would read as success: the trained bar is red, and says it is worse.
        bars = [(WORSE_LABEL, value, "tab:red") if label == BPC_BARS[2][1] else (label, value, color)
                for label, value, color in bars]
    labels, values, colors = zip(*bars)
    drawn = ax.bar(labels, values, color=colors)
    ax.bar_label(drawn, fmt="%.3f")
    ax.grid(False, axis="x")
    ax.margins(y=0.15)


# --- the end of lora-train
def write_report_or_warn(output: Path) -> None:
    """End of `lora-train`: a plot that fails must not fail a finished run, so it only warns."""
    try:
        path = write_report(output)
    except Exception as e:  # noqa: BLE001 - the adapter is already saved; anything here is cosmetic
        warn(f"warning: could not draw {Path(output) / REPORT_FILE} ({type(e).__name__}: {e}); "
             f"the run itself is complete. Try again with: peftko report {output}")
        return
    say(f"report: {path} (loss, learning rate, gradient norm, bits per character, structure)")

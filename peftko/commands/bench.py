"""`peftko bench`: lm-evaluation-harness tasks (KoBEST, KMMLU, HAE-RAE, CLIcK, or your own YAMLs)
on each MODEL, side by side, as a table and one JSON record.

Each MODEL is loaded by peftko.model.inference, as `eval` loads it. A training run is scored beside
the base it was trained on (peftko.json), loaded with the run's quantization and dtype, so the
columns differ by the adapter alone; `--no-base` leaves the base out. One model is in memory at a
time. The JSON goes to --json FILE, or else into each run scored (RUN/bench.json).
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from peftko.core.atomic import check_writable, write_json_atomic
from peftko.core.errors import UserError
from peftko.core.progress import Result, emit, say
from peftko.evaluate.bench import BenchOptions, Tasks, hub_access, lm_eval_version, prepare_tasks, quiet_lm_eval, score
from peftko.model.inference import is_adapter_dir, load_for_inference
from peftko.run.layout import BENCH
from peftko.run.records import RunRecord


def run_bench(models: list[str], options: BenchOptions, quant: str | None = None, device: str = "auto",
              dtype: str | None = None, json_file: str | None = None, with_base: bool = True) -> dict:
    targets = json_targets(models, json_file)  # a refusal before any load, not after an hour
    quiet_lm_eval()
    with hub_access(options.download):
        tasks = prepare_tasks(options)
        columns = score_columns(models, tasks, options, quant, device, dtype, with_base)
    result = {"lm_eval": lm_eval_version(), "tasks": list(options.tasks),
              "include_path": str(options.include_path) if options.include_path else None,
              "num_fewshot": options.num_fewshot, "limit": options.limit, "batch_size": options.batch_size,
              "models": columns}
    emit(Result("bench", result))
    say(render(result))
    for path in targets:
        write_json_atomic(path, result)
    if targets:
        say(f"written: {', '.join(str(p) for p in targets)}")
    else:
        say("note: no run among MODEL, so nothing was written; pass --json FILE to keep the scores", err=True)
    return result


def json_targets(models: list[str], json_file: str | None) -> list[Path]:
    """--json FILE, else RUN/bench.json for each training run among the models; each one writable."""
    if json_file is not None:
        path = Path(json_file).expanduser()
        if path.is_dir():
            raise UserError(f"--json {json_file} is a folder; name a file, e.g. {path / BENCH}")
        if not path.parent.is_dir():
            raise UserError(f"--json {json_file}: the folder {path.parent} does not exist; create it first")
        check_writable(path.parent, "--json")
        return [path]
    runs = [p for p in dict.fromkeys(Path(m).expanduser() for m in models) if p.is_dir() and is_adapter_dir(p)]
    for run in runs:
        check_writable(run, "the run folder")
    return [run / BENCH for run in runs]


def score_columns(models: list[str], tasks: Tasks, options: BenchOptions, quant: str | None, device: str,
                  dtype: str | None, with_base: bool) -> list[dict]:
    """One column per MODEL, and first the recorded base of each run among them (once per base,
    quantization and dtype; not when the same model is a MODEL already)."""
    columns = [score_one(m, m, tasks, options, quant, device, dtype) for m in models]
    bases: list[dict] = []
    for run in (c for c in columns if c["kind"] == "adapter" and with_base):
        seen = {(c["model"], c["quant"], c["dtype"]) for c in columns + bases if c["kind"] == "model"}
        if (run["base"], run["quant"], run["dtype"]) not in seen:
            label = f"base ({Path(run['base']).name})"
            bases.append(score_one(label, run["base"], tasks, options, run["quant"], device, run["dtype"]))
    return bases + columns


def score_one(label: str, model_path: str, tasks: Tasks, options: BenchOptions, quant: str | None, device: str,
              dtype: str | None) -> dict:
    """One model loaded, scored on every task, and let go before the next one loads."""
    model, tokenizer, info = load_for_inference(model_path, quant, device, dtype)
    try:
        results = score(model, tokenizer, tasks, options)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    adapter = RunRecord.read(info.path).adapter_sha256 if info.kind == "adapter" else None
    return {"label": label, "model": str(info.path), "kind": info.kind, "base": str(info.base),
            "adapter_sha256": adapter, "quant": info.quant, "device": info.device, "dtype": info.dtype,
            "results": results}


# --- the table


def render(r: dict) -> str:
    """Task rows, one column per model; with two models, the change from the left to the right."""
    columns = r["models"]
    lines = [f"lm-eval {r['lm_eval']}; tasks {','.join(r['tasks'])}"
             + (f"; --limit {r['limit']}: the first {r['limit']} items of each task, not comparable with "
                "published scores" if r["limit"] else "")]
    lines += [f"  {c['label']}: {c['model']} ({_what(c)})" for c in columns]
    header = ["task", "shots", "items", "metric", *(c["label"] for c in columns)]
    rows = [_row(name, metric, columns) for name, entry in columns[0]["results"].items()
            for metric in entry["metrics"] if not metric.endswith("_stderr")]
    if len(columns) == 2:
        header.append("change")
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {1, 2}  # numbers in the count columns line up on the right
    lines += ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              .rstrip() for row in table]
    return "\n".join(lines)


def _what(c: dict) -> str:
    kind = f"adapter on {c['base']}" if c["kind"] == "adapter" else "model"
    return f"{kind}, {c['dtype']}" + ("" if c["quant"] == "none" else f", {c['quant']}")


def _row(name: str, metric: str, columns: list[dict]) -> list[str]:
    first = columns[0]["results"][name]
    values = [c["results"].get(name, {}).get("metrics", {}) for c in columns]
    cells = [_cell(v.get(metric), v.get(f"{metric}_stderr")) for v in values]
    row = [first["alias"], _count(first["n_shot"]), _count(first["samples"]), metric, *cells]
    if len(columns) == 2:
        a, b = (v.get(metric) for v in values)
        row.append("-" if a is None or b is None else f"{b - a:+.3f}")
    return row


def _cell(value, stderr) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")


def _count(n) -> str:
    return "" if n is None else str(n)

"""EleutherAI's lm-evaluation-harness (`lm-eval`, the optional `peftko[bench]`) on a model peftko
loaded: the benchmark half of `peftko bench`.

The model and tokenizer come from peftko.model.inference, the loader of `eval` and `generate`, and are
handed to lm-eval's HFLM as objects: lm-eval loads no weights itself, so an adapter run is scored
exactly as `eval` and `generate` see it. What lm-eval does fetch is task data: a task names a
Hugging Face Hub dataset (`skt/kobest_v1`, `HAERAE-HUB/KMMLU`, ...) that `datasets` downloads once
and then reads from its cache. peftko fetches nothing at run time unless asked, so every call runs
with the Hub switched off (`hub_access`), and `--download` is the one way to let it fetch task data.

This module imports lm_eval at the top; peftko.cli imports it only after checking that lm-eval is
installed (see `peftko bench`).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datasets.exceptions import DatasetNotFoundError
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from peftko.core.errors import UserError

# Each library reads its offline switch once, when it is imported: the variable reaches those
# imported later (lm-eval imports `evaluate` inside some metrics), the constant those imported
# already (datasets, with lm_eval; huggingface_hub, with transformers). The last field: off even with
# --download. lm-eval asks `evaluate` for a metric script (code, not data) even where it computes
# the metric itself (KoBEST's f1); none of the Korean tasks needs one.
OFFLINE_SWITCHES = (
    ("HF_HUB_OFFLINE", "huggingface_hub.constants", "HF_HUB_OFFLINE", False),
    ("HF_DATASETS_OFFLINE", "datasets.config", "HF_HUB_OFFLINE", False),
    ("HF_EVALUATE_OFFLINE", "evaluate.config", "HF_EVALUATE_OFFLINE", True),
)
DOWNLOAD_HINT = ("peftko bench goes online only when asked: run the same command once with --download "
                 "(network needed); the data then stays in the Hugging Face cache (~/.cache/huggingface, or "
                 "$HF_HOME) and later runs read it offline")


@dataclass(frozen=True)
class BenchOptions:
    """What lm-eval runs; the same for every model of one `peftko bench`."""

    tasks: tuple[str, ...]  # task, group or tag names, as lm-eval spells them
    include_path: Path | None = None  # a folder of local task YAMLs
    limit: int | None = None  # the first N items of each task (a quick check, not published numbers)
    num_fewshot: int | None = None  # None: each task's own default
    batch_size: int = 4
    download: bool = False  # let `datasets` fetch task data from the Hub


@contextlib.contextmanager
def hub_access(allowed: bool) -> Iterator[None]:
    """Task data from the Hugging Face Hub allowed (--download) or not, for the block; the switches
    are put back as they were after it."""
    saved_env = {var: os.environ.get(var) for var, *_ in OFFLINE_SWITCHES}
    saved = [(sys.modules[m], attr, getattr(sys.modules[m], attr)) for _, m, attr, _ in OFFLINE_SWITCHES
             if m in sys.modules]
    try:
        for var, module, attr, always in OFFLINE_SWITCHES:
            offline = always or not allowed
            os.environ[var] = "1" if offline else "0"
            if module in sys.modules:
                setattr(sys.modules[module], attr, offline)
        yield
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        for module, attr, value in saved:
            setattr(module, attr, value)


def quiet_lm_eval() -> None:
    """lm-eval warns on every model object passed in (peftko passes one on purpose) and on every
    default it applies; the table and the JSON say which shots and items were scored."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # Its one error: `evaluate` could not fetch a metric (offline), logged even for KoBEST's f1,
    # which lm-eval computes itself from (answer, prediction) pairs and never takes from `evaluate`.
    logging.getLogger("lm_eval.api.registry").setLevel(logging.CRITICAL)


def task_manager(names: tuple[str, ...], include_path: Path | None) -> TaskManager:
    """lm-eval's task index. Indexing its ~14,700 bundled task YAMLs takes seconds; a run over local
    tasks only (no groups, which may name bundled tasks) indexes --include-path alone."""
    if include_path is not None:
        if not include_path.is_dir():
            raise UserError(f"--include-path {include_path}: no such folder (pass the folder of your task YAMLs)")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(names) <= set(local.all_subtasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def check_task_names(manager: TaskManager, names: tuple[str, ...]) -> None:
    """Every name known, or one line naming each unknown one with its close matches."""
    known = manager.all_tasks
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        parts.append(f"{name!r} (close: {', '.join(close)})" if close else f"{name!r} (no close match)")
    raise UserError(f"--tasks: unknown task {'; '.join(parts)}. `lm-eval ls tasks` lists them all; "
                    "--include-path DIR adds your own task YAMLs")


@dataclass(frozen=True)
class Tasks:
    """The tasks of one `peftko bench`, built once (their data read) and scored for every model."""

    manager: TaskManager
    objects: list  # lm-eval's Task and Group objects, one entry per requested name (a tag: its tasks)


def prepare_tasks(options: BenchOptions) -> Tasks:
    """Names checked and data read before any model loads: a missing dataset costs seconds."""
    manager = task_manager(options.tasks, options.include_path)
    check_task_names(manager, options.tasks)
    return Tasks(manager, load_tasks(manager, options.tasks, options.download))


def load_tasks(manager: TaskManager, names: tuple[str, ...], download: bool) -> list:
    loaded = []
    for name in names:
        try:
            found = manager.load(name)
        except (ConnectionError, FileNotFoundError) as e:
            raise UserError(f"--tasks {name}: {_data_problem(e, download)}") from None
        top = found["groups"].get(name) or found["tasks"].get(name)
        loaded += [top] if top is not None else list(found["tasks"].values())  # a tag: its tasks
    try:
        manager.load(loaded)  # objects already built: this only checks that no task is asked for twice
    except ValueError as e:
        raise UserError(f"--tasks {','.join(names)}: {_first_line(e)}; name each task once") from None
    return loaded


def _data_problem(e: BaseException, download: bool) -> str:
    """Hub data missing from the cache (datasets says so in several ways), or a local file missing."""
    hub = isinstance(e, (ConnectionError, DatasetNotFoundError)) or "is not cached" in str(e)
    if hub and download:
        return f"could not fetch its data from the Hugging Face Hub ({_first_line(e)}); check the network"
    if hub:
        return f"its data is on the Hugging Face Hub and not in the local cache ({_first_line(e)}). {DOWNLOAD_HINT}"
    return (f"{_first_line(e)} (a task's relative data_files are read from the current folder, not from "
            "its YAML's; write them absolute)")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def score(model, tokenizer, tasks: Tasks, options: BenchOptions) -> dict:
    """{task or group name: {alias, n_shot, samples, metrics}} for one model; metrics as lm-eval
    names them ("acc", "acc_stderr", "acc_norm", "exact_match,strict-match"), None where
    lm-eval has no finite number (a stderr it did not compute)."""
    with _tied_as_loaded(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
    # Its own task manager, or lm-eval indexes every bundled YAML again for the objects it is given.
    out = simple_evaluate(model=lm, tasks=tasks.objects, task_manager=tasks.manager,
                          num_fewshot=options.num_fewshot, limit=options.limit, log_samples=False)
    return {name: {"alias": row.get("alias", name).strip(),
                   "n_shot": out.get("n-shot", {}).get(name),
                   "samples": out.get("n-samples", {}).get(name, {}).get("effective"),
                   "metrics": _metrics(row)}
            for name, row in out["results"].items()}


@contextlib.contextmanager
def _tied_as_loaded(model) -> Iterator[None]:
    """HFLM ties the input and output embeddings of the model it is given, again. peftko's loader
    has tied them already, and over a tied base (the demo's) a run's input embedding is peft's
    wrapper holding the marker rows: transformers finds no weight under the old name and raises."""
    model.tie_weights = lambda *args, **kwargs: None  # on this object only, for HFLM's constructor
    try:
        yield
    finally:
        del model.tie_weights


def _metrics(row: dict) -> dict:
    """lm-eval's "metric,filter" keys, the filter dropped when there is none."""
    metrics = {}
    for key, value in row.items():
        if "," not in key:  # alias, name, sample_len
            continue
        metric, filt = key.split(",", 1)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        metrics[metric if filt == "none" else key] = float(value) if number else None
    return metrics


def lm_eval_version() -> str:
    return importlib.metadata.version("lm_eval")

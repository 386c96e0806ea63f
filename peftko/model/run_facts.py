"""Opening a training run for use: ONE check behind merge, generate, eval, bench and ablate.

`open_run` reads peftko.json (its shape, peftko.run.records), checks the seal (every file the run
wrote is byte for byte what it wrote, peftko.run.seal) and the base (peftko.run.manifest; a base
peftko built is first compared with its build record, and built again where damaged). Then,
with the run's tokenizer loaded, `check_run_facts` recomputes from the files themselves what the
readers rely on and refuses any disagreement with peftko.json:
  - the embedding rows (vocab.rows_after) from the base's config.json and the saved tokenizer;
  - each marker's id from the saved tokenizer, and the rows the adapter trains
    (adapter_config.json's trainable_token_indices) from the markers and their pieces;
  - adapter_config.json's r, lora_alpha and target_modules from the run's config and the
    adapter's own tensors (an edited lora_alpha would scale every delta);
  - every tensor of adapter_model.safetensors finite: training refuses a run that went
    non-finite, so a NaN or inf there was put there afterwards.
The seal catches a file changed behind the record's back; these catch a forgery consistent with
the seal (the hashes recomputed), as far as the files can tell.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from peftko.core.errors import UserError
from peftko.model.base import as_built, read_base_config
from peftko.model.built_base import Rebuilt, confirm
from peftko.model.token_rows import trained_rows
from peftko.run.layout import ADAPTER_FILES, MANIFEST
from peftko.run.manifest import check_base, read_manifest
from peftko.run.records import RunRecord

WEIGHTS, CONFIG = ADAPTER_FILES
PEFT_PREFIX = "base_model.model."  # how peft names the wrapped model's tensors in the adapter file
LORA_A = ".lora_A.weight"
AGAIN = "Restore the run folder from a copy, or train again."


def open_run(run_dir: Path, base: str | None = None) -> tuple[RunRecord, Path]:
    """(the run's record, its base's folder): the record read and its seal checked, the base
    checked against its fingerprint; a UserError naming the file otherwise."""
    record = read_manifest(Path(run_dir))
    path = run_base(record, base)
    try:
        confirm(path)
    except Rebuilt:
        pass  # built again from its source: check_base hashes the new files
    return record, check_base(record, str(path))


def run_base(record: RunRecord, base: str | None) -> Path:
    """The folder of the run's base (`base` when given); one of peftko's built bases is handed out by
    its builder (peftko.model.base.as_built): a damaged one is rebuilt rather than called changed."""
    return as_built(Path(base or record.base_model))


def check_run_facts(run_dir: Path, base: Path, record: RunRecord, tokenizer) -> None:
    """What peftko.json says, recomputed from the files it describes (see the module docstring)."""
    run_dir = Path(run_dir)
    config = _adapter_config(run_dir)
    problems = (_row_problems(base, record, tokenizer) + _marker_problems(record, tokenizer)
                + _token_row_problems(record, config))
    if problems:
        raise UserError(f"{run_dir / MANIFEST} disagrees with the files it describes: {'; '.join(problems)}. "
                        "It was edited or damaged: restore it from the training run, or train again.")
    shapes = _check_weights(run_dir / WEIGHTS)
    problems = _lora_problems(record, config, shapes)
    if problems:
        raise UserError(f"{run_dir / CONFIG} disagrees with the run it belongs to: {'; '.join(problems)}. "
                        f"It was edited: {AGAIN}")


def _adapter_config(run_dir: Path) -> dict:
    path = run_dir / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}. {AGAIN}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object. {AGAIN}")
    return config


def _row_problems(base: Path, record: RunRecord, tokenizer) -> list[str]:
    config = read_base_config(base)
    base_rows = (config.get("text_config") or config).get("vocab_size")
    if not isinstance(base_rows, int):
        return []  # a config without vocab_size: the streaming merge reads the rows from the tensors
    expected = max(len(tokenizer), base_rows)  # training grows the embeddings to fit the tokenizer, never shrinks
    recorded = record.vocab.rows_after
    if recorded != expected:
        return [f"vocab.rows_after is {recorded}, but the base's {base_rows} rows grown for the saved tokenizer's "
                f"{len(tokenizer)} tokens are {expected}"]
    return []


def _marker_problems(record: RunRecord, tokenizer) -> list[str]:
    problems = []
    for m in record.markers:
        ids = tokenizer(m.marker, add_special_tokens=False)["input_ids"]
        if ids != [m.id]:
            problems.append(f"marker {m.marker} is id {m.id} there but {ids} in the saved tokenizer")
    return problems


def _token_row_problems(record: RunRecord, config: dict) -> list[str]:
    """The rows every embedding module trains are the markers' and their pieces' (the same list for
    the input embedding and a separate lm_head)."""
    recorded = sorted(m.id for m in record.markers)
    pieces = record.marker_piece_rows or []  # a list of integers: RunRecord refuses anything else
    allowed = {p for m in record.markers for p in m.piece_ids or []}
    if not set(pieces) <= allowed:
        return [f"marker_piece_rows {pieces} are not pieces the markers were split into"]
    spec = config.get("trainable_token_indices")
    lists = list(spec.values()) if isinstance(spec, dict) else [spec] if spec is not None else []
    expected = trained_rows(record.markers, pieces)
    for rows in lists:
        if not (isinstance(rows, list) and all(isinstance(r, int) for r in rows)) or sorted(rows) != expected:
            return [f"the markers are ids {recorded} (and their pieces' rows {pieces}) there but "
                    f"{CONFIG} trains rows {rows}"]
    if not lists and expected and not config.get("modules_to_save"):  # whole matrices trained hold the rows too
        return [f"the markers are ids {recorded} there but {CONFIG} trains no token rows"]
    return []


def _check_weights(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape, once every value of every tensor is known to be finite."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    try:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                shapes[key] = list(tensor.shape)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise UserError(f"{path}: tensor {key} holds {bad} NaN or inf values. Training never "
                                    f"writes one (a run that goes non-finite is refused), so the file was changed "
                                    f"after it: {AGAIN}")
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}. It was cut short or damaged: {AGAIN}") from None
    return shapes


def _lora_problems(record: RunRecord, config: dict, shapes: dict[str, list[int]]) -> list[str]:
    """r, lora_alpha and target_modules as the run's config set them and the tensors have them."""
    cfg = record.config
    problems = [f"{key} is {config.get(key)!r} there but {cfg.get(recorded)!r} in {MANIFEST}"
                for key, recorded in (("r", "lora_r"), ("lora_alpha", "lora_alpha"))
                if recorded in cfg and config.get(key) != cfg[recorded]]
    # peftko never sets these: each would change the scale or the rank of some modules.
    problems += [f"{key} is {config[key]!r}, which peftko never writes" for key, unset in
                 (("rank_pattern", {}), ("alpha_pattern", {}), ("use_rslora", False), ("use_dora", False))
                 if config.get(key) not in (None, unset)]
    modules = {k[len(PEFT_PREFIX):-len(LORA_A)]: s for k, s in shapes.items()
               if k.startswith(PEFT_PREFIX) and k.endswith(LORA_A)}
    targets = config.get("target_modules")
    targets = [targets] if isinstance(targets, str) else targets if isinstance(targets, list) else []
    named = {t for t in targets if isinstance(t, str)}
    # peft writes the names it was given (q_proj) or, for all-linear, the modules' full paths.
    def covers(t: str, m: str) -> bool:
        return m == t or m.endswith(f".{t}")
    if (any(not any(covers(t, m) for t in named) for m in modules)
            or any(not any(covers(t, m) for m in modules) for t in named)):
        problems.append(f"target_modules {sorted(named)} are not the modules {WEIGHTS} adapts "
                        f"({sorted(modules)})")
    wanted = cfg.get("target_modules")
    if isinstance(wanted, list) and {m.rsplit(".", 1)[-1] for m in modules} != set(wanted):
        problems.append(f"the adapted modules are {sorted({m.rsplit('.', 1)[-1] for m in modules})}, but the "
                        f"run's config targets {sorted(wanted)}")
    ranks = sorted({s[0] for s in modules.values()})
    if ranks and ranks != [config.get("r")]:
        problems.append(f"its tensors have rank {ranks}, not r = {config.get('r')}")
    return problems

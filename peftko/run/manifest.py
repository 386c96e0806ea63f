"""peftko.json: what a finished run records, read back only when it is whole and consistent.

Every reader of a run folder (merge, eval, generate, ablate) goes through `read_manifest`, which
checks the manifest's shape and the adapter file's hash, and `check_base`, which checks that the
base on disk is the one the run was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftko.core.errors import UserError
from peftko.run.checkpoints import PREFIX, step_of
from peftko.run.identity import fingerprint_base, sha256_file
from peftko.run.layout import ADAPTER_FILES, MANIFEST, RUN_FILE, TOKENIZER_FILES


def read_manifest(run_dir: Path) -> dict:
    """The manifest of a COMPLETE run, checked for shape and against the adapter file it lists,
    or a UserError saying what is missing or wrong."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"adapter directory not found: {run_dir}")
    missing = [n for n in (MANIFEST, *ADAPTER_FILES, *TOKENIZER_FILES) if not (run_dir / n).is_file()]
    if missing and not _started(run_dir):
        raise UserError(f"{run_dir} is not a `peftko lora-train` output (it holds no {MANIFEST}): pass the "
                        "--output folder of a training run.")
    if missing:
        raise UserError(
            f"{run_dir} is incomplete (missing {', '.join(missing)}): the training run did not finish. "
            f"Resume it with `peftko lora-train --output {run_dir} --resume`, or train again."
        )
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {run_dir / MANIFEST}: {e}") from None
    problems = manifest_problems(manifest)
    if problems:
        raise UserError(f"{run_dir / MANIFEST} is not a peftko manifest: {'; '.join(problems)}. "
                        "Restore the file from the training run, or train again.")
    check_adapter_file(run_dir, manifest)
    return manifest


def _started(run_dir: Path) -> bool:
    """Whether a training run began here: its run record or a checkpoint of it is there."""
    return (run_dir / MANIFEST).is_file() or (run_dir / RUN_FILE).is_file() or any(
        step_of(p) is not None for p in run_dir.glob(f"{PREFIX}*") if p.is_dir())


# What readers of peftko.json rely on; checked once, here.
MANIFEST_SHAPE = {"base_model": str, "base_fingerprint": dict, "markers": list, "vocab": dict, "config": dict}


def manifest_problems(data) -> list[str]:
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
    return problems


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_adapter_file(run_dir: Path, manifest: dict) -> None:
    """The adapter file is the one training wrote (runs saved before the hash was kept pass)."""
    expected = manifest.get("adapter_sha256")
    path = Path(run_dir) / ADAPTER_FILES[0]
    if expected and sha256_file(path) != expected:
        raise UserError(f"{path} is not the file training wrote (its SHA-256 differs from the one in "
                        f"{MANIFEST}): it was cut short, damaged or replaced. Restore it, or train again.")


def check_base(manifest: dict, base: str | None) -> Path:
    """The base the run was trained on (or `base`, when given), checked against its fingerprint."""
    path = Path(base or manifest["base_model"]).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"base model not found at {path}; pass its local folder with --base")
    if fingerprint_base(path) != manifest["base_fingerprint"]:
        raise UserError(
            f"the base at {path} does not match the one this adapter was trained on "
            f"({manifest['base_model']}): its config or weights differ. Pass the original base with --base."
        )
    return path

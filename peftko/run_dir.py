"""The output directory: what a finished run holds, and how it is written without half-states.

A finished run directory holds:
  adapter_model.safetensors, adapter_config.json   LoRA + the marker rows (never whole matrices)
  tokenizer files                                  the base tokenizer with the markers added
  peftko.json                                      base path + fingerprint, markers and ids,
                                                   vocabulary sizes, quantization, resolved config
  metrics.jsonl                                    one JSON object per log
  checkpoint-N/                                    optional, for --resume (peftko.checkpoints)
  run.json                                         what the run trains on, checked by --resume
peftko.json is written last, by an atomic rename: its presence means the run is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from peftko.errors import UserError

MANIFEST = "peftko.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer_config.json",)
FORMAT_VERSION = 1


def write_json_atomic(path: Path, data) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fingerprint_base(path: Path) -> dict:
    """Identify a base without reading every byte of a 16 GB checkpoint.

    config.json is hashed whole; each weight file contributes its size, its header (tensor names,
    shapes, dtypes) and 64 chunks sampled across its body, so two fine-tunes of one architecture,
    which share every shape, still differ.
    """
    path = Path(path)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return {
        "config_sha256": sha256_file(path / "config.json"),
        "weights": {w.name: _sampled_hash(w) for w in weights},
    }


def sha256_file(path: Path) -> str:
    """Whole-file SHA-256, read in 1 MB chunks so a large file never sits in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sampled_hash(path: Path, chunks: int = 64, chunk_size: int = 1 << 16) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        h.update(head)
        for i in range(chunks):
            f.seek(size * i // chunks)
            h.update(f.read(chunk_size))
    return h.hexdigest()


def prepare_output(output: Path, resume: bool, force: bool) -> None:
    """Refuse to mix a new run into a directory that holds something, unless told how."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a directory")
    if resume:
        if not output.is_dir():
            raise UserError(f"--resume: {output} does not exist; start without --resume")
        check_writable(output)
        return
    if output.is_dir() and any(output.iterdir()):
        if not force:
            what = "a finished run" if (output / MANIFEST).exists() else "files"
            raise UserError(
                f"--output {output} already holds {what}. Pass --resume to continue it, --force to "
                "replace it, or choose another directory."
            )
        shutil.rmtree(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output {output}: {e.strerror}") from None
    check_writable(output)


def save_final(output: Path, peft_model, tokenizer, manifest: dict) -> None:
    """Adapter and tokenizer first (staged, then renamed in), peftko.json last.

    The previous peftko.json is removed only once the new files are fully written: a failed
    write (a full disk) leaves the previous adapter complete; during the renames, which need no
    space, the directory reads as incomplete, which it is.
    """
    output = Path(output)
    try:
        stage = Path(tempfile.mkdtemp(prefix=".final-", dir=output))
        try:
            # save_embedding_layers=False: only the marker rows, never a full embedding matrix.
            peft_model.save_pretrained(stage, save_embedding_layers=False)
            tokenizer.save_pretrained(stage)
            (output / MANIFEST).unlink(missing_ok=True)
            for f in sorted(stage.iterdir()):
                os.replace(f, output / f.name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        write_json_atomic(output / MANIFEST, {"format": FORMAT_VERSION, **manifest})
    except OSError as e:
        kept = " The previous adapter there is intact." if (output / MANIFEST).exists() else ""
        raise UserError(f"could not write the adapter to {output}: {e.strerror or e} (disk full?).{kept} "
                        "Checkpoints, if any, are intact: free space and run again with --resume.") from None


def check_writable(output: Path) -> None:
    """Fail now, not after an hour of training, if the output directory cannot take a file."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=output)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to --output {output}: {e.strerror or e}") from None


def read_manifest(run_dir: Path) -> dict:
    """The manifest of a COMPLETE run, or a UserError saying what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"adapter directory not found: {run_dir}")
    missing = [n for n in (MANIFEST, *ADAPTER_FILES, *TOKENIZER_FILES) if not (run_dir / n).is_file()]
    if missing:
        raise UserError(
            f"{run_dir} is incomplete (missing {', '.join(missing)}): the training run did not finish. "
            f"Resume it with `peftko lora-train --output {run_dir} --resume`, or train again."
        )
    try:
        return json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {run_dir / MANIFEST}: {e}") from None

"""The output directory: what a finished run holds, and how it is written without half-states.

A finished run directory holds:
  adapter_model.safetensors, adapter_config.json   LoRA + the marker rows (never whole matrices)
  tokenizer files                                  the base tokenizer with the markers added (and
                                                   the base's SentencePiece model, if it has one)
  README.md                                        the model card (peftko.model_card)
  peftko.json                                      base path + fingerprint, markers and ids,
                                                   vocabulary sizes, quantization, resolved config
  metrics.jsonl                                    one JSON object per log
  checkpoint-N/                                    optional, for --resume (peftko.checkpoints)
  run.json                                         what the run trains on, checked by --resume
peftko.json is written last, by an atomic rename: its presence means the run is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from peftko.errors import UserError
from peftko.fingerprints import sha256_file
from peftko.model_card import adapter_card
from peftko.ownership import OutputKind, check_place, entries_to_replace

MANIFEST = "peftko.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer_config.json",)
METRICS = "metrics.jsonl"
REPORT = "report.png"  # peftko.report
LOG_DIRS = ("tensorboard", "wandb")  # --report-to tensorboard / wandb write inside the run
LOCK = ".peftko.lock"
FINAL_STAGE = ".final-"
WRITE_PROBE = ".write-test-"
# The final files of a run whose peftko.json does not list them (saved before it did, or cut
# short between the renames): the adapter, peft's model card, and every tokenizer file name.
FINAL_FILES = (*ADAPTER_FILES, "README.md", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
               "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
               "chat_template.json")
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
FORMAT_VERSION = 1


def write_json_atomic(path: Path, data) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode(0o666))  # mkstemp makes 0600: others could not read the result
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def umask_mode(mode: int) -> int:
    """`mode` as the user's umask would leave it for a newly created file or folder.

    tempfile's staging files and folders are private (0600/0700) by design; whatever becomes a
    result gets the permissions an ordinary write would have given it.
    """
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def publish(folder: Path) -> None:
    """Give a staged folder and its files the permissions of an ordinary write (safetensors and
    tempfile create them 0600/0700), so a model server run as another user can read the result."""
    folder.chmod(umask_mode(0o777))
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(umask_mode(0o666))


def prepare_output(output: Path, resume: bool, inputs: dict[str, Path]) -> None:
    """Refuse an output in the wrong place, create it, and check that it takes a file.

    What is already in it is judged under the lock (claim_run_dir), so two runs never race.
    """
    output = Path(output)
    check_place(output, inputs)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a directory")
    if resume and not output.is_dir():
        raise UserError(f"--resume: {output} does not exist; start without --resume")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output {output}: {e.strerror}") from None
    check_writable(output)


def claim_run_dir(output: Path, resume: bool, force: bool) -> list[Path]:
    """What --force replaces once the new run has passed its checks; refuses what it may not."""
    if resume:
        return []
    what = "a finished run" if (output / MANIFEST).exists() else "an unfinished run"
    refusal = (f"--output {output} already holds {what}. Pass --resume to continue it, --force to "
               "replace it, or choose another directory.")
    return entries_to_replace(output, RUN_KIND, force, refusal)


def _is_run_dir(output: Path) -> bool:
    from peftko.checkpoints import PREFIX, RUN_FILE, step_of

    return ((output / MANIFEST).is_file() or (output / RUN_FILE).is_file()
            or any(step_of(p) is not None for p in output.glob(PREFIX + "*") if p.is_dir()))


def _run_files(output: Path):
    """The entries of a run directory that peftko wrote: its own names, and the final files that
    peftko.json lists (or, for a run saved without that list, the names those files always have)."""
    from peftko import checkpoints as ck

    manifest = read_json_object(output / MANIFEST)
    listed = manifest.get("files") if isinstance(manifest.get("files"), list) else FINAL_FILES
    names = {MANIFEST, ck.RUN_FILE, METRICS, LOCK, REPORT, *LOG_DIRS, *listed}
    # Hidden work files of an interrupted write: staging, deletion, atomic-rename temporaries.
    hidden = (ck.STAGE_PREFIX, ck.TRASH_PREFIX, FINAL_STAGE, WRITE_PROBE, f".{MANIFEST}.",
              f".{ck.RUN_FILE}.", f".{METRICS}.", f".{REPORT}.")
    return lambda name: name in names or ck.step_of(Path(name)) is not None or name.startswith(hidden)


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


RUN_KIND = OutputKind("a training run", _is_run_dir, _run_files, keep=(LOCK,))


def save_final(output: Path, peft_model, tokenizer, manifest: dict) -> None:
    """Adapter and tokenizer first (staged, then renamed in), peftko.json last.

    The previous peftko.json is removed only once the new files are fully written: a failed
    write (a full disk) leaves the previous adapter complete; during the renames, which need no
    space, the directory reads as incomplete, which it is. peftko.json lists the files written
    (what a later --force may replace) and the adapter's SHA-256 (checked by merge).
    """
    output = Path(output)
    try:
        stage = Path(tempfile.mkdtemp(prefix=FINAL_STAGE, dir=output))
        try:
            # save_embedding_layers=False: only the marker rows, never a full embedding matrix.
            peft_model.save_pretrained(stage, save_embedding_layers=False)
            tokenizer.save_pretrained(stage)
            keep_sentencepiece_files(Path(manifest["base_model"]), stage)
            # Over the template peft's save_pretrained just wrote.
            (stage / "README.md").write_text(adapter_card(manifest, output.name), encoding="utf-8")
            files = sorted(f.name for f in stage.iterdir())
            publish(stage)
            digest = sha256_file(stage / ADAPTER_FILES[0])
            (output / MANIFEST).unlink(missing_ok=True)
            for name in files:
                os.replace(stage / name, output / name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        write_json_atomic(output / MANIFEST, {"format": FORMAT_VERSION, **manifest, "files": files,
                                              "adapter_sha256": digest})
    except Exception as e:
        if not is_write_failure(e):
            raise
        kept = " The previous adapter there is intact." if (output / MANIFEST).exists() else ""
        raise UserError(f"could not write the adapter to {output}: {describe_write_failure(e)} "
                        f"(disk full?).{kept} Checkpoints, if any, are intact: free space and run again "
                        "with --resume.") from None


def keep_sentencepiece_files(base: Path, folder: Path) -> list[str]:
    """Copy the base's SentencePiece model files that the tokenizer's save left out.

    transformers 5 saves a fast tokenizer as tokenizer.json alone, even when it was loaded from a
    folder with tokenizer.model; converters that read the SentencePiece model (llama.cpp's, for a
    Gemma or Llama-2 fine-tune) then fail. The markers live in tokenizer.json as added tokens, so
    the base's file is the right one to ship beside it.
    """
    copied = []
    for name in SENTENCEPIECE_FILES:
        if (base / name).is_file() and not (folder / name).exists():
            shutil.copyfile(base / name, folder / name)
            copied.append(name)
    return copied


def is_write_failure(e: BaseException) -> bool:
    """A failed file write, as each writer reports it: OSError from Python, SafetensorError
    ("I/O error") from safetensors, RuntimeError ("unexpected pos", "file write failed") from
    torch.save's C++ writer, which does not say why."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    if type(e).__name__ == "SafetensorError":
        return "I/O error" in text or "os error" in text
    return isinstance(e, RuntimeError) and any(s in text for s in ("unexpected pos", "file write failed",
                                                                    "PytorchStreamWriter"))


def describe_write_failure(e: BaseException) -> str:
    return (e.strerror or str(e)) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"


def check_writable(output: Path) -> None:
    """Fail now, not after an hour of training, if the output directory cannot take a file."""
    try:
        fd, probe = tempfile.mkstemp(prefix=WRITE_PROBE, dir=output)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to --output {output}: {e.strerror or e}") from None


def read_manifest(run_dir: Path) -> dict:
    """The manifest of a COMPLETE run, checked for shape and against the adapter file it lists,
    or a UserError saying what is missing or wrong."""
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
        manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {run_dir / MANIFEST}: {e}") from None
    problems = manifest_problems(manifest)
    if problems:
        raise UserError(f"{run_dir / MANIFEST} is not a peftko manifest: {'; '.join(problems)}. "
                        "Restore the file from the training run, or train again.")
    check_adapter_file(run_dir, manifest)
    return manifest


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

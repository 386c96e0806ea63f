"""The command lines peftko shows a user to run next: the same run resumed, a fresh run with other
settings, or its memory plan."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def resume_command(output: Path) -> str:
    """The command the user ran, with --resume: the same config and flags continue the same run.
    Never with --force: on a resume it switches off the check that config, corpus and base are
    unchanged, which is what makes the continued run the same run."""
    args = [a for a in sys.argv[1:] if a != "--force"]
    if args[:1] != ["lora-train"]:
        return f"peftko lora-train --output {shlex.quote(str(output))} <your config and flags> --resume"
    return "peftko " + shlex.join(args + ([] if "--resume" in args else ["--resume"]))


def dry_run_command() -> str:
    """The command the user ran, as a --dry-run (no --resume or --force)."""
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--force")]
    if args[:1] != ["lora-train"]:
        return "peftko lora-train ... --dry-run"
    return "peftko " + shlex.join(args + ["--dry-run"])


def fresh_run_command(output: Path, new_output: Path, changes: dict[str, str]) -> str:
    """The command the user ran as a new run into `new_output` with `changes` (flag -> value): no
    --resume (a checkpoint keeps the settings it was written with: a resume is the same run) and no
    --force (the new folder is empty; the old one stays for comparison)."""
    changes = {**changes, "--output": str(new_output)}
    args, rest = [], sys.argv[1:]
    while rest:
        a, rest = rest[0], rest[1:]
        if a in ("--resume", "--force") or a.split("=", 1)[0] in changes:
            if a in changes and rest:
                rest = rest[1:]  # the flag's value
            continue
        args.append(a)
    if args[:1] != ["lora-train"]:
        args = ["lora-train", "<your config and flags>"]
    return "peftko " + " ".join([shlex.join(args[:1]), *(a if a.startswith("<") else shlex.quote(a)
                                                          for a in args[1:])]
                                + [f"{flag} {shlex.quote(value)}" for flag, value in changes.items()])

"""The command lines peftko shows a user to run next: the same run resumed, or its memory plan."""

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

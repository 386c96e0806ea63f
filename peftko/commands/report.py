"""`peftko report RUN_DIR`: draw RUN_DIR/report.png (peftko.run.plot) and print where it is."""

from __future__ import annotations

from pathlib import Path

from peftko.core.errors import UserError
from peftko.core.progress import say
from peftko.run.plot import write_report


def run_report(run_dir: str | Path) -> None:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    say(str(write_report(run_dir)))

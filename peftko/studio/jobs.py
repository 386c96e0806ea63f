"""The commands the studio starts: each one a child process in its own session, its events on disk.

A job is a folder ROOT/.peftko-studio/jobs/ID/ holding job.json (what was started, the pid),
events.jsonl (the child's stdout: `--progress json`, one event a line), stderr.log and, once the
child ended while this studio watched it, rc. The child runs in a new session, so stopping or
killing the studio leaves a training running; a reload of the page or a new studio reads the same
folder and re-attaches. Stop sends SIGINT, the CLI's Ctrl-C: the run writes a checkpoint and can
be resumed. Nothing here deletes anything.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from peftko.core.atomic import process_alive
from peftko.core.errors import UserError
from peftko.run.layout import MANIFEST

STUDIO_DIR = ".peftko-studio"
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # the folder that holds the peftko package
LOG_LINES = 60
# Exit codes the CLI documents: 0 done, 130/143 stopped by SIGINT/SIGTERM (resumable).
STOPPED = (130, 143)


@dataclass
class Job:
    id: str
    kind: str  # "train", "plan" (lora-train --dry-run), "ablate", "generate", "merge"
    argv: list[str]  # after `python -m peftko`
    output: str  # the folder the command writes ("" when none), as the page names it
    pid: int
    started: float

    @property
    def command(self) -> str:
        """The command as a user would type it (without --progress json, which only the studio needs)."""
        return command_line(self.argv)


def command_line(argv: list[str]) -> str:
    """`peftko ARGV` quoted for a shell, without the --progress json that only the studio needs."""
    if argv[-2:] == ["--progress", "json"]:
        argv = argv[:-2]
    return shlex.join(["peftko", *argv])


def child_argv(argv: list[str]) -> list[str]:
    """The child's command line: this Python, the cwd kept off sys.path (-P), peftko's ARGV."""
    return [sys.executable, "-P", "-m", "peftko", *argv]


def child_env() -> dict[str, str]:
    """The studio's environment, unbuffered, with its own peftko first on PYTHONPATH, and without
    PYTHONSAFEPATH (-P does its work for the child alone; see Jobs.start)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
    env.pop("PYTHONSAFEPATH", None)
    return env


class Jobs:
    def __init__(self, root: Path):
        self.root = root
        self.folder = root / STUDIO_DIR / "jobs"
        self._lock = threading.Lock()

    # --- starting and stopping
    def start(self, kind: str, argv: list[str], output: str = "") -> Job:
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            n = 1
            while (self.folder / f"{stamp}-{kind}-{n}").exists():
                n += 1
            folder = self.folder / f"{stamp}-{kind}-{n}"
            folder.mkdir()
        argv = [*argv, "--progress", "json"]
        # The child runs the studio's own peftko, never a folder named peftko under the root (its
        # working directory): -P keeps the cwd off the child's sys.path (Python 3.11+). A flag, not
        # PYTHONSAFEPATH in the environment: that would reach the child's own children too, and
        # llama.cpp's converter (merge --gguf) imports the modules beside its script.
        with open(folder / "events.jsonl", "wb") as out, open(folder / "stderr.log", "wb") as err:
            child = subprocess.Popen(child_argv(argv), cwd=self.root, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=err, env=child_env(), start_new_session=True)
        job = Job(folder.name, kind, argv, output, child.pid, time.time())
        (folder / "job.json").write_text(json.dumps(asdict(job), ensure_ascii=False), encoding="utf-8")
        threading.Thread(target=self._wait, args=(child, folder), daemon=True).start()
        return job

    @staticmethod
    def _wait(child: subprocess.Popen, folder: Path) -> None:
        rc = child.wait()
        (folder / "rc.tmp").write_text(str(rc), encoding="utf-8")
        os.replace(folder / "rc.tmp", folder / "rc")

    def stop(self, job_id: str) -> dict:
        job = self.get(job_id)
        if not self._running(job):
            raise UserError(f"job {job_id} is not running")
        os.kill(job.pid, signal.SIGINT)  # Ctrl-C: finish the step, write a checkpoint, exit 130
        return self.state(job_id)

    # --- reading
    def get(self, job_id: str) -> Job:
        path = self.folder / job_id / "job.json"
        if "/" in job_id or job_id.startswith(".") or not path.is_file():
            raise UserError(f"no job {job_id}")
        try:
            return Job(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None

    def ids(self, kind: str | None = None) -> list[str]:
        """Job ids, newest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if (p / "job.json").is_file()]
        found.sort(key=lambda p: p.name, reverse=True)  # the names begin with the time they started
        return [p.name for p in found if kind is None or p.name.split("-")[2:3] == [kind]]

    def _running(self, job: Job) -> bool:
        if (self.folder / job.id / "rc").exists() or not process_alive(job.pid):
            return False
        cmdline = Path(f"/proc/{job.pid}/cmdline")  # the pid may have been reused since
        try:
            argv = cmdline.read_bytes()
        except OSError:
            return not cmdline.parent.parent.is_dir()  # no /proc on this system: trust the pid
        return not argv or b"peftko" in argv  # empty: the child is between fork and exec

    def state(self, job_id: str) -> dict:
        """What the page shows of a job: status, progress, log tail, errors, results."""
        job = self.get(job_id)
        folder = self.folder / job.id
        events = _events(folder / "events.jsonl")
        rc = _rc(folder / "rc")
        errors = [e["text"] for e in events if e.get("event") == "message" and e.get("level") == "error"]
        running = self._running(job)
        if running:
            status = "running"
        elif rc == 0:
            status = "finished"
        elif rc in STOPPED:
            status = "stopped"
        elif rc is not None or errors:
            status = "failed"
        else:
            status = "ended"  # ended while no studio watched it; its events say how
        log = [line for e in events for line in _lines(e)]
        if status == "ended":  # no exit code kept: what the child wrote says how it ended
            if any(line.startswith("peftko: stopped by SIG") for line in log[-5:]):
                status = "stopped"
            elif job.kind == "train" and _newer(self.root / job.output / MANIFEST, job.started):
                status = "finished"
            elif job.kind != "train" and any(e.get("event") == "result" for e in events):
                status = "finished"
        bar = None
        for e in events:
            if e.get("event") in ("started", "advanced", "finished"):
                bar = {"phase": e.get("phase"), "done": e.get("done", 0), "total": e.get("total"),
                       "unit": e.get("unit"), "finished": e.get("event") == "finished"}
        log = log[-LOG_LINES:]
        stderr = _tail(folder / "stderr.log")
        results = {e["name"]: e["value"] for e in events if e.get("event") == "result" and "name" in e}
        return {"id": job.id, "kind": job.kind, "status": status, "rc": rc, "output": job.output,
                "command": job.command, "argv": job.argv, "started": job.started, "progress": bar, "log": log,
                "stderr": stderr, "errors": errors, "results": results,
                "samples": [e["value"] for e in events if e.get("event") == "result" and e.get("name") == "sample"]}

    def latest(self, kind: str, output: str | None = None) -> str | None:
        for job_id in self.ids(kind):
            if output is None or self.get(job_id).output == output:
                return job_id
        return None


def _events(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue  # the line being written right now
        if isinstance(e, dict):
            events.append(e)
    return events


def _lines(event: dict) -> list[str]:
    if event.get("event") == "message" and isinstance(event.get("text"), str):
        return event["text"].splitlines() or [""]
    if event.get("event") == "advanced" and isinstance(event.get("text"), str):
        return [event["text"]]
    return []


def _rc(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def _tail(path: Path, size: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _newer(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False

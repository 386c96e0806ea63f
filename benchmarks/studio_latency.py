"""How fast the studio answers, and how much memory it holds, while a training runs on this machine.

Starts `peftko studio` on a fresh root (a copy of the sample corpus), starts a configs/tiny-demo.yaml
training through its API, and while the training runs asks every page and every endpoint the pages
poll ROUNDS times; prints each one's median and slowest answer and the studio process's RSS (now and
peak, from /proc). Stops the training (SIGINT, as the page's Stop) at the end.

    python benchmarks/studio_latency.py [--rounds 20] [--steps 80]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from peftko.core.paths import sample_corpus_dir  # noqa: E402


def call(url: str, body: dict | None = None) -> tuple[float, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", "X-Peftko": "1"}
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as r:
        payload = r.read()
    return time.perf_counter() - start, payload


def rss_mib(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="studio-bench-"))
    shutil.copytree(sample_corpus_dir(), root / "corpus")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    studio = subprocess.Popen([sys.executable, "-m", "peftko", "studio", "--root", str(root), "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                call(base + "/api/choices")
                break
            except OSError:
                time.sleep(0.1)
        _, answer = call(base + "/api/train", {"preset": "tiny-demo.yaml", "data": "corpus", "output": "runs/bench",
                                               "max_steps": str(args.steps), "logging_steps": "2"})
        job = json.loads(answer)["id"]
        while not json.loads(call(f"{base}/api/metrics?run=runs/bench")[1])["loss"]:
            time.sleep(1)  # until the training is past loading, into its steps
        pages = {"page /": "/", "app.js": "/static/app.js", "choices": "/api/choices",
                 "Corpus: report": "/api/corpus?path=corpus", "Corpus: book": "/api/book?corpus=corpus&file=01_moonlight_postman.txt",
                 "Train: job": f"/api/jobs/{job}", "Train: curves": "/api/metrics?run=runs/bench",
                 "Train: last job": "/api/jobs?kind=train&limit=1", "Runs": "/api/runs",
                 "Runs: two runs' curves": "/api/metrics?run=runs/bench", "pages.js": "/static/pages.js",
                 "Try: models": "/api/runs", "Markers: last ablate": "/api/jobs?kind=ablate&limit=1",
                 "Markers: ablation": "/api/ablation?dir=runs/ablate", "Ship: last merge": "/api/jobs?kind=merge&limit=1"}
        times = {name: [] for name in pages}
        for _ in range(args.rounds):
            for name, path in pages.items():
                times[name].append(call(base + path)[0])
            time.sleep(0.3)
        state = json.loads(call(f"{base}/api/jobs/{job}")[1])
        rss, peak = rss_mib(studio.pid)
        print(f"training still running at the end: {state['status'] == 'running'} "
              f"({state['progress']['done']}/{state['progress']['total']} steps)")
        print("| request | median ms | slowest ms |\n|---|---|---|")
        for name, t in times.items():
            print(f"| {name} | {1000 * statistics.median(t):.0f} | {1000 * max(t):.0f} |")
        print(f"studio RSS: {rss:.0f} MiB now, {peak:.0f} MiB peak")
        call(f"{base}/api/jobs/{job}/stop", {})
        for _ in range(120):
            if json.loads(call(f"{base}/api/jobs/{job}")[1])["status"] != "running":
                break
            time.sleep(1)
    finally:
        studio.terminate()
        studio.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

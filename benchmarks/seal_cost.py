"""What sealing costs: the time to hash every file of a folder as peftko.run.seal does.

A merge seals the files it wrote (the merged weights above all) after writing them, and generate
and eval check a merged model's seal before loading it: each is one SHA-256 pass over the folder,
read from the page cache the write or the previous load left. Usage:

    python benchmarks/seal_cost.py FOLDER [--repeat 3]

prints the folder's size, the best of REPEAT warm passes and the throughput.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from peftko.run.seal import seal_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    names = [p.name for p in args.folder.iterdir() if p.is_file()]
    size = sum((args.folder / n).stat().st_size for n in names)
    seal_files(args.folder, names)  # the first pass warms the page cache, as the write does
    best = min(_timed(args.folder, names) for _ in range(args.repeat))
    print(f"{len(names)} files, {size / 1e6:.0f} MB: sealed in {best:.2f} s ({size / 1e9 / best:.2f} GB/s)")


def _timed(folder: Path, names: list[str]) -> float:
    start = time.perf_counter()
    seal_files(folder, names)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()

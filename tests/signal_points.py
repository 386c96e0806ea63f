"""`python -m tests.signal_points POINT SIGNAL [--again-at-exit] -- PEFTKO ARGS...`

Runs the real `peftko` command in this process, after arranging for a real signal to this process
as one function of the run is entered, as a Ctrl-C or a scheduler's SIGTERM would arrive there:
  data      data.packing.build_packed: the dataset cache's hidden build folder exists
  evaluate  train.session.final_evaluation: training is done, the final evaluation starts
  save      save_final (as the session calls it): the final adapter is being written
  save2     the same, with the signal sent twice (the second one: stop at once)
  report    train.session.write_report_or_warn: the adapter is written, report.png is being drawn
--again-at-exit also sends the signal again while the interpreter shuts down (atexit).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time


def signal_on_entry(owner, name: str, signum: int, times: int = 1) -> None:
    real = getattr(owner, name)

    def wrapper(*a, **kw):
        for _ in range(times):
            os.kill(os.getpid(), signum)
            time.sleep(0.05)  # the handler runs at the next bytecode; give each its turn
        return real(*a, **kw)

    setattr(owner, name, wrapper)


def again_at_exit(signum: int) -> None:
    def send():
        os.kill(os.getpid(), signum)
        time.sleep(1)

    atexit.register(send)


def main() -> None:
    point, signame, *rest = sys.argv[1:]
    split = rest.index("--")
    options, argv = rest[:split], rest[split + 1:]
    signum = getattr(signal, signame)
    import peftko.data.packing
    import peftko.train.session

    owner, name = {"data": (peftko.data.packing, "build_packed"),
                   "evaluate": (peftko.train.session, "final_evaluation"),
                   "save": (peftko.train.session, "save_final"),
                   "save2": (peftko.train.session, "save_final"),
                   "report": (peftko.train.session, "write_report_or_warn")}[point]
    signal_on_entry(owner, name, signum, times=2 if point == "save2" else 1)
    if "--again-at-exit" in options:
        again_at_exit(signum)
    from peftko.cli import main as peftko

    peftko(argv, prog_name="peftko")


if __name__ == "__main__":
    main()

"""Stress the job-control path: ``lease -- CMD``, ^Z, ``fg``, ^C at a real ``bash -i``, many times.

The test suite runs this scenario once (``test_wrapper.py``); a race between
signals, the terminal's foreground group and CMD shows only in many runs on a
busy machine. This runs ``--loops`` scenario loops at once, each against its own
broker, beside ``--busy`` spinning processes, and reports every failure with the
session report of ``tests/jobcontrol.py`` (who held the terminal, each process's
signal masks).

    python bench/jobcontrol_stress.py --runs 100 --loops 4 --busy 3

Exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from brokerproc import BrokerProc
from jobcontrol import stop_fg_ctrl_c
from testblocks import claim_test_block


def _spin() -> None:
    while True:
        pass


def _loop(runs: int) -> list[str]:
    """``runs`` scenarios against one private broker; the failure reports."""
    os.environ.setdefault("PORTLEASE_AUTOSTART", "0")
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        base, claim = claim_test_block()
        broker = BrokerProc(Path(tmp), range=f"{base}-{base + 99}").start()
        try:
            for _ in range(runs):
                try:
                    stop_fg_ctrl_c(broker.socket, Path(tmp))
                except AssertionError as exc:
                    failures.append(str(exc))
        finally:
            broker.stop()
            claim.close()
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=50, help="scenarios per loop")
    ap.add_argument("--loops", type=int, default=2, help="loops at once, each with its own broker")
    ap.add_argument("--busy", type=int, default=2, help="spinning processes beside them")
    args = ap.parse_args()
    # A clean interpreter per loop and per spinner: no threads inherited across fork.
    ctx = multiprocessing.get_context("spawn")
    spinners = [ctx.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for s in spinners:
        s.start()
    try:
        with ctx.Pool(args.loops) as pool:
            results = pool.map(_loop, [args.runs] * args.loops)
    finally:
        for s in spinners:
            s.kill()
    failures = [f for loop in results for f in loop]
    total = args.runs * args.loops
    print(f"job control: {len(failures)} of {total} runs failed "
          f"({args.loops} loops at once, {args.busy} busy processes, {os.cpu_count()} cpus)")
    for report in failures[:3]:
        print("---\n" + report[-3000:])
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The head of the toy suites that the plugin's tests run as concurrent ``pytest -n N``.

Each suite reads where to write (``PL_OUT``), its run's name (``PL_RUN``) and a
barrier directory (``PL_BARRIER``, ``PL_WORKERS``) from its environment. The
barrier makes the first test of every worker, of every run, wait for the others,
so the runs certainly overlap; ``bind_all`` binds a test's ports (TCP and UDP on
the wildcard address) while it holds them, so two holders of one port would fail
with EADDRINUSE.

:func:`run_concurrently` starts the runs and reads back what their tests held;
:func:`assert_overlapping_holds_disjoint` is the check both plugin tests make.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SUITE_HEAD = r'''
import json, os, socket, subprocess, sys, time
import pytest

OUT = os.environ["PL_OUT"]
BARRIER = os.environ["PL_BARRIER"]
WORKERS = int(os.environ["PL_WORKERS"])


@pytest.fixture(scope="session", autouse=True)
def all_workers_running():
    open(os.path.join(BARRIER, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(BARRIER)) < WORKERS and time.monotonic() < deadline:
        time.sleep(0.01)


def bind_all(ports):
    socks = []
    for port in ports:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(socket.AF_INET, kind)
            s.bind(("", port))
            socks.append(s)
    return socks
'''


def run_concurrently(
    suite: Path, args: Sequence[str], *, workers: int, env: Mapping[str, str],
    passed: str, timeout: float,
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Run ``pytest -n WORKERS ARGS`` in ``suite`` twice at once, as runs "a" and "b".

    Returns each run's pid and the records its tests wrote; each run must pass
    with ``passed`` in its summary. ``env`` is the runs' whole environment, to
    which the suite head's variables are added.
    """
    out = suite / "held.jsonl"
    barrier = suite / "barrier"
    barrier.mkdir()
    runs: dict[str, subprocess.Popen[str]] = {}
    for name in ("a", "b"):
        run_env = dict(env, PL_OUT=str(out), PL_BARRIER=str(barrier),
                       PL_WORKERS=str(2 * workers), PL_RUN=name)
        runs[name] = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-n", str(workers), "-q", *args],
            cwd=suite, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    for proc in runs.values():
        output = proc.communicate(timeout=timeout)[0]
        assert proc.returncode == 0, output
        assert passed in output, output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return {name: proc.pid for name, proc in runs.items()}, records


def assert_overlapping_holds_disjoint(records: list[dict[str, Any]]) -> None:
    """No two tests that held ports at the same time held one port; and some did overlap."""
    overlapping = 0
    for r1, r2 in itertools.combinations(records, 2):
        if r1["start"] < r2["end"] and r2["start"] < r1["end"]:
            overlapping += 1
            assert not set(r1["ports"]) & set(r2["ports"]), (r1, r2)
    assert overlapping > 0, "the runs never held ports at the same time: the check proved nothing"

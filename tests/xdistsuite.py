"""The head of the toy suites that the plugin's tests run as concurrent ``pytest -n N``.

Each suite reads where to write (``PL_OUT``), its run's name (``PL_RUN``) and a
barrier directory (``PL_BARRIER``, ``PL_WORKERS``) from its environment. The
barrier makes the first test of every worker, of every run, wait for the others,
so the runs certainly overlap; ``bind_all`` binds a test's ports (TCP and UDP on
the wildcard address) while it holds them, so two holders of one port would fail
with EADDRINUSE.
"""

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

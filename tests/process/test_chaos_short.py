"""Short versions of the chaos and load runs, and regressions for what they found.

``bench/chaos.py --short``, ``bench/load.py --short`` and ``bench/load.py --hostile
--short`` (root only) run as subprocesses
and must exit 0 (their own safety checks passed); their reports are printed
(``pytest -s`` shows them). Timings are reported there, never asserted here.
The long runs are documented in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerproc import PYTHON, BrokerProc, Raw
from portlease.client import Connection

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PORTLEASE_AUTOSTART="0")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], env=env, capture_output=True,
        text=True, timeout=timeout, cwd=ROOT,
    )
    print(proc.stdout)
    print(proc.stderr[-5000:], file=sys.stderr)
    return proc


def test_chaos_short(tmp_path: Path) -> None:
    proc = run_bench("chaos.py", "--short", "--out", str(tmp_path / "chaos"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "collisions: 0" in proc.stdout


def test_load_short(tmp_path: Path) -> None:
    proc = run_bench("load.py", "--short", "--out", str(tmp_path / "load"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(os.geteuid() != 0, reason="creates two users and runs clients as them")
def test_hostile_neighbour_short(tmp_path: Path) -> None:
    """One uid at its caps (connections, long-note leases, pipelined status, slow-loris)
    while another uid leases: the cap holds, the honest client is always served, the
    broker survives. Its latencies and RSS are the bench's to report, not asserted."""
    import json

    proc = run_bench("load.py", "--hostile", "--short", "--results", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads((tmp_path / "hostile-short.json").read_text())["hostile"]
    assert figures["broker_alive"]
    flooder = figures["flooder"]
    assert flooder["connections"] == 1024  # max_connections_per_uid's default, no more
    assert flooder["refused"].get("quota", 0) > 0
    assert flooder["leases"] == figures["leases_asked"] and not flooder["lease_errors"]
    honest = figures["during_flood"]
    assert honest["errors"] == {} and honest["open"]["n"] > 0 and honest["fresh"]["n"] > 0


# ---------------------------------------------------------------- regressions


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs to fill up (root only); mode 0700, since the broker refuses a
    state directory that others may write to."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(10_000):
            os.write(fd, b"x" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_full_state_disk_neither_kills_the_broker_nor_tears_the_journal(
    tmp_path: Path, tiny_fs: Path, port_range: str
) -> None:
    """Regression: with the state file's disk full, a client closing its connection
    raised ENOSPC out of the handler's ``finally`` and ended the whole broker; a
    short write left half a line that swallowed the next record too."""
    state = tiny_fs / "state.jsonl"
    b = BrokerProc(tmp_path, ["--state", str(state)], range=port_range).start()
    try:
        keeper = Raw(b.socket)
        kept = keeper.call({"op": "lease", "count": 1})
        assert kept["reply"] == "granted"
        filler = fill(tiny_fs)

        churner = Raw(b.socket)
        codes = []
        for _ in range(80):
            reply = churner.call({"op": "lease", "count": 1, "note": "n" * 300})
            codes.append(reply.get("code", reply["reply"]))
            if reply["reply"] == "error":
                break
        assert codes[-1] == "busy", codes  # the grant was refused, not half-recorded
        churner.close()  # its leases end while nothing can be written
        assert keeper.call({"op": "ping"})["reply"] == "pong"
        assert b.proc is not None and b.proc.poll() is None, "the broker died of a full disk"

        print("journal ends torn:", not state.read_bytes().endswith(b"\n"))
        filler.unlink()
        later = Raw(b.socket)
        after = later.call({"op": "lease", "count": 2, "note": "after the disk filled"})
        assert after["reply"] == "granted"
        b.restart()
        # The grant written after the failed (possibly half-written) line reads back.
        with contextlib.closing(Raw(b.socket)) as again:
            reclaimed = again.call({"op": "reclaim", "token": after["token"]})
            assert reclaimed["reply"] == "reclaimed" and reclaimed["ports"] == after["ports"]
            assert again.call({"op": "reclaim", "token": kept["token"]})["reply"] == "reclaimed"
        assert "Traceback" not in b.log.read_text()
    finally:
        b.stop()


def test_client_waits_while_a_socket_activated_brokers_backlog_is_full(
    tmp_path: Path, port_range: str
) -> None:
    """Regression (found by bench/load.py): a client socket with a timeout gets EAGAIN at
    once from connect() when the listen backlog is full, where a blocking one waits. The
    sync client (and so ``portlease lease``) failed with "no broker answers" whenever a
    burst of clients, or a socket-activated broker still starting, filled the queue."""
    path = str(tmp_path / "b.sock")
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.bind(path)
    held.listen(1)
    fillers = []
    for _ in range(16):  # queue connections until the backlog refuses more
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:
            c.close()
            break
        fillers.append(c)
    result: dict[str, object] = {}

    def client() -> None:
        try:
            with Connection(path, timeout=20, reclaim=False, autostart=False) as conn:
                result["ports"] = conn.lease(2).ports
        except Exception as exc:
            result["error"] = repr(exc)

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(0.3)
    assert "error" not in result, result
    fd = held.fileno()

    def to_fd3() -> None:
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    # Now the broker starts on the queued socket, as systemd would start it.
    with open(tmp_path / "broker.log", "wb") as log:
        proc = subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", PYTHON, "-m",
             "portlease", "serve", "--state", str(tmp_path / "state.jsonl"),
             "--range", port_range],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=to_fd3, close_fds=False)
    try:
        thread.join(30)
        assert len(result.get("ports", ())) == 2, result  # type: ignore[arg-type]
    finally:
        proc.terminate()
        proc.wait(10)
        for c in fillers:
            c.close()
        held.close()


def test_broker_collects_garbage_rarely_and_freezes_startup_objects() -> None:
    """Regression (bench/load.py): with 10,000 connections, gen-2 collections triggered
    by every ``status`` stalled all clients for ~90 ms. The broker raises the gen-0
    threshold and freezes its startup objects; checked in a fresh interpreter."""
    code = (
        "import gc; from portlease.broker.server import tune_gc; tune_gc(); "
        "print(gc.get_threshold()[0], gc.get_freeze_count())"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    threshold, frozen = map(int, out.stdout.split())
    assert threshold >= 10_000 and frozen > 1000


def test_out_of_fds_at_the_bind_check_is_busy_not_internal(tmp_path: Path, port_range: str) -> None:
    """Regression: when the broker had no fd left for a bind-check probe socket (EMFILE),
    the OSError escaped the lease table and the client got ``internal`` (with a traceback
    in the log) instead of ``busy``."""
    import resource

    b = BrokerProc(tmp_path, range=port_range).start()
    try:
        assert b.proc is not None
        raw = Raw(b.socket)
        limits = resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE, (4, limits[1]))  # all fds in use
        try:
            reply = raw.call({"op": "lease", "count": 1})
        finally:
            resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE, limits)
        assert reply["reply"] == "error" and reply["code"] == "busy", reply
        assert raw.call({"op": "lease", "count": 1})["reply"] == "granted"  # and it recovers
        assert "Traceback" not in b.log.read_text()
    finally:
        b.stop()

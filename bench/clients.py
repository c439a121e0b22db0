"""Measure what the clients cost: fixture overhead, autostart, reclaim after a restart.

    python bench/clients.py [--quick] [--json]

* fixture overhead: the same N trivial tests run by pytest with and without
  ``free_port``; the difference per test, and the lease+release round trip
  the fixture makes, on the session connection;
* autostart: from ``Connection()`` with no broker running to a usable
  connection (spawn, interpreter start, trio import, bind, hello), repeated
  on fresh per-user directories; and ``portlease lease -- true`` cold vs warm;
* reclaim: 20 client processes hold leases, the broker is SIGKILLed and
  restarted on the same journal; time until every lease is attached again.

Every broker runs on a private socket and a private port range; nothing is
left running afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PY = sys.executable
RANGE = "31000-31499"
UNRELATED_PLUGINS = ["-p", "no:hypothesispytest", "-p", "no:benchmark", "-p", "no:cacheprovider"]


def wait_socket(path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.002)
        finally:
            s.close()
    raise TimeoutError(path)


class Broker:
    def __init__(self, directory: str, *extra: str) -> None:
        self.sock = os.path.join(directory, "b.sock")
        self.cmd = [PY, "-m", "portlease", "serve", "--socket", self.sock, "--state",
                    os.path.join(directory, "state"), "--range", RANGE, "--log-level",
                    "warning", *extra]
        self.log = open(os.path.join(directory, "log"), "ab")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start and wait until it answers; return the seconds that took."""
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=self.log)
        wait_socket(self.sock)
        return time.perf_counter() - t0

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def broker(*extra: str) -> Iterator[Broker]:
    directory = tempfile.mkdtemp(prefix="plb-", dir="/tmp")
    b = Broker(directory, *extra)
    b.start()
    try:
        yield b
    finally:
        b.stop()
        shutil.rmtree(directory, ignore_errors=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- fixture overhead


def fixture_overhead(n_tests: int, repeats: int) -> dict[str, float]:
    from portlease.client import Connection

    out: dict[str, float] = {}
    with broker() as b:
        work = tempfile.mkdtemp(prefix="plf-", dir="/tmp")
        try:
            Path(work, "test_with.py").write_text(
                f"import pytest\n@pytest.mark.parametrize('i', range({n_tests}))\n"
                "def test_x(free_port, i):\n    assert free_port\n"
            )
            Path(work, "test_without.py").write_text(
                f"import pytest\n@pytest.mark.parametrize('i', range({n_tests}))\n"
                "def test_x(i):\n    assert i >= 0\n"
            )
            walls: dict[str, list[float]] = {"with": [], "without": []}
            for _ in range(repeats):
                for kind in ("without", "with"):
                    t0 = time.perf_counter()
                    subprocess.run(
                        [PY, "-m", "pytest", "-q", *UNRELATED_PLUGINS, "--portlease-socket",
                         b.sock, f"test_{kind}.py"],
                        cwd=work, check=True, stdout=subprocess.DEVNULL,
                    )
                    walls[kind].append(time.perf_counter() - t0)
            out["pytest_wall_without_s"] = min(walls["without"])
            out["pytest_wall_with_s"] = min(walls["with"])
            out["fixture_overhead_per_test_us"] = (
                (min(walls["with"]) - min(walls["without"])) / n_tests * 1e6
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # What the fixture does per test, without pytest's own bookkeeping.
        with Connection(b.sock) as conn:
            rtts = []
            for _ in range(2000):
                t0 = time.perf_counter()
                conn.release(conn.lease(1, note="tests/test_x.py::test_x[1]"))
                rtts.append(time.perf_counter() - t0)
        out["lease_release_p50_us"] = pct(rtts, 0.5) * 1e6
        out["lease_release_p99_us"] = pct(rtts, 0.99) * 1e6
    return out


# ---------------------------------------------------------------- autostart


def _kill_brokers_of(sock: str) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"portlease" in argv and sock.encode() in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


AUTOSTART_PROBE = r"""
import time
t0 = time.perf_counter()
from portlease.client import Connection
with Connection() as conn:
    conn.ping()
print(time.perf_counter() - t0)
"""


def autostart(repeats: int) -> dict[str, float]:
    cold, cli_cold, cli_warm = [], [], []
    for _ in range(repeats):
        runtime = tempfile.mkdtemp(prefix="pla-", dir="/tmp")
        env = dict(os.environ, XDG_RUNTIME_DIR=runtime, PORTLEASE_AUTOSTART="1")
        env.pop("PORTLEASE_SOCKET", None)
        sock = os.path.join(runtime, "portlease", "portlease.sock")
        try:
            out = subprocess.run([PY, "-c", AUTOSTART_PROBE], env=env, check=True,
                                 capture_output=True, text=True)
            cold.append(float(out.stdout))
            _kill_brokers_of(sock)
            time.sleep(0.05)
            for bucket in (cli_cold, cli_warm):
                t0 = time.perf_counter()
                subprocess.run([PY, "-m", "portlease", "lease", "--", "true"], env=env,
                               check=True)
                bucket.append(time.perf_counter() - t0)
        finally:
            _kill_brokers_of(sock)
            shutil.rmtree(runtime, ignore_errors=True)
    return {
        "autostart_connect_median_ms": statistics.median(cold) * 1e3,
        "autostart_connect_max_ms": max(cold) * 1e3,
        "cli_lease_true_cold_median_ms": statistics.median(cli_cold) * 1e3,
        "cli_lease_true_warm_median_ms": statistics.median(cli_warm) * 1e3,
    }


# ---------------------------------------------------------------- reclaim


HOLDER = r"""
import sys
from portlease.client import Connection
conn = Connection(sys.argv[1])
conn.lease(2)
print("ok", flush=True)
sys.stdin.read()
"""


def _attached(sock: str) -> int:
    from portlease.client import Connection

    try:
        with Connection(sock, reclaim=False, autostart=False, timeout=5) as conn:
            return sum(info.state == "attached" for info in conn.status().leases)
    except Exception:
        return -1


def reclaim(n_clients: int, repeats: int) -> dict[str, float]:
    after_up, after_kill = [], []
    with broker("--ttl", "30") as b:
        holders = [
            subprocess.Popen([PY, "-c", HOLDER, b.sock], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
            for _ in range(n_clients)
        ]
        try:
            for h in holders:
                assert h.stdout is not None and h.stdout.readline() == "ok\n"
            for _ in range(repeats):
                t_kill = time.perf_counter()
                b.kill()
                b.start()
                t_up = time.perf_counter()
                while _attached(b.sock) != n_clients:
                    time.sleep(0.002)
                done = time.perf_counter()
                after_up.append(done - t_up)
                after_kill.append(done - t_kill)
        finally:
            for h in holders:
                h.communicate("", timeout=30)
    return {
        "reclaim_clients": n_clients,
        "reclaim_after_broker_up_median_ms": statistics.median(after_up) * 1e3,
        "reclaim_after_broker_up_max_ms": max(after_up) * 1e3,
        "reclaim_after_sigkill_median_ms": statistics.median(after_kill) * 1e3,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tests and repeats")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results: dict[str, float] = {}
    results |= fixture_overhead(100 if args.quick else 500, 1 if args.quick else 3)
    results |= autostart(1 if args.quick else 5)
    results |= reclaim(20, 1 if args.quick else 5)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key:40} {value:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

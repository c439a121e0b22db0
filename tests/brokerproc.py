"""Start and drive real broker processes in tests."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The one raw protocol helper lives with the benches, which use it too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from rawproto import Closed, Raw

__all__ = ["PYTHON", "BrokerProc", "Closed", "Raw", "broker", "portlease", "read_log", "wait_for_socket"]

PYTHON = sys.executable


def wait_for_socket(
    path: str | Path, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}: {read_log(proc)}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return
        except OSError:
            time.sleep(0.01)
        finally:
            s.close()
    raise TimeoutError(f"no broker answered at {path}")


class ReadinessListener:
    """Plays the service manager's ``NOTIFY_SOCKET`` so a test can wait for ``READY=1``.

    A connectable socket is not a ready broker: the broker listens before its
    first fedimint-portalloc sync (and before restored leases are published),
    and a test that acts in between races it. ``READY=1`` is sent only once the
    broker serves. The socket is abstract (``@name``): no path length limit,
    nothing to clean up, reachable by a broker of any uid.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"portlease-test-ready-{os.getpid()}-{secrets.token_hex(8)}"
        self.sock.bind("\0" + name)
        self.address = "@" + name

    def wait(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """Return on ``READY=1``; raise if the broker exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"broker exited with {proc.returncode}: {read_log(proc)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the broker sent no READY=1 within {timeout} s: {read_log(proc)}")
            # Short slices so that a broker that dies is noticed at once.
            readable, _, _ = select.select([self.sock], [], [], min(remaining, 0.05))
            if readable and b"READY=1" in self.sock.recv(65536).split(b"\n"):
                return

    def close(self) -> None:
        # Later STATUS= datagrams then fail at once (ECONNREFUSED), which the
        # broker logs at debug level; an open socket nobody reads would fill up
        # and block the broker's sends for their timeout.
        self.sock.close()


def read_log(proc: subprocess.Popen[bytes]) -> str:
    log = getattr(proc, "log_path", None)
    return Path(log).read_text() if log else ""


@dataclass
class BrokerProc:
    """A real ``portlease serve`` process in a temporary directory."""

    dir: Path
    args: list[str] = field(default_factory=list)
    range: str = "21000-21199"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.dir / "broker.sock")

    @property
    def state(self) -> str:
        return str(self.dir / "state.jsonl")

    @property
    def log(self) -> Path:
        return self.dir / "broker.log"

    def command(self) -> list[str]:
        return [PYTHON, "-m", "portlease", "serve", "--socket", self.socket,
                "--state", self.state, "--range", self.range, "--log-level", "debug", *self.args]

    def start(self, wait: bool = True) -> BrokerProc:
        """Start the broker; with ``wait``, return once it has sent ``READY=1``."""
        # Never the environment's own NOTIFY_SOCKET: a suite run under systemd
        # must not have its brokers report to the real service manager.
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        ready = ReadinessListener() if wait else None
        if ready is not None:
            env["NOTIFY_SOCKET"] = ready.address
        try:
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env)
            self.proc.log_path = str(self.log)  # type: ignore[attr-defined]
            if ready is not None:
                ready.wait(self.proc)
        finally:
            if ready is not None:
                ready.close()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)

    def restart(self) -> BrokerProc:
        self.kill()
        return self.start()


@contextlib.contextmanager
def broker(tmp_path: Path, *args: str, range: str = "21000-21199") -> Iterator[BrokerProc]:
    b = BrokerProc(tmp_path, list(args), range=range).start()
    try:
        yield b
    finally:
        b.stop()


def portlease(
    *args: str, env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, PORTLEASE_AUTOSTART="0")
    full_env.update(env or {})
    return subprocess.run([PYTHON, "-m", "portlease", *args], env=full_env,
                          capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]

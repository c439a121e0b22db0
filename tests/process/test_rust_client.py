"""The Rust client crate (client/rust) against a real broker, next to Python clients.

The crate is built with cargo through the same offline configuration as CI
(``.ci/rust-offline.toml``: Debian's packaged crates stand in for crates.io)
when ``/usr/share/cargo/registry`` has them, else with the user's own cargo
setup. Without cargo the module is skipped, unless ``PORTLEASE_RUST_REQUIRED=1``
(CI's ``.ci/rust``), which turns that skip into a failure.

The Rust holder is ``client/rust/examples/holder.rs``: it takes leases (every
other one through ``port_alloc``), binds a TCP listener on every leased port,
prints them as one JSON line, and answers ``check`` on stdin.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from brokerproc import BrokerProc
from portlease.client import Connection

ROOT = Path(__file__).resolve().parents[2]
CRATE = ROOT / "client" / "rust"
TARGET = CRATE / "target"
OFFLINE_CONFIG = ROOT / ".ci" / "rust-offline.toml"
DEBIAN_REGISTRY = Path("/usr/share/cargo/registry")


@dataclass
class Rust:
    cargo: str
    env: dict[str, str]

    @property
    def holder(self) -> Path:
        return TARGET / "debug" / "examples" / "holder"

    def cargo_run(self, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.cargo, *args], cwd=CRATE, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)


def _find_cargo() -> str | None:
    found = shutil.which("cargo")
    if found:
        return found
    home = Path.home() / ".cargo" / "bin" / "cargo"
    return str(home) if home.exists() else None


@pytest.fixture(scope="session")
def rust(tmp_path_factory: pytest.TempPathFactory) -> Rust:
    cargo = _find_cargo()
    if cargo is None:
        reason = "cargo is not installed (looked on PATH and in ~/.cargo/bin)"
        if os.environ.get("PORTLEASE_RUST_REQUIRED") == "1":
            pytest.fail(f"PORTLEASE_RUST_REQUIRED=1, but {reason}")
        pytest.skip(reason)
    env = dict(os.environ)
    env["PATH"] = f"{Path(cargo).parent}{os.pathsep}{env.get('PATH', '')}"
    env["CARGO_TARGET_DIR"] = str(TARGET)
    env["RUSTFLAGS"] = "-D warnings"
    env.pop("PORTLEASE_SOCKET", None)
    if any(DEBIAN_REGISTRY.glob("serde_json-*")):
        home = tmp_path_factory.mktemp("cargo-home")
        shutil.copy(OFFLINE_CONFIG, home / "config.toml")
        env["CARGO_HOME"] = str(home)
    r = Rust(cargo, env)
    built = r.cargo_run("build", "--all-targets")
    assert built.returncode == 0, f"cargo build failed:\n{built.stderr}"
    assert r.holder.exists()
    return r


def _holder(rust: Rust, sock: str | None, leases: int, size: int,
            env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], dict]:
    full = {k: v for k, v in os.environ.items() if k != "PORTLEASE_SOCKET"}
    full.update({"PORTLEASE_SOCKET": sock} if sock else {})
    full.update(env or {})
    proc = subprocess.Popen([str(rust.holder), str(leases), str(size)], env=full,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        assert proc.stderr is not None
        pytest.fail(f"the Rust holder exited with {proc.returncode}: {proc.stderr.read()}")
    return proc, json.loads(line)


def _check(proc: subprocess.Popen[str]) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("check\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _leases_of(sock: str, pid: int) -> list[list[int]]:
    with Connection(sock) as conn:
        return sorted(list(i.ports) for i in conn.status().leases if i.pid == pid)


def test_cargo_tests_pass_against_the_broker(rust: Rust, broker: BrokerProc) -> None:
    env = {"PORTLEASE_SOCKET": broker.socket}
    run = rust.cargo_run("test", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    # The broker tests ran, and did not skip for want of a broker.
    run = rust.cargo_run("test", "--test", "broker", "--", "--nocapture", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "skipped: PORTLEASE_SOCKET" not in run.stderr, "the broker tests did not run"
    m = re.search(r"test result: ok\. (\d+) passed; 0 failed", run.stdout)
    assert m and int(m.group(1)) >= 7, run.stdout


def test_every_python_error_code_is_in_the_rust_enum() -> None:
    from portlease.client.protocol import ErrorCode

    source = (CRATE / "src" / "error.rs").read_text()
    wire = set(re.findall(r'ErrorCode::\w+ => "([a-z-]+)"', source))
    assert wire == {code.value for code in ErrorCode}


def test_rust_and_python_holders_never_overlap(rust: Rust, broker: BrokerProc,
                                               holders: list[subprocess.Popen[str]]) -> None:
    start = threading.Barrier(4)
    python_ports: dict[int, list[list[int]]] = {}
    bound: list[socket.socket] = []
    errors: list[BaseException] = []
    conns: list[Connection] = []
    lock = threading.Lock()

    def python_holder(n: int) -> None:
        try:
            conn = Connection(broker.socket)
            with lock:
                conns.append(conn)
            start.wait(timeout=30)
            mine = []
            for _ in range(8):
                held = conn.lease(2, note=f"python holder {n}")
                for port in held.ports:
                    s = socket.socket()
                    s.bind(("127.0.0.1", port))  # fails if anyone else holds it bound
                    s.listen()
                    with lock:
                        bound.append(s)
                mine.append(list(held.ports))
            python_ports[n] = mine
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=python_holder, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        start.wait(timeout=30)
        rust_reports = []
        for _ in range(2):
            proc, report = _holder(rust, broker.socket, 10, 2)
            holders.append(proc)
            rust_reports.append(report)
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors

        everything = [ports for report in rust_reports for ports in report["leases"]]
        everything += [ports for mine in python_ports.values() for ports in mine]
        assert len(everything) == 2 * 10 + 3 * 8
        flat = [port for ports in everything for port in ports]
        assert len(flat) == len(set(flat)), "two holders got the same port"
        for ports in everything:
            assert len(ports) == 2 and ports[1] == ports[0] + 1

        # The broker's view agrees: each holder's leases under its own pid.
        for report in rust_reports:
            assert _leases_of(broker.socket, report["pid"]) == sorted(report["leases"])
        python_seen = _leases_of(broker.socket, os.getpid())
        assert python_seen == sorted(p for mine in python_ports.values() for p in mine)
        with Connection(broker.socket) as conn:
            assert conn.status().summary.ports_held == len(flat)
        # Every Rust holder bound all its ports (it reports only after that) and still holds them.
        for proc in holders:
            assert _check(proc) == "ok"
    finally:
        for t in threads:
            t.join(timeout=60)
        for s in bound:
            s.close()
        for conn in conns:
            conn.close()


def test_killed_rust_holder_releases_at_once(rust: Rust, broker: BrokerProc,
                                             holders: list[subprocess.Popen[str]]) -> None:
    proc, report = _holder(rust, broker.socket, 4, 3)
    holders.append(proc)
    assert _leases_of(broker.socket, proc.pid) == sorted(report["leases"])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    killed = time.monotonic()
    while _leases_of(broker.socket, proc.pid):
        assert time.monotonic() - killed < 1.0, "the leases outlived their holder"
        time.sleep(0.01)
    # And the ports are grantable again: the whole range is free.
    with Connection(broker.socket) as conn:
        summary = conn.status().summary
        assert summary.ports_held == 0 and summary.ports_free == 100


def test_rust_holder_reclaims_after_a_broker_restart(rust: Rust, broker: BrokerProc,
                                                     holders: list[subprocess.Popen[str]]) -> None:
    proc, report = _holder(rust, broker.socket, 4, 2)
    holders.append(proc)
    broker.restart()  # SIGKILL, then a new broker restores the leases as orphans
    deadline = time.monotonic() + 10
    while True:
        with Connection(broker.socket) as conn:
            infos = [i for i in conn.status().leases if i.pid == proc.pid]
        if len(infos) == 4 and all(i.state == "attached" for i in infos):
            break
        assert time.monotonic() < deadline, f"not reclaimed: {infos}"
        time.sleep(0.05)
    assert sorted(list(i.ports) for i in infos) == sorted(report["leases"])
    assert _check(proc) == "ok"


def _holder_error(rust: Rust, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "PORTLEASE_SOCKET"}
    full.update(env)
    return subprocess.run([str(rust.holder), "1", "1"], env=full, capture_output=True,
                          text=True, timeout=60)


def test_no_broker_error_names_the_socket(rust: Rust, tmp_path: Path) -> None:
    missing = tmp_path / "nobody" / "broker.sock"
    run = _holder_error(rust, {"PORTLEASE_SOCKET": str(missing)})
    assert run.returncode == 2, run
    assert f"no portlease broker answers at {missing} (No such file or directory)" in run.stderr
    assert "PORTLEASE_SOCKET" in run.stderr and "portlease serve --socket PATH" in run.stderr
    assert "os error" not in run.stderr and "Os {" not in run.stderr

    # The per-user socket (conftest points the system paths at nothing).
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    run = _holder_error(rust, {"XDG_RUNTIME_DIR": str(runtime)})
    expected = runtime / "portlease" / "portlease.sock"
    assert run.returncode == 2, run
    assert f"no portlease broker answers at {expected}" in run.stderr
    assert "start one with `portlease serve`" in run.stderr

    # A per-user directory others may write to is refused before connecting.
    (runtime / "portlease").mkdir()
    os.chmod(runtime / "portlease", 0o777)
    run = _holder_error(rust, {"XDG_RUNTIME_DIR": str(runtime)})
    assert run.returncode == 2, run
    assert f"refusing the portlease socket {expected}: its directory {runtime / 'portlease'}" in run.stderr
    assert "writable by group or others (mode 0777)" in run.stderr


def test_system_socket_is_chosen_where_a_system_deployment_exists(
        rust: Rust, broker: BrokerProc, tmp_path: Path, holders: list[subprocess.Popen[str]]) -> None:
    # The system directory exists, so the system socket is chosen over the
    # per-user one (whose directory holds no broker). It leads to the test's broker.
    system = tmp_path / "system"
    system.mkdir()
    (system / "portlease.sock").symlink_to(broker.socket)
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    proc, report = _holder(rust, None, 2, 1, env={"PORTLEASE_SYSTEM_DIR": str(system),
                                                  "XDG_RUNTIME_DIR": str(runtime)})
    holders.append(proc)
    assert _leases_of(broker.socket, proc.pid) == sorted(report["leases"])

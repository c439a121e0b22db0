"""The broker as users meet it: real processes, real sockets, real binds, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brokerproc import PYTHON, BrokerProc, Raw, portlease, wait_for_socket
from portlease.client import Connection, Exhausted, QuotaExceeded, TooLarge, lease
from portlease.client.protocol import MAX_LINE
from portlease.client.protocol.errors import BrokerUnavailable


def ports_of(raw: Raw) -> set[int]:
    reply = raw.call({"op": "status"})
    return {port for info in reply["leases"] for port in info["ports"]}  # type: ignore[union-attr, index]


def wait_until(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


# ---------------------------------------------------------------- the CLI wrapper


def test_wrapper_sets_env_and_passes_exit_status(broker: BrokerProc) -> None:
    out = portlease(
        "lease", "--socket", broker.socket, "-n", "3", "--env", "PGPORT=0", "--env", "MINT_PORT=2",
        "--", sys.executable, "-c",
        "import os,json,sys; print(json.dumps({k: os.environ[k] for k in "
        "('PORTLEASE_PORTS','PORTLEASE_PORT','PGPORT','MINT_PORT')})); sys.exit(7)",
    )
    assert out.returncode == 7, out.stderr
    env = json.loads(out.stdout)
    ports = [int(x) for x in env["PORTLEASE_PORTS"].split()]
    assert len(ports) == 3 and ports == list(range(ports[0], ports[0] + 3))
    assert env["PORTLEASE_PORT"] == env["PGPORT"] == str(ports[0])
    assert env["MINT_PORT"] == str(ports[2])
    # The lease ended with the command.
    assert not set(ports) & ports_of(Raw(broker.socket))


def test_wrapper_reports_death_by_signal_as_128_plus_n(broker: BrokerProc) -> None:
    out = portlease("lease", "--socket", broker.socket, "--", "sh", "-c", "kill -USR1 $$")
    assert out.returncode == 128 + signal.SIGUSR1


def test_wrapper_forwards_sigterm_to_the_command(broker: BrokerProc, tmp_path: Path) -> None:
    marker = tmp_path / "got-term"
    script = f"trap 'echo term > {marker}; exit 5' TERM; echo ready; while :; do sleep 0.05; done"
    proc = subprocess.Popen(
        [PYTHON, "-m", "portlease", "lease", "--socket", broker.socket, "--", "sh", "-c", script],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 5
    assert marker.read_text().strip() == "term"


def test_wrapper_errors_are_actionable(broker: BrokerProc, tmp_path: Path) -> None:
    out = portlease("lease", "--socket", str(tmp_path / "none.sock"), "--", "true")
    assert out.returncode == 69
    assert "no portlease broker answers at" in out.stderr and "portlease serve" in out.stderr
    out = portlease("lease", "--socket", broker.socket, "-n", "300", "--", "true")
    assert out.returncode == 69 and "too-large" in out.stderr
    out = portlease("lease", "--socket", broker.socket, "-n", "101", "--", "true")
    assert "too-large" in out.stderr and "whole range" in out.stderr
    out = portlease("lease", "--socket", broker.socket, "--env", "X=3", "--", "true")
    assert out.returncode == 2 and "OFFSET must be in 0..0" in out.stderr
    out = portlease("lease", "--socket", broker.socket, "--", "/no/such/cmd")
    assert out.returncode == 127


def test_two_concurrent_wrappers_never_share_a_port(broker: BrokerProc) -> None:
    code = (
        "import os,socket,time\n"
        "socks=[]\n"
        "for p in map(int, os.environ['PORTLEASE_PORTS'].split()):\n"
        "    s=socket.socket(); s.bind(('0.0.0.0',p)); s.listen(); socks.append(s)\n"
        "    u=socket.socket(type=socket.SOCK_DGRAM); u.bind(('0.0.0.0',p)); socks.append(u)\n"
        "print(os.environ['PORTLEASE_PORTS']); time.sleep(0.3)\n"
    )
    procs = [
        subprocess.Popen([PYTHON, "-m", "portlease", "lease", "--socket", broker.socket,
                          "-n", "5", "--", PYTHON, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    seen: list[int] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0  # every bind succeeded: no EADDRINUSE
        seen += [int(x) for x in out.split()]
    assert len(seen) == 30 and len(set(seen)) == 30


def test_sigkill_of_wrapper_frees_its_ports_at_once(broker: BrokerProc) -> None:
    proc = subprocess.Popen(
        [PYTHON, "-m", "portlease", "lease", "--socket", broker.socket, "-n", "4", "--",
         "sh", "-c", "echo $PORTLEASE_PORTS; exec sleep 60"],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    ports = {int(x) for x in proc.stdout.readline().split()}
    raw = Raw(broker.socket)
    assert ports <= ports_of(raw)
    proc.kill()
    proc.wait()
    wait_until(lambda: not (ports & ports_of(raw)))
    raw.close()


def test_detached_lease_renew_release(broker: BrokerProc) -> None:
    out = portlease("lease", "--socket", broker.socket, "-n", "2", "--detach", "--ttl", "30", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert len(got["ports"]) == 2 and len(got["token"]) == 32 and got["expires"] > time.time() + 25
    raw = Raw(broker.socket)
    assert set(got["ports"]) <= ports_of(raw)  # survives the CLI's exit
    assert portlease("renew", "--socket", broker.socket, got["token"]).returncode == 0
    assert portlease("release", "--socket", broker.socket, got["token"]).returncode == 0
    assert not set(got["ports"]) & ports_of(raw)
    again = portlease("release", "--socket", broker.socket, got["token"])
    assert again.returncode == 69 and "not-found" in again.stderr


def test_status_json_shows_owner_and_note(broker: BrokerProc) -> None:
    with Connection(broker.socket) as conn:
        held = conn.lease(2, note="pg for test_x")
        out = portlease("status", "--socket", broker.socket, "--json")
        data = json.loads(out.stdout)
        (info,) = data["leases"]
        assert info["ports"] == list(held.ports) and info["note"] == "pg for test_x"
        assert info["pid"] == os.getpid() and info["uid"] == os.getuid()
        assert info["state"] == "attached" and "token" not in info
        assert data["summary"]["ports_held"] == 2
        text = portlease("status", "--socket", broker.socket).stdout
        assert "pg for test_x" in text and "1 lease, 2 ports held" in text


# ---------------------------------------------------------------- allocation


def test_port_bound_by_outside_process_is_never_granted(broker: BrokerProc) -> None:
    lo = int(broker.range.split("-")[0])
    squatters = []
    # TCP on 127.0.0.1 only, UDP only, and TCP on ::1 only: each must be detected.
    for port, family, kind, addr in [
        (lo, socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
        (lo + 2, socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1"),
        (lo + 4, socket.AF_INET6, socket.SOCK_STREAM, "::1"),
    ]:
        s = socket.socket(family, kind)
        s.bind((addr, port))
        squatters.append(s)
    with Connection(broker.socket) as conn:
        got = {p for _ in range(40) for p in conn.lease(1).ports}
    assert not got & {lo, lo + 2, lo + 4}
    assert {lo + 1, lo + 3} <= got
    for s in squatters:
        s.close()


def test_exhausted_and_quota_errors_are_clear(tmp_path: Path, ten_ports: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text("max_ports_per_uid = 8\nmax_leases_per_connection = 3\n")
    b = BrokerProc(tmp_path, ["--config", str(config)], range=ten_ports).start()
    try:
        with Connection(b.socket) as conn:
            conn.lease(2)
            conn.lease(2)
            conn.lease(2)
            with pytest.raises(QuotaExceeded, match="per-connection limit"):
                conn.lease(1)
        with Connection(b.socket) as c1, Connection(b.socket) as c2:
            c1.lease(3)
            c1.lease(3)
            with pytest.raises(QuotaExceeded, match="per-uid limit of 8"):
                c2.lease(3)
            c2.lease(2)  # 8 held: right at the limit
            with pytest.raises(QuotaExceeded):
                c2.lease(1)
        with Connection(b.socket) as conn, pytest.raises(TooLarge, match="whole range"):
            conn.lease(11)
    finally:
        b.stop()


def test_exhausted_reports_largest_free_run(tmp_path: Path, ten_ports: str) -> None:
    b = BrokerProc(tmp_path, range=ten_ports).start()
    try:
        with Connection(b.socket) as conn:
            conn.lease(7)
            with pytest.raises(Exhausted) as exc:
                conn.lease(4)
            assert exc.value.largest == 3
            assert "largest free run is 3" in str(exc.value)
    finally:
        b.stop()


# ---------------------------------------------------------------- hostile input


def test_garbage_and_oversized_lines_leave_other_clients_served(broker: BrokerProc) -> None:
    good = Raw(broker.socket)
    held = good.call({"op": "lease", "count": 2})
    assert held["reply"] == "granted"

    bad = Raw(broker.socket)
    for line, code in [
        (b"not json", "bad-request"),
        (b"\xff\xfe\xfd", "bad-request"),
        (b"[1,2,3]", "bad-request"),
        (b'{"op":"lease","id":5,"count":-1}', "bad-request"),
        (b'{"op":"lease","id":6,"count":1e400}', "bad-request"),
        (b'{"op":"fly","id":7}', "unknown-op"),
        (b'{"op":"release","id":8,"token":"' + b"0" * 32 + b'"}', "not-found"),
        (b"[" * 4000 + b"]" * 4000, "bad-request"),
    ]:
        bad.send(line + b"\n")
        reply = bad.line()
        assert reply["reply"] == "error" and reply["code"] == code, (line[:40], reply)
    # The connection is still usable after all that.
    assert bad.call({"op": "ping"})["reply"] == "pong"

    # A line of exactly MAX_LINE bytes is read (and refused as JSON); one more byte closes.
    bad.send(b" " * (MAX_LINE - 2) + b"{}" + b"\n")
    assert bad.line()["code"] == "bad-request"
    bad.send(b"x" * (MAX_LINE + 1))
    reply = bad.line()
    assert reply["code"] == "line-too-long"
    assert bad.closed_by_peer()

    # A half-written line from a client that then stalls blocks nobody.
    stalled = Raw(broker.socket)
    stalled.send(b'{"op":"lease","id":1,')
    assert good.call({"op": "ping"})["reply"] == "pong"
    assert good.call({"op": "lease", "count": 1})["reply"] == "granted"
    # And the first client's lease was never touched.
    assert set(held["ports"]) <= ports_of(good)  # type: ignore[arg-type]
    stalled.close()
    bad.close()


def test_hello_is_required_and_versions_are_checked(broker: BrokerProc) -> None:
    raw = Raw(broker.socket, hello=False)
    assert raw.call({"op": "lease"})["code"] == "hello-required"
    reply = raw.call({"op": "hello", "version": 99})
    assert reply["code"] == "version" and "speaks version 1" in reply["message"]  # type: ignore[operator]
    assert raw.call({"op": "hello", "version": 1})["reply"] == "hello"
    assert raw.call({"op": "lease"})["reply"] == "granted"


def test_pipelined_requests_are_answered_in_order_with_their_ids(broker: BrokerProc) -> None:
    raw = Raw(broker.socket)
    raw.send(b"".join(
        json.dumps({"op": "lease", "id": f"r{i}", "count": 1}).encode() + b"\n" for i in range(20)
    ))
    replies = [raw.line() for _ in range(20)]
    assert [r["id"] for r in replies] == [f"r{i}" for i in range(20)]
    assert len({r["ports"][0] for r in replies}) == 20  # type: ignore[index]


def test_tokens_are_needed_to_touch_a_lease(broker: BrokerProc) -> None:
    owner = Raw(broker.socket)
    held = owner.call({"op": "lease", "count": 1})
    other = Raw(broker.socket)
    for op in ("release", "renew", "detach", "reclaim"):
        guess = other.call({"op": op, "token": "0" * 31 + "1"})
        assert guess["code"] == "not-found"
    # Even with the token, a lease held by a live connection cannot be reclaimed.
    assert other.call({"op": "reclaim", "token": held["token"]})["code"] == "in-use"
    assert set(held["ports"]) <= ports_of(other)  # type: ignore[arg-type]


# ---------------------------------------------------------------- restarts


def test_broker_sigkill_and_restart_never_grants_a_port_still_leased(broker: BrokerProc) -> None:
    with Connection(broker.socket, reclaim=False) as holder:
        held = holder.lease(30)
    # The holder's connection closed, so those are free; now hold leases for real.
    conns = [Connection(broker.socket) for _ in range(3)]
    leases = [c.lease(10) for c in conns]
    held_ports = {p for ls in leases for p in ls.ports}
    broker.restart()
    # Before (or while) the holders reclaim, a newcomer must not get their ports.
    with Connection(broker.socket, reclaim=False) as newcomer:
        for _ in range(7):
            try:
                got = newcomer.lease(10)
            except Exhausted:
                break
            assert not set(got.ports) & held_ports
    for c, ls in zip(conns, leases, strict=True):
        wait_until(lambda c=c: c.fileno() >= 0 and c._sock is not None)
        c.ping()
        assert ls.lost is None
        c.close()
    assert held.ports  # the first lease existed


def test_second_broker_on_same_socket_or_state_refuses(broker: BrokerProc, tmp_path: Path) -> None:
    out = portlease("serve", "--socket", broker.socket, "--state", str(tmp_path / "other.state"))
    assert out.returncode == 75 and "another portlease broker is serving" in out.stderr
    other = tmp_path / "other"
    other.mkdir()
    out = portlease("serve", "--socket", str(other / "s.sock"), "--state", broker.state)
    assert out.returncode == 1 and "in use by another portlease broker" in out.stderr
    assert not (other / "s.sock").exists()


def test_stale_socket_is_replaced_and_socket_mode_is_0660(tmp_path: Path, ten_ports: str) -> None:
    path = tmp_path / "broker.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: connect() is refused
    stale.close()
    b = BrokerProc(tmp_path, range=ten_ports).start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        with lease(1, socket=b.socket) as got:
            low, high = map(int, ten_ports.split("-"))
            assert low <= got.port <= high
    finally:
        b.stop()
    assert not path.exists()  # removed on a clean stop


def test_regular_file_at_socket_path_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "broker.sock"
    path.write_text("precious")
    out = portlease("serve", "--socket", str(path), "--state", str(tmp_path / "s"))
    assert out.returncode == 1 and "is not a socket" in out.stderr
    assert path.read_text() == "precious"


def test_corrupt_state_file_is_survived(tmp_path: Path, ten_ports: str) -> None:
    (tmp_path / "state.jsonl").write_bytes(b'\x00\xffgarbage\n{"type":"grant","token":"a"\n')
    b = BrokerProc(tmp_path, range=ten_ports).start()
    try:
        with lease(2, socket=b.socket) as got:
            assert len(got) == 2
        assert "skipped 2 unreadable lines" in b.log.read_text()
    finally:
        b.stop()


def test_sigterm_exits_zero_and_keeps_leases_for_reclaim(tmp_path: Path, ten_ports: str) -> None:
    b = BrokerProc(tmp_path, range=ten_ports).start()
    try:
        raw = Raw(b.socket)
        held = raw.call({"op": "lease", "count": 2})
        assert b.kill(signal.SIGTERM) == 0
        b.start()
        again = Raw(b.socket)
        assert again.call({"op": "reclaim", "token": held["token"]})["ports"] == held["ports"]
        raw.close()
    finally:
        b.stop()


def test_lease_context_manager_releases_on_exit(broker: BrokerProc) -> None:
    with lease(3, socket=broker.socket) as ports:
        assert ports.ports == (ports.port, ports.port + 1, ports.port + 2)
        assert ports[1] == ports.port + 1
        first = set(ports.ports)
    raw = Raw(broker.socket)
    assert not first & ports_of(raw)


def test_no_broker_is_a_distinct_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerUnavailable) as exc:
        Connection(str(tmp_path / "nothing.sock"))
    assert str(tmp_path / "nothing.sock") in str(exc.value)
    assert exc.value.paths == (str(tmp_path / "nothing.sock"),)


def test_sync_client_does_not_import_trio() -> None:
    code = (
        "import sys, portlease.client, portlease.cli, portlease.client.cli.main\n"
        "from portlease.client import lease, Connection\n"
        "assert 'trio' not in sys.modules, 'trio imported'\n"
    )
    subprocess.run([PYTHON, "-c", code], check=True)


def test_wait_for_socket_helper_times_out(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError):
        wait_for_socket(tmp_path / "nope", timeout=0.05)

"""``portlease status``: the operator's view of who holds which ports."""

from __future__ import annotations

import json
import os
import pty
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path

from brokerproc import PYTHON, BrokerProc, Raw, portlease
from portlease.broker import kernel
from portlease.client import Connection
from portlease.client import protocol as p
from portlease.client.cli.status_view import render_status


def test_status_shows_owner_note_age_expiry_and_summary(broker: BrokerProc) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    wrapper = subprocess.Popen(
        [PYTHON, "-m", "portlease", "lease", "--socket", broker.socket, "-n", "3",
         "--", "sh", "-c", "echo up; read _"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, RUNNER_NAME="runner-c", GITHUB_JOB="itests"),
    )
    assert wrapper.stdout is not None and wrapper.stdout.readline() == "up\n"
    with Connection(broker.socket) as conn:
        conn.lease(1, note="detached for a script", detach=True, ttl=600)
    try:
        text = portlease("status", "--socket", broker.socket).stdout
        lines = text.splitlines()
        assert lines[0] == f"{me}: 2 leases, 4 ports"
        assert "PORTS" in lines[1] and "EXPIRES" in lines[1] and "NOTE / COMMAND" in lines[1]
        wrapped = next(line for line in lines if f" {wrapper.pid} " in line)
        # The wrapper's default note: CI runner and job, then the command line.
        assert "attached" in wrapped and "runner_name=runner-c github_job=itests sh -c" in wrapped
        detached = next(line for line in lines if "detached for a script" in line)
        assert " 10m " in detached or " 9m " in detached  # expires in ~600 s
        assert lines[-1].startswith("2 leases, 4 ports held, 96 free of ")
        assert "largest free run" in lines[-1] and "ttl 120s" in lines[-1]

        data = json.loads(portlease("status", "--socket", broker.socket, "--json").stdout)
        assert data["summary"]["leases"] == 2 and data["summary"]["ports_held"] == 4
        (info,) = [i for i in data["leases"] if i["pid"] == wrapper.pid]
        assert len(info["ports"]) == 3 and info["user"] == me and info["uid"] == os.getuid()
        assert info["state"] == "attached" and info.get("expires") is None
        assert "portlease" in info["cmdline"] and "lease" in info["cmdline"]
        assert abs(info["granted"] - time.time()) < 60
    finally:
        wrapper.communicate("\n", timeout=30)


def test_status_groups_leases_by_user() -> None:
    now = 1_000_000.0
    reply = p.StatusReply(
        id=1,
        summary=p.Summary(range=(20000, 20099), leases=3, ports_held=4, ports_free=96,
                          largest_free_run=90, clients=2, ttl=120.0),
        leases=[
            p.LeaseInfo(ports=[20000], state="attached", pid=11, uid=1001, user="zoe",
                        note="tests/test_a.py::test_x", granted=now - 30),
            p.LeaseInfo(ports=[20001, 20002], state="orphaned", pid=12, uid=1000, user="adam",
                        cmdline="pytest -n 8", granted=now - 600, expires=now + 90),
            p.LeaseInfo(ports=[20010], state="detached", uid=4242, granted=now - 7300,
                        expires=now + 30),
        ],
    )
    lines = render_status(reply, now).splitlines()
    heads = [line for line in lines if not line.startswith(" ")]
    assert heads == [
        "adam: 1 lease, 2 ports",
        "uid 4242: 1 lease, 1 port",
        "zoe: 1 lease, 1 port",
        "3 leases, 4 ports held, 96 free of 20000-20099, largest free run 90, 2 clients, "
        "ttl 120s",
    ]
    adam = lines[lines.index(heads[0]) + 2]
    assert adam.split()[:5] == ["20001-20002", "orphaned", "12", "10m", "90s"]
    assert adam.endswith("pytest -n 8")
    zoe = lines[lines.index(heads[2]) + 2]
    assert zoe.split()[:5] == ["20000", "attached", "11", "30s", "-"]
    assert lines[lines.index(heads[1]) + 2].split()[3] == "2h"


def test_status_watch_refreshes_in_place_through_a_broker_restart(broker: BrokerProc) -> None:
    # On a terminal: a pty, as a person watching has.
    master, slave = pty.openpty()
    watch = subprocess.Popen(
        [PYTHON, "-m", "portlease", "status", "--socket", broker.socket, "--watch", "0.1"],
        stdout=slave, env=dict(os.environ, PORTLEASE_AUTOSTART="0"),
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 20

    def read_until(text: bytes) -> None:
        nonlocal seen
        while text not in seen and time.monotonic() < deadline:
            seen += os.read(master, 65536)
        assert text in seen, seen[-500:]

    try:
        read_until(b"0 leases, 0 ports held")
        with Connection(broker.socket) as conn:
            conn.lease(2)
            read_until(b"1 lease, 2 ports held")
            # A broker restart does not end the watch: it says so and carries on.
            broker.kill()
            read_until(b"(retrying every 0.1 s)")
            seen = b""
            broker.start()
            read_until(b"1 lease, 2 ports held")  # reclaimed by conn, shown by the watch
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=30) == 0
    finally:
        watch.kill()
        os.close(master)
    assert seen.count(b"\x1b[H") >= 2 and b"\x1b[K" in seen
    assert b"1 lease, 2 ports held" in seen


def test_status_watch_into_a_pipe_writes_plain_frames(broker: BrokerProc) -> None:
    """`status --watch | tee log`: no screen to redraw, so no escape codes, one frame per refresh."""
    watch = subprocess.Popen(
        [PYTHON, "-m", "portlease", "status", "--socket", broker.socket, "--watch", "0.1"],
        stdout=subprocess.PIPE, env=dict(os.environ, PORTLEASE_AUTOSTART="0"),
    )
    assert watch.stdout is not None
    seen = b""
    deadline = time.monotonic() + 20
    while seen.count(b"ports held") < 3 and time.monotonic() < deadline:
        seen += os.read(watch.stdout.fileno(), 65536)
    watch.send_signal(signal.SIGINT)
    seen += watch.communicate(timeout=30)[0]
    assert watch.returncode == 0
    assert b"\x1b" not in seen, seen[:300]
    # Every frame ends in a blank line; the one ^C cut short (if any) is left out.
    frames = seen.decode().split("\n\n")[:-1]
    assert len(frames) >= 3, seen[-500:]
    for frame in frames:
        assert frame.splitlines()[-1].startswith("0 leases, 0 ports held"), frame


def test_status_with_no_broker_says_what_is_true_and_what_to_run(tmp_path: Path) -> None:
    """Nothing configured, nothing turned off: no word about autostart, which status never uses."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PORTLEASE_SOCKET", "PORTLEASE_AUTOSTART")}
    env.update(XDG_RUNTIME_DIR=str(tmp_path), PORTLEASE_SYSTEM_DIR=str(tmp_path / "no-sys"),
               PORTLEASE_SYSTEM_CONFIG=str(tmp_path / "no-config.toml"))
    sock = tmp_path / "portlease" / "portlease.sock"
    out = subprocess.run([PYTHON, "-m", "portlease", "status"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 69
    assert out.stderr == (f"portlease: no portlease broker answers at {sock} (No such file or "
                          "directory); start one with `portlease serve`\n")
    # Without the broker's extra, `portlease serve` would fail: install it first.
    lean = ("import sys\nsys.modules['trio'] = None\nfrom portlease.cli import main\n"
            "sys.exit(main(['status']))\n")
    out = subprocess.run([PYTHON, "-c", lean], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 69
    assert out.stderr.endswith("; install the broker first, `pip install 'portlease[broker]'`, "
                               "then start one with `portlease serve`\n"), out.stderr
    # Where a system broker is deployed, its being down is what is said (after the
    # client's 30 s wait for it): tests/unit/test_paths.py and test_autostart.py.


def test_status_names_the_process_that_holds_a_lease_now(broker: BrokerProc) -> None:
    """The wrapper exits; a leftover child keeps the inherited connection, so the lease: it is named."""
    wrapper = subprocess.run(
        [PYTHON, "-m", "portlease", "lease", "--socket", broker.socket, "-n", "2", "--",
         "sh", "-c", "sleep 30 </dev/null >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PORTLEASE_AUTOSTART="0"),
    )
    assert wrapper.returncode == 0, wrapper.stderr
    leftover = int(wrapper.stdout)
    try:
        (info,) = json.loads(portlease("status", "--socket", broker.socket, "--json").stdout)["leases"]
        assert info["state"] == "attached"
        assert info["pid"] == leftover and info["cmdline"] == "sleep 30", info
        line = next(x for x in portlease("status", "--socket", broker.socket).stdout.splitlines()
                    if "attached" in x)
        assert f" {leftover} " in line and line.endswith("sleep 30"), line
    finally:
        os.kill(leftover, signal.SIGKILL)
    # Its end closes the connection, and with it the lease.
    deadline = time.monotonic() + 10
    while Raw(broker.socket).call({"op": "status"})["leases"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Raw(broker.socket).call({"op": "status"})["leases"] == []


def test_status_with_many_long_notes_is_shown_whole(broker: BrokerProc) -> None:
    # A reply far larger than one request line may be: 40 leases, notes at the cut.
    with Connection(broker.socket) as conn:
        for n in range(40):
            conn.lease(1, note=f"{n:02d}" + "z" * 300, detach=True, ttl=60)
        out = portlease("status", "--socket", broker.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("40 leases, 40 ports held")
    assert sum(" detached " in line for line in out.stdout.splitlines()) == 40


def test_status_squatters_lists_unleased_binds_with_pid_and_command(broker: BrokerProc) -> None:
    low = int(broker.range.split("-")[0])
    assert "no squatters" in portlease("status", "--socket", broker.socket, "--squatters").stdout
    code = (
        "import socket, sys\n"
        f"t = socket.socket(); t.bind(('127.0.0.1', {low + 50})); t.listen()\n"
        f"u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(('::', {low + 51}))\n"
        f"b = socket.socket(); b.bind(('0.0.0.0', {low + 52}))  # bound, never listening\n"
        "print('up', flush=True); sys.stdin.readline()\n"
    )
    squatter = subprocess.Popen([PYTHON, "-c", code, "squat\x1b[2Jter"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "up\n"
        with Connection(broker.socket) as conn:
            lease = conn.lease(2)
            # A leased port in use by its holder is no squatter.
            mine = socket.socket()
            mine.bind(("127.0.0.1", lease.port))
            mine.listen()
            out = portlease("status", "--socket", broker.socket, "--squatters")
            mine.close()
    finally:
        squatter.communicate("\n", timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["PORT", "PROTO", "ADDRESS", "UID", "PID", "COMMAND"]
    rows = {int(line.split()[0]): line for line in lines[1:-1]}
    assert set(rows) == {low + 50, low + 51, low + 52}, out.stdout
    assert rows[low + 50].split()[1:5] == ["tcp", "127.0.0.1", str(os.getuid()), str(squatter.pid)]
    assert rows[low + 51].split()[1:3] == ["udp6", "::"]
    assert rows[low + 52].split()[1:3] == ["tcp", "0.0.0.0"]
    for line in rows.values():
        assert line.endswith("squat\\x1b[2Jter")  # the command line, escaped
    assert lines[-1] == "3 squatters (bound in the range, no lease)"


def test_a_range_inside_the_kernels_ephemeral_range_says_so(tmp_path: Path) -> None:
    """Nothing can be granted there, and the error and status say why (not only the start-up log)."""
    low, _high = kernel.ephemeral_range() or (32768, 60999)
    b = BrokerProc(tmp_path, range=f"{low + 100}-{low + 109}").start()
    try:
        refused = Raw(b.socket).call({"op": "lease", "count": 1})
        assert refused["code"] == "exhausted", refused
        assert "ephemeral range" in refused["message"], refused  # type: ignore[operator]
        summary = Raw(b.socket).call({"op": "status"})["summary"]
        assert "ephemeral range" in summary["notice"]  # type: ignore[index]
        out = portlease("status", "--socket", b.socket)
        assert out.returncode == 0, out.stderr
        assert "note: " in out.stdout and "ephemeral range" in out.stdout, out.stdout
    finally:
        b.stop()

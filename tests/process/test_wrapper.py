"""``portlease lease -- CMD``: CMD never outlives its lease, and signals reach it once."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brokerproc import PYTHON, BrokerProc, Raw
from jobcontrol import process_state, stop_fg_ctrl_c

# CMD for the signal tests. It takes its signals with sigwaitinfo, one at a time
# with the sender's pid, and logs each: "INT <pid>", and "TERM" on which it exits.
# (Python-level handlers would merge two SIGINTs arriving close together.)
COUNTER = r"""
import os, signal, sys
waited = {signal.SIGINT, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, waited)
print(os.getpid(), flush=True)
with open(sys.argv[1], "a", buffering=1) as log:
    while True:
        info = signal.sigwaitinfo(waited)
        if info.si_signo == signal.SIGTERM:
            log.write("TERM\n")
            sys.exit(0)
        log.write(f"INT {info.si_pid}\n")
"""

# CMD that listens on every leased port (no SO_REUSEADDR) and says so.
LISTENER = r"""
import os, socket, time
socks = []
for p in map(int, os.environ["PORTLEASE_PORTS"].split()):
    s = socket.socket(); s.bind(("0.0.0.0", p)); s.listen(); socks.append(s)
print(os.getpid(), flush=True)
time.sleep(300)
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PORTLEASE_AUTOSTART="0")


def _wrapper(broker: BrokerProc, *cmd: str, n: int = 1, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [PYTHON, "-m", "portlease", "lease", "--socket", broker.socket, "-n", str(n), "--",
         *cmd],
        stdout=subprocess.PIPE, text=True, env=_env(), **kw,
    )


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it holds no sockets any more)."""
    return process_state(pid) in ("", "Z")


def _until(pred: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def _held(broker: BrokerProc) -> list[list[int]]:
    raw = Raw(broker.socket)
    try:
        return [lease["ports"] for lease in raw.call({"op": "status"})["leases"]]  # type: ignore[index]
    finally:
        raw.close()


@pytest.fixture
def two_port_broker(tmp_path: Path, port_range: str) -> BrokerProc:
    """A broker with exactly two ports, so the next holder gets the very ports CMD had."""
    low = int(port_range.split("-")[0])
    b = BrokerProc(tmp_path, range=f"{low}-{low + 1}").start()
    yield b  # type: ignore[misc]
    b.stop()


# ---------------------------------------------------------------- lifetime


def test_sigkill_of_wrapper_kills_cmd_and_the_next_holder_binds_freely(
    two_port_broker: BrokerProc,
) -> None:
    broker = two_port_broker
    wrapper = _wrapper(broker, PYTHON, "-c", LISTENER, n=2)
    assert wrapper.stdout is not None
    cmd_pid = int(wrapper.stdout.readline())
    wrapper.kill()
    wrapper.wait()
    try:
        # CMD died with the wrapper (PR_SET_PDEATHSIG): before, it kept listening.
        _until(lambda: _gone(cmd_pid), "CMD exits after the wrapper was SIGKILLed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(cmd_pid, signal.SIGKILL)  # a failed run must not leave a squatter behind

    from portlease.client import Connection
    from portlease.client.protocol.errors import Exhausted

    with Connection(broker.socket) as conn:
        deadline = time.monotonic() + 20
        while True:
            try:
                lease = conn.lease(2)
                break
            except Exhausted:
                assert time.monotonic() < deadline, "the ports never came back"
                time.sleep(0.02)
        # The next holder has CMD's very ports and binds them without SO_REUSEADDR.
        for port in lease.ports:
            s = socket.socket()
            s.bind(("0.0.0.0", port))
            s.listen()
            s.close()


def test_process_cmd_leaves_behind_keeps_the_lease_until_it_exits(broker: BrokerProc) -> None:
    # sh is CMD; the sleep it starts in the background is not CMD, so the death
    # signal does not reach it, but it inherited the lease's connection.
    wrapper = _wrapper(broker, "sh", "-c", "sleep 300 & echo $$ $!; wait", n=2)
    assert wrapper.stdout is not None
    sh_pid, orphan = map(int, wrapper.stdout.readline().split())
    [ports] = _held(broker)
    try:
        wrapper.kill()
        wrapper.wait()
        _until(lambda: _gone(sh_pid), "sh (CMD) exits after the wrapper was SIGKILLed")
        assert not _gone(orphan)
        assert _held(broker) == [ports]  # held by the kernel for the leftover process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
    _until(lambda: _held(broker) == [], "the lease ends with the last holder")


def test_normal_exit_of_cmd_ends_the_lease(broker: BrokerProc) -> None:
    wrapper = _wrapper(broker, "sh", "-c", "echo $PORTLEASE_PORTS; exit 4", n=3)
    out, _ = wrapper.communicate(timeout=30)
    assert wrapper.returncode == 4 and len(out.split()) == 3
    _until(lambda: _held(broker) == [], "the lease ends with CMD")


def test_cmd_gets_default_signal_dispositions(broker: BrokerProc) -> None:
    # Python ignores SIGPIPE; CMD must not inherit that (`yes | head` must end).
    out = subprocess.run(
        [PYTHON, "-m", "portlease", "lease", "--socket", broker.socket, "--",
         "sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status"],
        capture_output=True, text=True, timeout=30, env=_env(),
    )
    fields = dict(line.split(":\t") for line in out.stdout.splitlines())
    assert int(fields["SigBlk"], 16) == 0
    assert not int(fields["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1))


# ---------------------------------------------------------------- signals


def _counted(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _group_int_then_term(wrapper: subprocess.Popen[str], pgid: int, log: Path) -> list[str]:
    """SIGINT to the whole group, then SIGTERM to the wrapper alone; CMD's log."""
    assert wrapper.stdout is not None
    int(wrapper.stdout.readline())  # CMD is up, handlers installed
    os.killpg(pgid, signal.SIGINT)
    _until(lambda: any(x.startswith("INT") for x in _counted(log)), "CMD gets the group's SIGINT")
    # The wrapper passes signals on in order: once CMD has this TERM, any second
    # copy of the INT that the wrapper was going to forward has arrived before it.
    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(timeout=30) == 0
    return _counted(log)


def test_group_signal_reaches_cmd_once_when_wrapper_leads_the_group(
    broker: BrokerProc, tmp_path: Path
) -> None:
    log = tmp_path / "signals"
    wrapper = _wrapper(broker, PYTHON, "-c", COUNTER, str(log), process_group=0)
    # Once, and from the wrapper: not straight from the group's signal as well.
    assert _group_int_then_term(wrapper, wrapper.pid, log) == [f"INT {wrapper.pid}", "TERM"]


def test_group_signal_reaches_cmd_once_when_wrapper_is_a_member(
    broker: BrokerProc, tmp_path: Path
) -> None:
    # As under a CI runner: the group's leader is a shell, the wrapper one member.
    leader = subprocess.Popen(["sleep", "300"], process_group=0)
    try:
        log = tmp_path / "signals"
        wrapper = _wrapper(broker, PYTHON, "-c", COUNTER, str(log), process_group=leader.pid)
        assert _group_int_then_term(wrapper, leader.pid, log) == [f"INT {wrapper.pid}", "TERM"]
    finally:
        leader.kill()
        leader.wait()


def test_signal_to_the_wrapper_alone_reaches_cmd_once(broker: BrokerProc, tmp_path: Path) -> None:
    log = tmp_path / "signals"
    wrapper = _wrapper(broker, PYTHON, "-c", COUNTER, str(log))
    assert wrapper.stdout is not None
    int(wrapper.stdout.readline())
    wrapper.send_signal(signal.SIGINT)
    _until(lambda: any(x.startswith("INT") for x in _counted(log)), "CMD gets the forwarded SIGINT")
    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(timeout=30) == 0
    assert _counted(log) == [f"INT {wrapper.pid}", "TERM"]


def test_a_stop_sent_to_the_wrapper_stops_cmd_and_then_the_wrapper(
    broker: BrokerProc, tmp_path: Path
) -> None:
    """``kill -TSTP`` on the wrapper, or a ^Z reaching its group, stops the whole job.

    Before, the wrapper alone stopped (the shell said "Stopped") and CMD ran on.
    """
    log = tmp_path / "signals"
    wrapper = _wrapper(broker, PYTHON, "-c", COUNTER, str(log))
    try:
        assert wrapper.stdout is not None
        cmd = int(wrapper.stdout.readline())
        wrapper.send_signal(signal.SIGTSTP)
        _until(lambda: process_state(cmd) == "T", "CMD stopped")
        _until(lambda: process_state(wrapper.pid) == "T", "the wrapper stopped after CMD")
        wrapper.send_signal(signal.SIGCONT)  # as a shell's `fg` or `bg` does
        _until(lambda: "T" not in (process_state(cmd), process_state(wrapper.pid)), "both continued")
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=30) == 0
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()
    assert _counted(log) == ["TERM"]


def test_cmd_owns_the_terminal_and_ctrl_c_reaches_it_once(broker: BrokerProc, tmp_path: Path) -> None:
    log = tmp_path / "signals"
    # CMD reads a line from the terminal (a background process would be stopped
    # by SIGTTIN), then counts ^C and ends on SIGTERM.
    code = ("import sys; line = sys.stdin.readline(); print('read', line.strip(), flush=True)\n"
            + COUNTER)
    master, slave = pty.openpty()
    slave_name = os.ttyname(slave)

    def take_terminal() -> None:
        os.close(os.open(slave_name, os.O_RDWR))  # a new session's first tty becomes its own

    wrapper = subprocess.Popen(
        [PYTHON, "-m", "portlease", "lease", "--socket", broker.socket, "--",
         PYTHON, "-c", code, str(log)],
        stdin=slave, stdout=slave, stderr=slave, env=_env(), start_new_session=True,
        preexec_fn=take_terminal,
    )
    os.close(slave)
    seen = b""

    def read_until(text: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 20
        while text not in seen:
            assert time.monotonic() < deadline, seen
            with contextlib.suppress(OSError):
                seen += os.read(master, 4096)

    def _read_more_until(done: object) -> None:
        nonlocal seen
        deadline = time.monotonic() + 20
        while not done():  # type: ignore[operator]
            assert time.monotonic() < deadline, seen
            with contextlib.suppress(OSError):
                seen += os.read(master, 4096)

    try:
        os.write(master, b"hello\n")
        read_until(b"read hello\r\n")
        _read_more_until(lambda: seen.split(b"read hello\r\n", 1)[1].endswith(b"\r\n"))
        os.write(master, b"\x03")  # ^C: the terminal signals its foreground group
        _until(lambda: any(x.startswith("INT") for x in _counted(log)), "CMD gets ^C")
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=30) == 0
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        os.close(master)
    assert _counted(log) == ["INT 0", "TERM"]  # 0: sent by the kernel, for the terminal


def test_a_cmd_that_cannot_run_hands_the_terminal_back(broker: BrokerProc) -> None:
    # The inner wrapper hands the terminal to its child, whose exec fails. Unless
    # the wrapper takes the terminal back before it exits, the shell that ran it
    # is left in the background and its `read` stops it with SIGTTIN.
    inner = f"{PYTHON} -m portlease lease --socket {broker.socket} -- /no/such/cmd"
    script = f'{inner}; echo "rc=$?"; read line; echo "read $line"'
    master, slave = pty.openpty()
    slave_name = os.ttyname(slave)

    def take_terminal() -> None:
        os.close(os.open(slave_name, os.O_RDWR))  # a new session's first tty becomes its own

    wrapper = subprocess.Popen(
        [PYTHON, "-m", "portlease", "lease", "--socket", broker.socket, "--",
         "sh", "-c", script],
        stdin=slave, stdout=slave, stderr=slave, env=_env(), start_new_session=True,
        preexec_fn=take_terminal,
    )
    os.close(slave)
    seen = b""

    def read_until(text: bytes) -> None:
        # select first: a shell stopped by SIGTTIN writes nothing, and a bare
        # read would wait for it forever instead of failing.
        nonlocal seen
        deadline = time.monotonic() + 20
        while text not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([master], [], [], 0.5)[0]:
                with contextlib.suppress(OSError):
                    seen += os.read(master, 4096)

    try:
        read_until(b"rc=127")
        os.write(master, b"hello\n")
        read_until(b"read hello")
        assert wrapper.wait(timeout=30) == 0
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        os.close(master)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux process groups")
def test_cmd_runs_in_its_own_process_group(broker: BrokerProc) -> None:
    out = subprocess.run(
        [PYTHON, "-m", "portlease", "lease", "--socket", broker.socket, "--",
         PYTHON, "-c", "import os; print(os.getpid(), os.getpgrp(), os.getppid())"],
        capture_output=True, text=True, timeout=30, env=_env(), process_group=0,
    )
    pid, pgrp, _ = map(int, out.stdout.split())
    assert pgrp == pid


def test_job_control_stop_fg_and_ctrl_c_in_an_interactive_shell(broker: BrokerProc) -> None:
    import shutil

    if shutil.which("bash") is None:
        pytest.skip("needs bash for job control")
    stop_fg_ctrl_c(broker.socket, Path(broker.dir), PYTHON)

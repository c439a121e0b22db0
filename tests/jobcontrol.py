"""A person at an interactive bash: ``portlease lease -- CMD``, then ^Z, ``fg``, ^C.

One scenario, driven through a real pty and a real ``bash -i``, shared by
``tests/process/test_wrapper.py`` (once) and ``bench/jobcontrol.py`` (many times
under load, where a rare race shows).
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

from portlease.client.host import procinfo

STEP_TIMEOUT = 20.0
"""Seconds each step may take before the scenario fails with a report."""

# CMD has no Python-level signal handler at all. ^C must end it in the kernel
# (SIGINT at SIG_DFL, as for a C program) and each SIGCONT is taken with
# sigwaitinfo. Two earlier CMDs failed the test for CMD's own reasons, never the
# wrapper's (bench/jobcontrol_stress.py, traced with the kernel's signal events):
# - print() in a SIGCONT handler is not reentrant: a ^Z landing inside the main
#   line's print made the handler's print raise RuntimeError;
# - with a Python SIGCONT handler that wrote with os.write, a ^C arriving while
#   that handler ran was delivered (the C-level handler ran) but never raised:
#   time.sleep had already checked for signals and slept on for 300 s.
CMD = ("import os, signal\n"
       "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
       "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCONT})\n"
       "os.write(1, f'cmd up {os.getpid()} end\\n'.encode())\n"
       "while True:\n"
       "    signal.sigwaitinfo({signal.SIGCONT})\n"
       "    os.write(1, b'continued\\n')\n")


def session_report(leader: int, terminal: int) -> str:
    """Who holds the terminal, and each process of ``leader``'s session with its signal state.

    What a failed run needs to be explained after the fact: a lost ^C is either
    sent to a group that does not act on it, or pending in a process that is
    stopped or blocks it.
    """
    try:
        lines = [f"foreground group of the terminal: {os.tcgetpgrp(terminal)}"]
    except OSError as exc:
        lines = [f"foreground group of the terminal: {exc}"]
    for entry in sorted(Path("/proc").iterdir(), key=lambda e: e.name):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if len(fields) < 4 or int(fields[3]) != leader:
            continue
        state, ppid, pgrp = fields[0], fields[1], fields[2]
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        masks = " ".join(line.replace("\t", "") for line in status.splitlines()
                         if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")))
        args = (procinfo.read_cmdline(int(entry.name)) or "")[:80]
        lines.append(f"pid {entry.name} ppid {ppid} pgrp {pgrp} state {state} {masks} :: {args}")
    return "\n".join(lines)


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields from the state on (zombies too), or [] for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return []


def process_state(pid: int) -> str:
    """The process's state letter (``T`` stopped, ``Z`` zombie, ...), or "" if it is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else ""


def stop_fg_ctrl_c(socket_path: str, workdir: Path, python: str = sys.executable) -> None:
    """Run the scenario once; AssertionError with a session report if any step fails.

    After ``fg`` the wrapper must hand the terminal on to CMD's process group, and
    ^C must end CMD with SIGINT's status (130), which the shell then reports.
    """
    script = workdir / "cmd.py"
    script.write_text(CMD)
    pid, master = pty.fork()
    if pid == 0:  # the child: an interactive shell on the new terminal
        os.environ.update(PS1="$ ", PORTLEASE_AUTOSTART="0", TERM="dumb")
        os.execvp("bash", ["bash", "--norc", "--noprofile", "-i"])
    seen = b""
    trail: list[str] = []  # at each step: the terminal's group, and CMD's and its parent's states

    def note(step: str, cmd: int) -> None:
        states = [f"{who}:{process_state(who)}" for who in (cmd, procinfo.parent_pid(cmd) or 0)]
        trail.append(f"{step}: foreground {os.tcgetpgrp(master)}, {' '.join(states)}")

    def failed(what: str) -> str:
        return (f"{what}\n{session_report(pid, master)}\nsteps: {'; '.join(trail)}\n"
                f"terminal output: {seen!r}")

    def read_until(text: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + STEP_TIMEOUT
        while text not in seen:
            left = deadline - time.monotonic()
            assert left > 0, failed(f"no {text!r} on the terminal")
            # A blocking read would outwait the deadline when the shell says nothing more.
            if select.select([master], [], [], left)[0]:
                with contextlib.suppress(OSError):
                    seen += os.read(master, 4096)

    try:
        os.write(master, f"{python} -m portlease lease --socket {socket_path} -- "
                         f"{python} {script}\n".encode())
        read_until(b" end")
        cmd = int(seen.split(b"cmd up ", 1)[1].split()[0])
        note("cmd up", cmd)
        os.write(master, b"\x1a")  # ^Z: CMD stops, and the shell sees its job stopped
        read_until(b"Stopped")
        note("stopped", cmd)
        os.write(master, b"fg\n")
        read_until(b"continued")
        # `fg` gives the terminal to the wrapper's group; the wrapper hands it on to CMD's.
        deadline = time.monotonic() + STEP_TIMEOUT
        while os.tcgetpgrp(master) != cmd:
            assert time.monotonic() < deadline, failed("CMD's group never got the terminal after fg")
            time.sleep(0.01)
        os.write(master, b"\x03")  # ^C: CMD ends with SIGINT's status
        os.write(master, b"echo rc=$?\n")
        read_until(b"rc=130")
        os.write(master, b"exit\n")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(master)

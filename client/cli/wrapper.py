"""``portlease lease -- CMD``: run CMD on leased ports, and never let it outlive them.

**CMD must not outlive its lease.** The lease belongs to the wrapper's
connection; when the wrapper dies (SIGKILL, OOM) the broker ends it at once and
may grant the ports again. Two mechanisms are used, because each alone leaves a
hole the other closes:

* **CMD dies with the wrapper** (``PR_SET_PDEATHSIG`` = SIGKILL, set in the
  child between fork and exec). This is the rule: whatever happens to the
  broker connection (a broker restart gives the wrapper a new connection that
  CMD never saw), CMD cannot keep running on ports nobody holds. The signal
  fires when the *thread* that forked dies, so the fork is done by the main
  thread, which lives until the wrapper exits; the sync client's reclaim
  thread never forks. A wrapper that died between fork and ``prctl`` is caught
  by checking ``getppid()`` after it.
* **CMD inherits a copy of the lease's connection** (at fd ``3 + the number of
  --listen sockets``). ``PR_SET_PDEATHSIG`` reaches CMD only, not processes CMD
  started (``sh -c 'server & …'``), and is cleared by exec of a setuid
  program. A copy of the connection fd keeps the lease held, by the kernel,
  until the last process holding it is gone, so such a leftover can never
  collide with the next holder. (After a broker restart only the wrapper's
  new connection holds the lease; the first mechanism still covers CMD.)

Choosing only the inherited connection would leave CMD running forever after
the wrapper is killed (and would break after a broker restart); choosing only
the death signal would free the ports while CMD's background children still use
them.

**Signals reach CMD exactly once.** CMD runs in a process group of its own, so a
signal sent to the wrapper's group by another process (``kill -INT -PGID``, a CI
runner cancelling a job) reaches the wrapper only, which passes it on to CMD's
group once. When the wrapper is in the foreground of a terminal it hands the
terminal's foreground to CMD's group (as a shell does for a job), so ^C and ^Z
go to CMD directly and the wrapper, no longer in the foreground, does not see
them; it follows CMD when CMD stops and continues. A SIGTSTP that does reach
the wrapper (``kill -TSTP`` on it or on its group) is passed on like the others,
and the wrapper then stops with CMD, terminal or not; SIGCONT to the wrapper
resumes both. Were SIGTSTP not passed on, the wrapper alone would stop, a shell
would report the job stopped, and CMD would run on.

The process is started with ``fork`` + ``exec`` rather than ``posix_spawn``:
``PR_SET_PDEATHSIG``, the ``getppid()`` check after it, the terminal hand-over
and ``LISTEN_PID`` (CMD's own pid) can only be done in the child. A
``posix_spawn`` of a ``sh -c 'LISTEN_PID=$$ exec "$@"'`` trampoline is cheaper
than fork + exec and would give CMD its ``LISTEN_PID``, but it cannot set the
death signal or check the parent, so fork it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shlex
import signal
import socket
import sys
import time
import warnings
from typing import NamedTuple, NoReturn

from portlease.client.sync import Connection

from .exitcodes import EXIT_CANNOT_RUN, EXIT_NOT_FOUND
from .handoff import BindError, ListenSpec, bind_listener, bind_placeholder, close_all

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGTSTP)
"""Signals the wrapper passes on to CMD's process group."""
_WAITED = (*FORWARDED, signal.SIGCHLD)

EXIT_BIND = 1

HOLD_POLL = 0.05
"""Seconds between looks at ``/proc`` for CMD's listener while a port is held."""

_PR_SET_PDEATHSIG = 1
_ENV_DROPPED = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class Plan(NamedTuple):
    """Everything ``portlease lease -- CMD`` was asked to do, already validated.

    A NamedTuple rather than a dataclass, as are the CLI's other records: this
    runs once per CI step, and dataclasses costs milliseconds to import.
    """

    cmd: list[str]
    port_count: int
    socket: str | None
    note: str | None
    env_offsets: dict[str, int]
    listen: list[ListenSpec]
    listen_host: str | None
    hold: list[int]
    hold_timeout: float


def run_plan(plan: Plan) -> int:
    """Lease, bind what was asked, run CMD, pass signals on, return CMD's exit status."""
    # Block the signals we wait for before any thread exists, so that every
    # thread inherits the mask and sigwaitinfo below is the one place they land.
    # SIGTTOU too: handing the terminal to CMD's group and back must not stop us.
    signal.pthread_sigmask(signal.SIG_BLOCK, (*_WAITED, signal.SIGTTOU))
    conn = Connection(plan.socket, client="portlease-cli")
    try:
        code = _run_on(conn, plan)
    except BaseException:
        conn.close()
        raise
    if code is None:
        conn.close()
        return EXIT_BIND
    # Leave without Connection.close(): it shuts the socket down for every
    # holder, and processes CMD left behind still hold the copy that keeps the
    # lease theirs. Exiting closes only our fd; the kernel does the rest.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_on(conn: Connection, plan: Plan) -> int | None:
    """Lease on ``conn`` and run CMD; CMD's exit status, or None if a port could not be bound."""
    lease = conn.lease(plan.port_count, note=plan.note)
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROPPED}
    env["PORTLEASE_PORTS"] = " ".join(map(str, lease.ports))
    env["PORTLEASE_PORT"] = str(lease.port)
    for name, offset in plan.env_offsets.items():
        env[name] = str(lease.ports[offset])
    listeners: list[socket.socket] = []
    holds: dict[int, socket.socket] = {}
    try:
        for spec in plan.listen:
            listeners.append(bind_listener(lease.ports[spec.offset], udp=spec.udp,
                                           host=plan.listen_host))
        for offset in plan.hold:
            holds[lease.ports[offset]] = bind_placeholder(lease.ports[offset])
    except BindError as exc:
        close_all(listeners + list(holds.values()))
        print(f"portlease: {exc.strerror}", file=sys.stderr)
        return None
    if listeners:
        env["LISTEN_FDS"] = str(len(listeners))
        env["LISTEN_FDNAMES"] = ":".join(spec.name for spec in plan.listen)
    tty = _foreground_tty()
    try:
        started = _spawn(plan.cmd, env, [s.fileno() for s in listeners] + [conn.fileno()],
                         bool(listeners), tty)
    finally:
        # CMD has its copies; ours would keep accepting after CMD is gone.
        close_all(listeners)
    try:
        if isinstance(started, OSError):
            print(f"portlease: cannot run {plan.cmd[0]}: {started.strerror}{_count_hint(plan.cmd)}",
                  file=sys.stderr)
            return EXIT_NOT_FOUND if started.errno == errno.ENOENT else EXIT_CANNOT_RUN
        return _wait(started, tty, holds, time.monotonic() + plan.hold_timeout)
    finally:
        close_all(list(holds.values()))
        if tty is not None:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(tty, os.getpgrp())
            os.close(tty)


def _count_hint(cmd: list[str]) -> str:
    """For ``portlease lease 3 -- true``: the number was meant as ``-n 3``, not as CMD."""
    if not cmd[0].isdigit():
        return ""
    rest = cmd[2:] if cmd[1:2] == ["--"] else cmd[1:]
    meant = shlex.join(["portlease", "lease", "-n", cmd[0], "--", *(rest or ["CMD"])])
    return f"; did you mean `{meant}`? (the number of ports is the -n option)"


def _foreground_tty() -> int | None:
    """The controlling terminal, if our process group is in its foreground."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.tcgetpgrp(fd) == os.getpgrp():
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _high_copy(fd: int, floor: int) -> int:
    # Copies above every target fd number, so that placing one inherited fd
    # (dup2 onto 3, 4, …) can never overwrite the source of another.
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)


def _spawn(cmd: list[str], env: dict[str, str], fds: list[int], listen: bool,
           tty: int | None) -> int | OSError:
    """Fork and exec CMD with ``fds`` at 3, 4, …; the pid, or the exec error."""
    floor = 3 + len(fds)
    sources = [_high_copy(fd, floor) for fd in fds]
    pipe = os.pipe()
    pipe_r, pipe_w = (_high_copy(fd, floor) for fd in pipe)
    for fd in pipe:
        os.close(fd)
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    with warnings.catch_warnings():
        # Python warns that fork() with threads may deadlock the child: this
        # child runs no Python code that takes a lock before it execs.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        _child(cmd, env, sources, listen, tty, parent, libc, pipe_w)
    # Both sides set the group, as shells do, so that neither order races.
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    if tty is not None:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(tty, pid)
    for fd in (*sources, pipe_w):
        os.close(fd)
    with os.fdopen(pipe_r, "rb") as report:
        failed = report.read()
    if failed:
        os.waitpid(pid, 0)
        code = int(failed)
        return OSError(code, os.strerror(code))
    return pid


def _child(cmd: list[str], env: dict[str, str], sources: list[int], listen: bool,
           tty: int | None, parent: int, libc: ctypes.CDLL, report: int) -> NoReturn:
    """In the forked child: set up and exec CMD. Never returns."""
    try:
        os.setpgid(0, 0)
        if tty is not None:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(tty, os.getpid())
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(128 + signal.SIGKILL)  # the wrapper died before prctl took effect
        for target, fd in enumerate(sources, start=3):
            os.dup2(fd, target)  # inheritable: the one copy CMD keeps
        if listen:
            env["LISTEN_PID"] = str(os.getpid())
        # What CMD would get from a shell: default dispositions for what Python
        # ignores (SIGPIPE, SIGXFSZ) and for what the wrapper waits on; a signal
        # arriving between unmasking and exec then acts as it would on CMD.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        for sig in _WAITED:
            # A signal ignored by whoever started us (nohup) stays ignored.
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        os.execvpe(cmd[0], cmd, env)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.write(report, str(exc.errno or errno.EIO).encode())
        os._exit(EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_CANNOT_RUN)
    except BaseException:
        os._exit(EXIT_CANNOT_RUN)
    os._exit(EXIT_CANNOT_RUN)


def _wait(pid: int, tty: int | None, holds: dict[int, socket.socket], hold_until: float) -> int:
    """Wait for CMD, passing on signals other processes send us; CMD's exit status."""
    stop_asked = False  # a SIGTSTP came to us: when CMD stops, stop with it
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        except ChildProcessError:  # reaped elsewhere: nothing left to report
            return 0
        if done:
            if os.WIFSTOPPED(status):
                _follow_stop(pid, tty, stop_asked)
                stop_asked = False
                continue
            return exit_code(status)
        timeout = None
        if holds:
            _release_held(pid, holds, hold_until)
            timeout = HOLD_POLL if holds else None
        if timeout is None:
            info = signal.sigwaitinfo(_WAITED)
        else:
            got = signal.sigtimedwait(_WAITED, timeout)
            if got is None:
                continue
            info = got
        if info.si_signo == signal.SIGCHLD or info.si_pid == pid:
            continue
        stop_asked = stop_asked or info.si_signo == signal.SIGTSTP
        _signal_cmd(pid, info.si_signo)


def _signal_cmd(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # CMD may have moved itself to another group (a shell with job
        # control, a daemon): then it alone gets the signal.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _follow_stop(pid: int, tty: int | None, asked: bool) -> None:
    """CMD stopped (^Z): stop too, so the shell sees the job stopped; resume it with us.

    ``asked``: the stop was a SIGTSTP sent to us and passed on; whoever sent it
    expects us stopped, and will continue us, terminal or not.
    """
    if tty is None and not asked:
        return  # CMD stopped by someone with a reason; we just wait on
    if tty is not None:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(tty, os.getpgrp())
    os.kill(os.getpid(), signal.SIGSTOP)
    # Continued by `fg` (terminal handed back to us) or `bg` (not).
    if tty is not None:
        with contextlib.suppress(OSError):
            if os.tcgetpgrp(tty) == os.getpgrp():
                os.tcsetpgrp(tty, pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)


def _release_held(pid: int, holds: dict[int, socket.socket], until: float) -> None:
    """Drop each placeholder whose port a process of CMD's tree now listens on."""
    if time.monotonic() >= until:
        for port, sock in sorted(holds.items()):
            sock.close()
            print(f"portlease: --hold: nothing of the command listened on port {port} in time; "
                  "the placeholder is gone", file=sys.stderr)
        holds.clear()
        return
    # Only --hold reads the socket tables: a plain `lease -- CMD` does not pay for it.
    from portlease.client.host import procnet

    for port in procnet.listening(holds, pid):
        holds.pop(port).close()


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the signal."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code

"""Start the per-user broker on demand, the way build daemons do.

When no socket is configured and nothing answers on the per-user socket, a
client calls :func:`ensure_broker`: it spawns ``python -m portlease.broker
serve`` in a new session (no terminal, stdin from ``/dev/null``, output
appended to ``broker.log`` next to the socket) and waits until the socket
answers. The broker exits by itself after ``$PORTLEASE_IDLE_EXIT`` seconds
(default 600) with no connection and no lease.

Two clients racing to start it end up sharing one broker: a spawn lock next
to the socket makes the second client wait for the first one's broker instead
of starting its own, and the broker's own lock file stops any broker started
outside this protocol (``portlease serve`` by hand) from stealing the path.

This module is never used for a configured socket (``--socket``,
``$PORTLEASE_SOCKET``) nor where a system deployment exists (see
:mod:`portlease.client.paths`): a configured broker that does not answer is an
error to report, and a system broker that is down must not be replaced by a
private one. It creates, binds and writes nothing outside the caller's own
per-user directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Generator
from typing import Final

from . import paths
from .host.probe import answers
from .host.procnet import live_brokers
from .protocol.errors import AlreadyServing

DEFAULT_IDLE_EXIT: Final = 600.0
"""Seconds an autostarted broker lingers with no connection and no lease."""

LOG_NAME: Final = "broker.log"

_noticed = False
"""Whether this process said already that other users' brokers run here (said once)."""


# Variables that describe *our* service manager context; a detached broker
# must not act on them (send READY=1 to the CI runner's unit, adopt its fds,
# keep claims in its fd store, write its journal into the runner's state
# directory).
_SCRUBBED_ENV: Final = (
    "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_PID",
    "WATCHDOG_USEC", "FDSTORE", "STATE_DIRECTORY", "PORTLEASE_SOCKET",
)


def idle_exit() -> float:
    """The idle time the autostarted broker gets: ``$PORTLEASE_IDLE_EXIT`` or 600 s."""
    raw = os.environ.get("PORTLEASE_IDLE_EXIT", "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_IDLE_EXIT
    return value if value >= 0 else DEFAULT_IDLE_EXIT


def log_path(path: str) -> str:
    """Where the autostarted broker for socket ``path`` writes its log."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), LOG_NAME)


def broker_command(path: str) -> list[str]:
    """The command line of the broker started for socket ``path``."""
    return [
        sys.executable, "-m", "portlease", "serve", "--socket", path,
        # Explicit, so that a STATE_DIRECTORY inherited from a service does not
        # put a per-user broker's journal somewhere shared.
        "--state", path + ".state",
        "--idle-exit", f"{idle_exit():g}",
    ]




def ensure_broker(path: str, *, timeout: float) -> None:
    """Make sure a broker answers on ``path``, starting one if none does.

    ``path`` must be the per-user socket. Returns once the socket accepts
    connections. Raises :class:`UnsafeSocket` when its directory is not the
    caller's own, and :class:`OSError` when the broker could not be started
    within ``timeout`` seconds (the message names the log file to read).
    """
    if os.path.abspath(path) != os.path.abspath(paths.user_socket()):
        # Anything but the caller's own per-user socket is someone else's to run.
        raise OSError(errno.EPERM, f"{path} is not the per-user socket; not starting a broker there")
    deadline = time.monotonic() + timeout
    _private_dir(path)
    with _spawn_lock(path + ".spawn", deadline):
        # Whoever held the lock before us may have started it already.
        if answers(path):
            return
        _spawn_and_wait(path, deadline, timeout)


def _private_dir(path: str) -> None:
    """Create the per-user socket's directory 0700, or check that an existing one is ours alone.

    Never chmods or chowns: a directory that is not already private is
    refused (the same check every connect makes), so that autostart cannot
    loosen or take over anything it did not create.
    """
    directory = os.path.dirname(os.path.abspath(path))
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, mode=0o700)
    problem = paths.directory_problem(directory)
    if problem is not None:
        raise paths.unsafe_directory(f"not starting a portlease broker at {path}", path,
                                     directory, problem)


@contextlib.contextmanager
def _spawn_lock(lock_path: str, deadline: float) -> Generator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # Polled rather than blocking so that the timeout holds even if
                # the lock holder hangs.
                if time.monotonic() >= deadline:
                    raise OSError(
                        errno.ETIMEDOUT, f"timed out waiting for {lock_path} (another client "
                        "is starting the broker)",
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)  # drops the lock


def _spawn_and_wait(path: str, deadline: float, timeout: float) -> None:
    import subprocess  # only here: the common path (a broker answers) never pays for it

    log = log_path(path)
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        log_start = os.fstat(log_fd).st_size
        os.write(log_fd, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} autostarted by pid "
                         f"{os.getpid()}\n".encode())
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        # A child inherits the signal mask of the thread that spawns it, and
        # `portlease lease -- CMD` blocks the signals it forwards: a broker
        # started from there would never see SIGTERM. Spawn with none blocked.
        blocked = signal.pthread_sigmask(signal.SIG_SETMASK, ())
        try:
            proc = subprocess.Popen(
                broker_command(path), stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                start_new_session=True, close_fds=True, cwd="/", env=env,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    finally:
        os.close(log_fd)
    # Reap the broker whenever it exits so it never lingers as a zombie of a
    # long-lived client; the thread is daemonic and costs nothing meanwhile.
    threading.Thread(target=proc.wait, name="portlease-autostart-reaper", daemon=True).start()
    delay = 0.005
    while True:
        if answers(path):
            _notice_other_users()
            return
        if proc.poll() is not None:
            tail = _log_since(log, log_start)
            if proc.returncode != AlreadyServing.EXIT_STATUS:
                raise OSError(
                    errno.ECHILD,
                    f"the portlease broker started for {path} exited with status "
                    f"{proc.returncode}: {_last_line(tail)} (see {log})",
                )
            # Lost the race to a broker started by other means: use that one.
        if time.monotonic() >= deadline:
            raise OSError(
                errno.ETIMEDOUT,
                f"the portlease broker started for {path} did not answer within {timeout:g} s "
                f"(see {log})",
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _notice_other_users() -> None:
    """Say once per process that a system service would let users who run brokers here share one.

    Each broker's ports are claimed host-wide, so two users' brokers never grant
    the same port; but each sees only its own leases in ``status``. Read from
    the brokers' presence names (any user may bind one, so this is a hint).
    """
    global _noticed
    if _noticed:
        return
    _noticed = True
    try:
        uids = sorted({uid for uid, _ in live_brokers() if uid != os.geteuid()})
    except OSError:
        return
    if uids:
        who = ", ".join(str(u) for u in uids)
        print(f"portlease: started a per-user broker while another user's broker runs on this host "
              f"(uid {who}); a system service would let those users share one broker and one status "
              f"view: see docs/systemd.md", file=sys.stderr)


def _log_since(log: str, offset: int) -> bytes:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return f.read(65536)
    except OSError:
        return b""


def _last_line(text: bytes) -> str:
    lines = [line for line in text.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"

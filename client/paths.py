"""Whether the chosen socket is safe, and what to say when nothing answers.

The socket is chosen by one rule (:mod:`portlease.client.host.locations`) for the broker,
both clients and the CLI:

1. ``--socket`` / ``socket=`` (explicit);
2. ``$PORTLEASE_SOCKET``;
3. ``/run/portlease/portlease.sock`` where a system deployment exists
   (``/run/portlease`` or ``/etc/portlease/config.toml`` is present);
4. else the per-user socket, ``$XDG_RUNTIME_DIR/portlease/portlease.sock``, or
   ``/tmp/portlease-$UID/portlease.sock`` without ``XDG_RUNTIME_DIR``.

Only the per-user socket is ever started on demand (see
:mod:`portlease.client.autostart`); a system broker that is down is waited for
and then reported, never replaced by a private one, or two users of one host
would be handed the same ports.

A per-user path lives in a place another user may have reached first (``/tmp``
above all), so before every connect the clients check that its directory is
the caller's own (owner, not a symlink, not writable by group or others), and
after connecting that the process behind the socket runs as the caller
(``SO_PEERCRED``). The system socket's listener must be root (socket activation
makes systemd the listener) or the caller. An explicit socket is trusted as
configured. Anything else raises :class:`UnsafeSocket` before a byte is sent.

``PORTLEASE_SYSTEM_DIR`` and ``PORTLEASE_SYSTEM_CONFIG`` move the system
paths; they are test hooks, not configuration.
"""

from __future__ import annotations

import errno
import os
import socket as _socket
import stat
import struct
from typing import Final, Literal

# The rule itself lives in host.locations; the shells reach it through this module.
from portlease.client.host.locations import (
    CHECK_SYSTEM,
    SOCKET_NAME,
    SYSTEM_CONFIG,
    SYSTEM_DIR,
    SYSTEM_SOCKET,
    SocketChoice,
    Source,
    autostart_enabled,
    choose_socket,
    explicit_socket,
    system_config,
    system_deployment,
    system_dir,
    system_socket,
    user_socket,
)

from .protocol.errors import BrokerUnavailable, UnsafeSocket

# ---------------------------------------------------------------- safety


def directory_problem(directory: str, uid: int | None = None) -> str | None:
    """What makes ``directory`` unfit to hold a per-user socket, or None if it is fine.

    A missing directory is fine (nothing can answer there; autostart creates it).
    """
    uid = os.getuid() if uid is None else uid
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"it is a symlink (to {os.readlink(directory)}), which someone else may control"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != uid:
        return f"it belongs to uid {st.st_uid}, not to you (uid {uid})"
    if st.st_mode & 0o022:
        return (f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}), "
                "so someone else may have put the socket there")
    return None


def check_directory(choice: SocketChoice) -> None:
    """Raise :class:`UnsafeSocket` if a per-user socket's directory is not the caller's own."""
    if not choice.per_user:
        return
    directory = os.path.dirname(choice.path)
    problem = directory_problem(directory)
    if problem is not None:
        raise unsafe_directory(f"refusing the portlease socket {choice.path}", choice.path,
                               directory, problem)


def unsafe_directory(refusing: str, path: str, directory: str, problem: str) -> UnsafeSocket:
    """The :class:`UnsafeSocket` for the socket ``path`` whose ``directory`` has ``problem``.

    ``refusing`` opens the message: what is not done because of it.
    """
    return UnsafeSocket(
        f"{refusing}: its directory {directory}: {problem}. "
        f"Remove {directory} if it is not yours, or set PORTLEASE_SOCKET",
        paths=(path,),
    )


def peer_uid(sock: _socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process that listens behind a connected Unix socket."""
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


def check_peer(sock: _socket.socket, choice: SocketChoice) -> None:
    """Raise :class:`UnsafeSocket` unless the peer of ``sock`` may serve ``choice``.

    Per-user socket: the peer runs as the caller. System socket: as root (or
    the caller). An explicit socket is not checked.
    """
    if choice.explicit:
        return
    me = os.getuid()
    pid, uid = peer_uid(sock)
    allowed = {me, 0} if choice.system else {me}
    if uid in allowed:
        return
    whom = "root or you" if choice.system else "you"
    raise UnsafeSocket(
        f"refusing the portlease socket {choice.path}: the process behind it (pid {pid}) runs "
        f"as uid {uid}, not as {whom} (uid {me}); it is not your broker. Nothing was sent to it",
        paths=(choice.path,),
    )


# ---------------------------------------------------------------- when nothing answers

Action = Literal["autostart", "wait"]


def on_connect_error(
    choice: SocketChoice, exc: OSError, *, autostart_on: bool, autostart_tried: bool
) -> Action | BrokerUnavailable:
    """What to do after ``connect`` to ``choice`` failed with ``exc``.

    ``"autostart"``: start the per-user broker; ``"wait"``: try again later
    (a system broker that is down, or being started); else the error to raise.
    """
    if isinstance(exc, PermissionError):
        return BrokerUnavailable(
            f"permission denied on the portlease socket {choice.path}: add this user to the "
            "socket's group (usually `portlease`) and log in again",
            paths=(choice.path,),
        )
    if choice.system:
        return "wait"
    if choice.per_user and autostart_on and not autostart_tried:
        return "autostart"
    return unavailable(choice, exc, autostart_on=autostart_on)


class Dialing:
    """One attempt of a client to reach the broker at ``choice``: what each failed connect leads to.

    Both clients drive it, each with its own clock and sleep. ``autostart`` is
    the client's setting (None: ``$PORTLEASE_AUTOSTART``), read only once a
    connect has failed; a system broker that is down is waited for until
    ``deadline``, with pauses growing to ``max_delay``.
    """

    __slots__ = ("_autostart", "_autostart_on", "_autostart_tried", "_delay", "_max_delay",
                 "choice", "deadline")

    def __init__(self, choice: SocketChoice, *, autostart: bool | None, deadline: float,
                 max_delay: float) -> None:
        self.choice = choice
        self.deadline = deadline
        self._autostart = autostart
        self._autostart_on: bool | None = None
        self._autostart_tried = False
        self._delay = 0.005
        self._max_delay = max_delay

    def after_error(self, exc: OSError, now: float) -> Literal["autostart"] | float:
        """``"autostart"`` (start the per-user broker), or seconds to wait before connecting again.

        Raises the :class:`BrokerUnavailable` to report once neither is left.
        """
        if self._autostart_on is None:
            self._autostart_on = autostart_enabled(self._autostart)
        action = on_connect_error(self.choice, exc, autostart_on=self._autostart_on,
                                  autostart_tried=self._autostart_tried)
        if action == "autostart":
            self._autostart_tried = True
            return action
        if action == "wait" and now + self._delay < self.deadline:
            delay = self._delay
            self._delay = min(delay * 2, self._max_delay)
            return delay
        if action == "wait":
            action = unavailable(self.choice, exc, autostart_on=self._autostart_on)
        raise action from None


def unavailable(choice: SocketChoice, exc: OSError, *, autostart_on: bool) -> BrokerUnavailable:
    """The :class:`BrokerUnavailable` for a socket that did not answer with ``exc``.

    It says what is true and what to run: the system broker is down (and how to
    see why); or nothing answers at the path, and how to start a broker there,
    installing the broker's extra first where it is missing. Autostart is named
    only when ``$PORTLEASE_AUTOSTART`` turned it off: a caller that never starts a
    broker (``portlease status``, ``autostart=False``) chose so, and was told nothing
    about it that needs undoing.
    """
    reason = exc.strerror or str(exc)
    path = choice.path
    if choice.system:
        missing = " (the socket file is missing)" if exc.errno == errno.ENOENT else ""
        return BrokerUnavailable(
            f"the system portlease broker is down: nothing answers at {path}{missing} ({reason}); "
            f"{CHECK_SYSTEM}. Clients never start a private broker where a system one is "
            "installed", paths=(path,),
        )
    if choice.source == "argument":
        how = (f"{start_advice('`portlease serve --socket PATH`', there=True)}, or pass the "
               "socket of a running broker")
    elif choice.source == "PORTLEASE_SOCKET":
        how = (f"it comes from $PORTLEASE_SOCKET: "
               f"{start_advice('`portlease serve --socket PATH`', there=True)}, or point "
               "PORTLEASE_SOCKET at a running one")
    elif not autostart_on and not autostart_enabled(None):
        setting = os.environ.get("PORTLEASE_AUTOSTART", "").strip()
        how = (f"autostart is off (PORTLEASE_AUTOSTART={setting}): {start_advice()}, or unset "
               "PORTLEASE_AUTOSTART to let clients start one")
    else:
        how = start_advice()
    return BrokerUnavailable(f"no portlease broker answers at {path} ({reason}); {how}",
                             paths=(path,))


BROKER_EXTRA: Final = ("trio", "sdnotify")
"""What ``portlease serve`` needs beyond the client: the ``broker`` extra."""


def broker_installed() -> bool:
    """Whether ``portlease serve`` can run here: the ``broker`` extra's modules are found.

    Looked up, not imported: importing trio costs more than everything else a
    failing client does.
    """
    from importlib.util import find_spec  # only on the way to an error message

    return all(find_spec(name) is not None for name in BROKER_EXTRA)


def start_advice(command: str = "`portlease serve`", *, there: bool = False) -> str:
    """"start one with COMMAND", preceded by installing the broker's extra where it is missing."""
    start = f"start one {'there ' if there else ''}with {command}"
    if broker_installed():
        return start
    return f"install the broker first, `pip install 'portlease[broker]'`, then {start}"


def autostart_failed(choice: SocketChoice, exc: OSError) -> BrokerUnavailable:
    """The :class:`BrokerUnavailable` to raise when starting the per-user broker failed."""
    return BrokerUnavailable(
        f"no portlease broker answers at {choice.path}, and starting one failed: "
        f"{exc.strerror or exc}; {start_advice()}",
        paths=(choice.path,),
    )


__all__ = [
    "BROKER_EXTRA", "CHECK_SYSTEM", "SOCKET_NAME", "SYSTEM_CONFIG", "SYSTEM_DIR", "SYSTEM_SOCKET",
    "Action", "Dialing", "SocketChoice", "Source", "autostart_failed", "broker_installed",
    "check_directory", "check_peer", "choose_socket", "directory_problem", "explicit_socket",
    "on_connect_error", "peer_uid", "start_advice", "system_config", "system_deployment",
    "system_dir", "system_socket", "unavailable", "unsafe_directory", "user_socket",
]

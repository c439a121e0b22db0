"""Socket activation: take over the listening socket systemd (or a stand-in) passed us.

This is the ``sd_listen_fds(3)`` protocol, written out because it is small and
a libsystemd binding would be a heavier dependency than the protocol itself:
the manager puts the sockets at fd 3, 4, … and sets ``LISTEN_PID`` to the pid
it exec'd, ``LISTEN_FDS`` to their count and, optionally, ``LISTEN_FDNAMES`` to
their colon-separated names (``FileDescriptorName=`` / ``--fdname``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Final

from portlease.client.protocol.errors import StartupError

LISTEN_FDS_START: Final = 3
"""The first inherited fd; fixed by the protocol."""

_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


PORTSERVER_NAME: Final = "portserver"
"""The ``FileDescriptorName=`` of the socket on which portpicker's protocol is
answered (systemd/portlease-portserver.socket); every name but this one and the
claims' is the main socket."""

CLAIMS_NAME_PREFIX: Final = "claims-"
"""The names under which the broker keeps its claim sockets in systemd's file
descriptor store (``claims-START-COUNT``, one name per lease); systemd passes
them back with the listening sockets when it restarts the broker."""


def is_claims_name(name: str) -> bool:
    """Whether an inherited fd's name is one the broker stored its claims under."""
    return name.startswith(CLAIMS_NAME_PREFIX)


@dataclass(slots=True)
class Inherited:
    """The sockets passed by socket activation and by systemd's file descriptor store."""

    main: socket.socket | None
    """None when only stored claims were passed (a service started without its socket unit)."""
    portserver: socket.socket | None = None
    """The fd named :data:`PORTSERVER_NAME`, when ``LISTEN_FDNAMES`` names one."""
    claims: dict[str, list[socket.socket]] = field(default_factory=dict)
    """The claim sockets the broker stored before it was restarted, by their stored name."""


def inherited_listener(
    environ: MutableMapping[str, str] | None = None, *, name: str | None = None
) -> socket.socket | None:
    """The listening Unix stream socket passed by socket activation, or None when not activated.

    Activated means ``LISTEN_PID`` is this process and ``LISTEN_FDS`` ≥ 1.
    The socket is the first fd not named :data:`PORTSERVER_NAME` (fd 3 when
    ``LISTEN_FDNAMES`` is unset), unless ``name`` is given and
    ``LISTEN_FDNAMES`` is set: then it is the fd whose name equals ``name``.
    Every inherited fd gets close-on-exec, and the ``LISTEN_*`` variables are
    removed from ``environ`` (default ``os.environ``) whenever they were
    present, so no child mistakes them for its own.

    Raises :class:`StartupError` when the variables are malformed, ``name`` is
    not among the names, or the chosen fd is not a listening ``AF_UNIX``
    ``SOCK_STREAM`` socket. The caller owns the returned socket.
    """
    taken = _take(environ)
    if taken is None:
        return None
    fds, names = taken
    return _verified(_choose(fds, names, name))


def inherited_listeners(environ: MutableMapping[str, str] | None = None) -> Inherited | None:
    """The main socket, the portpicker socket and the stored claims that were passed.

    The same rules as :func:`inherited_listener`; None when nothing was passed.
    With no ``LISTEN_FDNAMES`` there is no portserver socket and no claim, and
    the main one is fd 3. The fds whose names start with
    :data:`CLAIMS_NAME_PREFIX` are taken as they are: the broker's
    :class:`~portlease.broker.claims.Claims` keeps those that are its claims.
    """
    taken = _take(environ)
    if taken is None:
        return None
    fds, names = taken
    claims: dict[str, list[socket.socket]] = {}
    if names is not None:
        for fd, name in zip(fds, names, strict=True):
            if is_claims_name(name):
                try:
                    claims.setdefault(name, []).append(socket.socket(fileno=fd))
                except OSError:
                    os.close(fd)  # not a socket: not a claim of ours, yet passed to us
        if all(is_claims_name(name) for name in names):
            return Inherited(None, claims=claims)
    try:
        main = _verified(_choose(fds, names, None))
        if names is None or PORTSERVER_NAME not in names:
            return Inherited(main, claims=claims)
        try:
            portserver = _verified(fds[names.index(PORTSERVER_NAME)])
        except StartupError:
            main.close()
            raise
    except StartupError:
        for socks in claims.values():
            for sock in socks:
                sock.close()
        raise
    return Inherited(main, portserver, claims)


def _take(environ: MutableMapping[str, str] | None) -> tuple[range, list[str] | None] | None:
    """The inherited fds and their names (checked to match), or None when not activated."""
    env = os.environ if environ is None else environ
    pid_text = env.get("LISTEN_PID")
    fds_text = env.get("LISTEN_FDS")
    names_text = env.get("LISTEN_FDNAMES")
    # Unset first, whatever follows: like sd_listen_fds(unset_environment=1), a
    # malformed or foreign set of variables must not leak into children either.
    for var in _VARIABLES:
        env.pop(var, None)

    if pid_text is None or fds_text is None:
        return None
    try:
        pid = int(pid_text)
        count = int(fds_text)
    except ValueError:
        raise StartupError(
            f"socket activation: LISTEN_PID={pid_text!r} LISTEN_FDS={fds_text!r} are not numbers"
        ) from None
    if pid != os.getpid():
        # Meant for another process (we were exec'd by the activated one): not ours.
        return None
    if count < 1:
        return None

    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + count)
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise StartupError(
                f"socket activation: LISTEN_FDS={count} but fd {fd} is not open ({exc.strerror})"
            ) from None
    if names_text is None:
        return fds, None
    names = names_text.split(":")
    if len(names) != len(fds):
        raise StartupError(
            f"socket activation: LISTEN_FDNAMES has {len(names)} names for {len(fds)} fds"
        )
    return fds, names


def _choose(fds: range, names: list[str] | None, name: str | None) -> int:
    if names is None:
        return fds[0]
    if name is None:
        # The main socket keeps working whatever its unit names it; only the
        # portpicker socket and the stored claims have names the broker must know.
        for fd, fd_name in zip(fds, names, strict=True):
            if fd_name != PORTSERVER_NAME and not is_claims_name(fd_name):
                return fd
        raise StartupError(
            "socket activation: only a portserver socket was passed; the main socket "
            "(portlease.socket) must be passed to the broker too"
        )
    try:
        return fds[names.index(name)]
    except ValueError:
        raise StartupError(
            f"socket activation: no inherited socket is named {name!r} "
            f"(LISTEN_FDNAMES={':'.join(names)!r}); set FileDescriptorName={name} in the .socket unit"
        ) from None


def _verified(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise StartupError(
            f"socket activation: inherited fd {fd} is not a socket ({exc.strerror})"
        ) from None
    try:
        problem = _problem(sock)
    except OSError as exc:
        problem = f"cannot be inspected ({exc.strerror})"
    if problem is not None:
        # Leave the fd as it was: it is not ours to close, and detaching spares a
        # ResourceWarning from the socket object we wrapped around it.
        sock.detach()
        raise StartupError(
            f"socket activation: inherited fd {fd} {problem}; portlease needs a listening "
            "Unix stream socket (ListenStream=/path in the .socket unit, Accept=no)"
        )
    return sock


def _problem(sock: socket.socket) -> str | None:
    if sock.family != socket.AF_UNIX:
        return f"is a {sock.family.name} socket, not AF_UNIX"
    if sock.type != socket.SOCK_STREAM:
        return f"is a {sock.type.name} socket, not SOCK_STREAM"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "is not listening (Accept=yes passes connections, not the listener)"
    return None


def socket_path(sock: socket.socket) -> str:
    """A printable address of a Unix socket for logs: its path, ``@name`` if abstract."""
    try:
        address = sock.getsockname()
    except OSError as exc:
        return f"<unknown: {exc.strerror}>"
    if isinstance(address, bytes):
        # Linux returns abstract names as bytes starting with NUL.
        text = address.decode("utf-8", "backslashreplace")
        return "@" + text[1:] if text.startswith("\0") else text
    if isinstance(address, str):
        if address.startswith("\0"):
            return "@" + address[1:]
        return address or "<unnamed>"
    return str(address)


__all__ = [
    "CLAIMS_NAME_PREFIX", "LISTEN_FDS_START", "PORTSERVER_NAME", "Inherited", "inherited_listener",
    "inherited_listeners", "is_claims_name", "socket_path",
]

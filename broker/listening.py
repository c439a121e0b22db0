"""The socket the broker listens on: inherited from systemd, or bound here.

Binding is careful because the path may sit in a directory shared with other
brokers or other users: a lock file next to the socket serialises brokers
racing to start (two autostarting clients), a stale socket is replaced only
when nothing answers on it, and the directory is checked (see
:mod:`.safedir`) before anything is created in it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import stat
from dataclasses import dataclass

from portlease.client.host.probe import answers
from portlease.client.protocol.errors import AlreadyServing, ConfigError, StartupError

from . import activation
from .config import Config
from .safedir import check_directory, open_failure, open_file

log = logging.getLogger("portlease.broker")


@dataclass(slots=True)
class Listening:
    """The listening socket and what to clean up when the broker stops."""

    sock: socket.socket
    path: str
    owned: bool
    """True when this broker created the socket file (and removes it on exit)."""
    lock_fd: int = -1

    def close(self) -> None:
        """Close the socket; remove the file and drop the lock if this broker made them."""
        if self.owned:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        if self.lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = -1
        self.sock.close()


def _group_id(group: str | None) -> int:
    if group is None:
        return -1
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"group {group!r} does not exist") from None


def bind_unix_socket(path: str, mode: int, group: str | None) -> Listening:
    """Create the listening socket at ``path``, safely replacing a stale one."""
    gid = _group_id(group)
    directory = os.path.dirname(os.path.abspath(path))
    fresh = not os.path.lexists(directory)
    check_directory(directory, create_mode=0o750 if group else 0o700)
    if fresh and gid >= 0:
        os.chown(directory, -1, gid, follow_symlinks=False)
    try:
        lock_fd = open_file(path + ".lock", os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise StartupError(f"cannot create {path}.lock: {open_failure(exc)}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise AlreadyServing(f"another portlease broker is serving on {path}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            os.close(lock_fd)
            raise StartupError(f"{path} exists and is not a socket; not replacing it")
        if answers(path):
            os.close(lock_fd)
            raise AlreadyServing(f"another portlease broker is serving on {path}")
        log.info("removing stale socket %s (nothing answers on it)", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # bind() creates the file with the umask applied: the socket is never wider
    # than asked, and no chmod (which would follow a symlink) is needed.
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        os.close(lock_fd)
        raise StartupError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    if gid >= 0:
        os.chown(path, -1, gid, follow_symlinks=False)
    sock.listen(socket.SOMAXCONN)
    return Listening(sock=sock, path=path, owned=True, lock_fd=lock_fd)


def open_listener(config: Config) -> Listening:
    """The socket to serve: inherited from systemd when activated, else bound here."""
    inherited = activation.inherited_listener()
    if inherited is not None:
        path = activation.socket_path(inherited)
        log.info("socket activation: serving the inherited socket %s", path)
        return Listening(sock=inherited, path=path, owned=False)
    if not config.socket:
        raise ConfigError("no socket path configured")
    return bind_unix_socket(config.socket, int(config.socket_mode, 8), config.group)


__all__ = ["Listening", "bind_unix_socket", "open_listener"]

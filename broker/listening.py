"""The socket the broker listens on: inherited from systemd, or bound here.

Binding is careful because the path may sit in a directory shared with other
brokers or other users: a lock file next to the socket serialises brokers
racing to start (two autostarting clients), a stale socket is replaced only
when nothing answers on it, and the directory is checked (see
:mod:`.safedir`) before anything is created in it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
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


def _already_serving(path: str, lock_fd: int) -> AlreadyServing:
    """The error for a socket another broker serves, naming that broker's pid and what to run."""
    pid = _peer_pid(path) or _flock_holder(lock_fd)
    who = ""
    if pid is not None:
        try:
            with open(f"/proc/{pid}/comm") as f:
                who = f" (pid {pid}, {f.read().strip()})"
        except OSError:
            who = f" (pid {pid})"
    return AlreadyServing(
        f"another portlease broker is serving on {path}{who}; see what it holds with "
        f"`portlease status --socket {path}`, and stop it before serving there"
    )


def _peer_pid(path: str) -> int | None:
    # The process that listens there (SO_PEERCRED of a probe connection; under
    # socket activation that is systemd, which holds the socket).
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
            probe.settimeout(1.0)
            probe.connect(path)
            raw = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", raw)[0]
    return pid if pid > 0 else None


def _flock_holder(lock_fd: int) -> int | None:
    # A broker still starting holds the lock before its socket answers: /proc/locks
    # names the pid holding a flock on the lock file's inode.
    st = os.fstat(lock_fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


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
        holder = _already_serving(path, lock_fd)
        os.close(lock_fd)
        raise holder from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            os.close(lock_fd)
            raise StartupError(f"{path} exists and is not a socket; not replacing it")
        if answers(path):
            holder = _already_serving(path, lock_fd)
            os.close(lock_fd)
            raise holder
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
    return open_listeners(config)[0]


def open_listeners(
    config: Config,
) -> tuple[Listening, Listening | None, dict[str, list[socket.socket]]]:
    """The main socket, the portpicker socket (None when there is none), and the stored claims.

    Under socket activation both sockets come from systemd (the portpicker one
    is the fd named ``portserver``); a ``portserver`` address in the config is
    bound here only when systemd passed no such socket. The claims are those a
    previous broker kept in systemd's file descriptor store, by stored name.
    """
    inherited = activation.inherited_listeners()
    portserver: Listening | None = None
    claims = {} if inherited is None else inherited.claims
    if inherited is not None and inherited.main is not None:
        path = activation.socket_path(inherited.main)
        log.info("socket activation: serving the inherited socket %s", path)
        main = Listening(sock=inherited.main, path=path, owned=False)
        if inherited.portserver is not None:
            where = activation.socket_path(inherited.portserver)
            log.info("socket activation: answering portpicker on the inherited socket %s", where)
            portserver = Listening(sock=inherited.portserver, path=where, owned=False)
    else:
        if not config.socket:
            raise ConfigError("no socket path configured")
        main = bind_unix_socket(config.socket, int(config.socket_mode, 8), config.group)
    if portserver is None and config.portserver:
        try:
            portserver = bind_portserver(config.portserver, int(config.socket_mode, 8), config.group)
        except BaseException:
            main.close()
            raise
    return main, portserver, claims


def bind_portserver(address: str, mode: int, group: str | None) -> Listening:
    """Listen for portpicker on ``address``: a path (as the main socket), or ``@name`` (abstract).

    An abstract name has no file and no permission bits: anyone in the network
    namespace may connect, and the broker's per-uid limits are the only gate.
    """
    if not address.startswith("@"):
        return bind_unix_socket(address, mode, group)
    if len(address) < 2:
        raise ConfigError("portserver address '@' names nothing; use @NAME or a path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("\0" + address[1:])
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AlreadyServing(f"something already listens on the abstract socket {address}") from None
        raise StartupError(f"cannot bind the abstract socket {address}: {exc.strerror}") from None
    sock.listen(socket.SOMAXCONN)
    return Listening(sock=sock, path=address, owned=False)


__all__ = ["Listening", "bind_portserver", "bind_unix_socket", "open_listener", "open_listeners"]

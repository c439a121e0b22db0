"""A stand-in for systemd's side of ``FileDescriptorStoreMax=``, for tests and bench/claims.py.

It does what systemd does for a ``Type=notify`` service with a file descriptor
store, over the same real interfaces: it reads the service's ``sd_notify``
datagrams (``FDSTORE=1`` with fds passed by ``SCM_RIGHTS``, ``FDSTOREREMOVE=1``)
on a real socket, keeps the fds by ``FDNAME``, and starts the next broker with
the listening socket and the stored fds, named in ``LISTEN_FDNAMES``.
tests/system checks the same behaviour against a real systemd.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO

FDS_PER_MESSAGE = 253


class StandInManager:
    def __init__(self, directory: Path, capacity: int = 64) -> None:
        self.path = str(directory / "notify.sock")
        self.capacity = capacity
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.store: dict[str, list[int]] = {}
        self.messages: list[str] = []

    def pump(self) -> None:
        """Handle every datagram sent so far."""
        space = socket.CMSG_SPACE(FDS_PER_MESSAGE * array.array("i").itemsize)
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(65536, space)
            except BlockingIOError:
                return
            fds = array.array("i")
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                os.set_inheritable(fd, False)  # only start() hands them on, at their places
            text = data.decode()
            self.messages.append(text)
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTORE") == "1" and fields.get("FDPOLL") == "0":
                if sum(map(len, self.store.values())) + len(fds) > self.capacity:
                    for fd in fds:
                        os.close(fd)
                else:
                    self.store.setdefault(name, []).extend(fds)
            else:
                for fd in fds:
                    os.close(fd)  # an unconnected stream socket polls as hung up: dropped
            if fields.get("FDSTOREREMOVE") == "1":
                for fd in self.store.pop(name, []):
                    os.close(fd)

    def start(
        self, listener: socket.socket, command: Sequence[str], log: IO[bytes],
        *, stored_first: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` as systemd would: the listener at fd 3, then the stored fds
        (``stored_first``: the other way round, which the broker must cope with too)."""
        self.pump()
        fds: list[int] = []
        names: list[str] = []
        for name, stored in self.store.items():
            fds.extend(stored)
            names.extend([name] * len(stored))
        if stored_first:
            fds.append(listener.fileno())
            names.append("portlease.socket")
        else:
            fds.insert(0, listener.fileno())
            names.insert(0, "portlease.socket")

        def place() -> None:
            # Move every fd out of the way first, then into 3, 4, ...: a plain
            # dup2 in order could overwrite an fd not placed yet.
            high = [os.dup(fd) for fd in fds]
            for target, fd in enumerate(high, start=3):
                os.dup2(fd, target)
                os.close(fd)

        env = dict(os.environ, NOTIFY_SOCKET=self.path, FDSTORE=str(self.capacity),
                   LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
        return subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *command],
            env=env, preexec_fn=place, close_fds=False,
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )

    def close(self) -> None:
        for stored in self.store.values():
            for fd in stored:
                os.close(fd)
        self.store.clear()
        self.sock.close()


def main() -> None:
    """Run a manager in a process of its own, as PID 1 is: ``fdstore.py DIRECTORY``.

    Prints its socket path when ready; reads until stdin closes, then prints
    how many fds are left in its store.
    """
    import select
    import sys

    manager = StandInManager(Path(sys.argv[1]), capacity=1 << 20)
    print(manager.path, flush=True)
    while True:
        readable = select.select([manager.sock, sys.stdin], [], [])[0]
        if manager.sock in readable:
            manager.pump()
        if sys.stdin in readable and not sys.stdin.read(1):
            break
    manager.pump()
    print(sum(map(len, manager.store.values())), flush=True)
    manager.close()


if __name__ == "__main__":
    main()

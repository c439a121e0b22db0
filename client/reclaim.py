"""The sync client's one reclaim thread per process.

A lease lives as long as its connection. When the broker itself goes away
(restart, upgrade, crash) the leases must be reclaimed within their TTL even if
the program makes no call meanwhile (a test holding a port for minutes), so
reclaim cannot only ride on the next call. Instead **one watcher thread per
process** waits, in one ``epoll`` set, for a hang-up on every open connection
that holds leases. It is started once, by the first connection that holds an
attached lease, and never joined: later connections only add their socket to
the set (one ``epoll_ctl``) and take it out again, so a one-shot
``with lease(1)`` neither starts nor joins a thread, and a program with a
hundred connections still has one thread. Requests never wake the watcher: it
asks for ``EPOLLRDHUP`` only.

What a connection does when its socket hangs up, or when its next attempt is
due, is the connection's own business (:class:`Watched`); the watcher only
tells it, from its thread. In a forked child the watcher starts from nothing
(:func:`os.register_at_fork`): the parent's thread did not survive the fork.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket as _socket
import sys
import threading
import time
import traceback
import weakref
from typing import Protocol

__all__ = ["Watched", "Watcher", "watcher"]

_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class Watched(Protocol):
    """What the watcher calls on a connection, from its thread."""

    def _hangup(self, sock: _socket.socket) -> None:
        """``sock``, watched for this connection, hung up."""

    def _recover_step(self, now: float) -> float | None:
        """The scheduled attempt is due: make it without sleeping; when to try again, or None."""


class Watcher:
    """The process's one reclaim thread: an epoll set of every watched connection's socket.

    Its lock guards the maps only, never I/O, so ``watch``/``forget``/
    ``discard`` return at once from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake, select.EPOLLIN)
        self._by_fd: dict[int, tuple[weakref.ref[Watched], _socket.socket]] = {}
        self._due: weakref.WeakKeyDictionary[Watched, float] = weakref.WeakKeyDictionary()
        self._thread: threading.Thread | None = None

    def watch(self, conn: Watched, sock: _socket.socket) -> None:
        fd = sock.fileno()
        if fd < 0:
            return
        with self._lock:
            known = self._by_fd.get(fd)
            if known is not None and known[1] is sock:
                return
            if known is not None:
                with contextlib.suppress(OSError):
                    self._ep.unregister(fd)
            try:
                self._ep.register(fd, select.EPOLLRDHUP)
            except OSError:
                return
            self._by_fd[fd] = (weakref.ref(conn), sock)
            self._start_locked()

    def forget(self, sock: _socket.socket) -> None:
        """Stop watching ``sock`` (before it is closed: its fd number may be reused)."""
        fd = sock.fileno()
        if fd < 0 or not self._acquire():
            return
        try:
            known = self._by_fd.get(fd)
            if known is not None and known[1] is sock:
                del self._by_fd[fd]
                with contextlib.suppress(OSError, ValueError):
                    self._ep.unregister(fd)
        finally:
            self._lock.release()

    def schedule(self, conn: Watched, at: float) -> None:
        with self._lock:
            self._due[conn] = at
            self._start_locked()
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)

    def discard(self, conn: Watched) -> None:
        if not self._acquire():
            return  # the thread skips closed connections by itself
        try:
            self._due.pop(conn, None)
            for fd, (ref, _sock) in list(self._by_fd.items()):
                if ref() is conn:
                    del self._by_fd[fd]
                    with contextlib.suppress(OSError, ValueError):
                        self._ep.unregister(fd)
        finally:
            self._lock.release()

    def _start_locked(self) -> None:
        # Once per process (per forked child): never joined, it dies with the process.
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="portlease-reclaim",
                                            daemon=True)
            self._thread.start()

    def _acquire(self) -> bool:
        # Bounded: at interpreter exit a frozen daemon thread may hold the lock
        # forever; then the bookkeeping is simply skipped.
        return self._lock.acquire(timeout=0.5)

    def _run(self) -> None:
        while True:
            try:
                self._step()
            except Exception:
                # A bug here must not end reclaim for every connection.
                print("portlease: the reclaim thread hit a bug:", file=sys.stderr)
                traceback.print_exc()
                time.sleep(0.1)

    def _step(self) -> None:
        with self._lock:
            due = list(self._due.values())
        timeout = max(0.0, min(due) - time.monotonic()) if due else -1
        events = self._ep.poll(timeout)
        for fd, mask in events:
            if fd == self._wake:
                with contextlib.suppress(OSError):
                    os.eventfd_read(self._wake)
                continue
            with self._lock:
                known = self._by_fd.pop(fd, None)
                with contextlib.suppress(OSError, ValueError):
                    self._ep.unregister(fd)
            if known is None or not mask & _HANGUP:
                continue
            conn = known[0]()
            if conn is not None:
                conn._hangup(known[1])
        now = time.monotonic()
        with self._lock:
            ready = [conn for conn, at in self._due.items() if at <= now]
            for conn in ready:
                del self._due[conn]
        for conn in ready:
            try:
                again = conn._recover_step(now)
            except Exception:
                print("portlease: reclaim failed:", file=sys.stderr)
                traceback.print_exc()
                again = None
            if again is not None:
                self.schedule(conn, again)

    def close(self) -> None:
        """Drop the inherited epoll set in a forked child (no thread runs there)."""
        with contextlib.suppress(OSError):
            self._ep.close()
        with contextlib.suppress(OSError):
            os.close(self._wake)


_the_watcher: Watcher | None = None
_the_watcher_lock = threading.Lock()


def watcher() -> Watcher:
    """The process's watcher (its thread starts with the first watched socket)."""
    global _the_watcher
    w = _the_watcher
    if w is None:
        with _the_watcher_lock:
            if _the_watcher is None:
                _the_watcher = Watcher()
            w = _the_watcher
    return w


def _after_fork_in_child() -> None:
    # The watcher thread did not survive the fork, and its locks may be held by
    # threads that no longer exist: the child starts from nothing.
    global _the_watcher, _the_watcher_lock
    old, _the_watcher = _the_watcher, None
    _the_watcher_lock = threading.Lock()
    if old is not None:
        old.close()


os.register_at_fork(after_in_child=_after_fork_in_child)

"""Google portpicker's port-server protocol, without the I/O.

A portpicker client connects, sends the pid the port is for as decimal text and
a newline, and reads one port and a newline; an empty reply means "refused"
(portpicker then prints "Portserver failed to find a port." and picks a port
of its own). Nothing else is ever said on the connection.

This module decides what a request says and what the reply is; the trio shell
(:mod:`.portserver_shell`) reads the socket, checks the pid against the
kernel, and grants the lease through the broker's core like any other.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

MAX_REQUEST: Final = 32
"""Bytes a request may take before its newline. A pid has at most 7 digits
(PID_MAX_LIMIT is 4194304); the rest allows for spaces and a carriage return."""
PID_MAX: Final = 4_194_304
"""The kernel's PID_MAX_LIMIT on 64-bit Linux: no pid is above it."""
MAX_ANCESTRY: Final = 4096
"""Parents followed before giving up on a chain (a real one is a few dozen deep)."""

_DIGITS: Final = re.compile(rb"[0-9]{1,10}")


@dataclass(frozen=True, slots=True)
class Refused:
    """The request is refused (an empty reply); ``why`` goes to the log."""

    why: str


NEED_MORE: Final = None
"""What :func:`parse_request` returns while the line is not complete."""


def parse_request(data: bytes, *, eof: bool = False) -> int | Refused | None:
    """The pid a request asks for, a refusal, or ``None`` while more bytes may come.

    ``data`` is everything received so far; ``eof`` says the client will send
    no more (a request without its newline is then read as it stands). Only
    ASCII digits count, optionally surrounded by blanks: no sign, no
    underscores, no other digits ``int()`` would take. Pids 0 and 1 are
    refused (0 is no process, 1 never exits: its ports would never return).
    """
    end = data.find(b"\n", 0, MAX_REQUEST + 1)
    if end < 0:
        if len(data) > MAX_REQUEST:
            return Refused(f"no newline within {MAX_REQUEST} bytes")
        if not eof:
            return NEED_MORE
        if not data:
            return Refused("the client sent nothing")
        end = len(data)
    text = data[:end].strip(b" \t\r")
    if not _DIGITS.fullmatch(text):
        return Refused(f"not a pid: {_show(data[:end])}")
    pid = int(text)
    if pid <= 1:
        return Refused(f"pid {pid} is not a process whose exit would free a port")
    if pid > PID_MAX:
        return Refused(f"pid {pid} is above the kernel's pid limit")
    return pid


def format_reply(port: int | None) -> bytes:
    """The reply line: the port and a newline, or nothing at all for a refusal."""
    if port is None:
        return b""
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return b"%d\n" % port


def is_ancestor(pid: int, of: int, parent_of: Callable[[int], int | None]) -> bool:
    """Whether ``pid`` is ``of`` itself or one of its ancestors.

    ``parent_of`` gives a process's parent pid (None when it is gone or
    unreadable; 0 above the namespace's init). The walk stops at pid 1 or 0,
    on a gap, on a loop, and after :data:`MAX_ANCESTRY` steps; any of those
    means "no".
    """
    seen: set[int] = set()
    current: int | None = of
    while current is not None and current > 0 and len(seen) < MAX_ANCESTRY:
        if current in seen or current == 1:
            return False
        if current == pid:
            return True
        seen.add(current)
        current = parent_of(current)
    return False


def _show(raw: bytes) -> str:
    """A client's bytes for the log: short, and never a control character."""
    return repr(raw[:MAX_REQUEST])


__all__ = [
    "MAX_ANCESTRY", "MAX_REQUEST", "NEED_MORE", "PID_MAX", "Refused", "format_reply", "is_ancestor",
    "parse_request",
]

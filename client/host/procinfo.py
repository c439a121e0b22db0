"""What /proc says about a process: its command line, its start time, its user.

The start time together with the boot id names one process for good where a pid
alone is reused. Standard library only: the broker, the CLI and the clients read
these facts the same way.
"""

from __future__ import annotations

import functools
import os
import pwd


@functools.cache
def boot_id() -> str:
    """This boot's id; a monotonic time or a start time means nothing under another."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (field 3 first), None for a
    process that is gone, unreadable or a zombie (which holds no sockets)."""
    # os.open/os.read, not open(): this runs on the path of a connection's first
    # grant, and the buffered file object costs more than the three system calls.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = raw[raw.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return fields


def process_started(pid: int | None) -> str | None:
    """``"<boot id>:<start time>"`` of a live process, None if it is gone or unreadable.

    The start time is field 22 of /proc/PID/stat (clock ticks after boot).
    """
    fields = _stat_fields(pid) if pid else None
    if fields is None or len(fields) < 20:
        return None
    return f"{boot_id()}:{fields[19].decode()}"


def parent_pid(pid: int) -> int | None:
    """The parent's pid of a live process (field 4 of /proc/PID/stat), None if gone or unreadable."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 2:
        return None
    try:
        return int(fields[1])
    except ValueError:
        return None


def read_cmdline(pid: int | None, limit: int = 4096) -> str | None:
    """The process's command line, arguments joined by spaces, at most ``limit`` bytes read."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(limit)
    except OSError:
        return None
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    return text or None


@functools.lru_cache(maxsize=1024)
def user_name(uid: int) -> str | None:
    """The account name of ``uid``, None when it has none (a DynamicUser, a container)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


__all__ = ["boot_id", "parent_pid", "process_started", "read_cmdline", "user_name"]

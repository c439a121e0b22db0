"""Directories the broker may create files in, and how it opens them there.

A broker's socket, journal, lock files and temporary files live in one
directory. If another local user controls that directory (owns it, may write
to it, or swapped it for a symlink), they can plant a symlink at a name the
broker is about to open and make it truncate or chmod a file of the broker's
user. So before creating anything the broker checks the directory, and it opens
every file with ``O_NOFOLLOW`` (and temporaries with ``O_EXCL``).
"""

from __future__ import annotations

import errno
import os
import stat

from portlease.client.protocol.errors import StartupError

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def check_directory(directory: str, *, create_mode: int | None = None) -> None:
    """Raise :class:`StartupError` unless ``directory`` is safe to create files in.

    Safe: a real directory (not a symlink), owned by this process's user or by
    root, that neither group nor others may write to. With ``create_mode`` a
    missing directory is created with that mode (its parents must exist).
    """
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        if create_mode is None:
            raise StartupError(f"directory {directory} does not exist") from None
        try:
            os.mkdir(directory, create_mode)
        except FileExistsError:
            pass  # someone raced us: check what is there now
        except OSError as exc:
            raise StartupError(f"cannot create directory {directory}: {exc.strerror}") from None
        st = os.lstat(directory)
    problem = directory_problem(st)
    if problem:
        raise StartupError(f"refusing to use {directory}: {problem}")


def directory_problem(st: os.stat_result) -> str | None:
    """What makes a directory with this ``lstat`` unsafe, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid not in (os.geteuid(), 0):
        return f"it is owned by uid {st.st_uid}, not by uid {os.geteuid()} or root"
    if st.st_mode & 0o022:
        return f"group or others may write to it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never follows a symlink at ``path``."""
    return os.open(path, flags | NOFOLLOW, mode)


def open_failure(exc: OSError) -> str:
    """Why :func:`open_file` failed, in words: ELOOP there means a symlink was planted."""
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link"
    return str(exc.strerror)


__all__ = ["check_directory", "directory_problem", "open_failure", "open_file"]

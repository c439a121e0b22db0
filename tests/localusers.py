"""Throw-away local users and a group, for tests that need real second uids (root only)."""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def temporary_users(prefix: str, members: dict[str, bool]) -> Iterator[tuple[str, dict[str, str]]]:
    """Create the group ``<prefix><pid>`` and one user per key of ``members``.

    A user whose value is true is in the group. Yields ``(group, {key: user name})``;
    everything is removed afterwards. Skips the test where it cannot be done.
    """
    if os.geteuid() != 0:
        pytest.skip("creating users needs root")
    for tool in ("groupadd", "useradd", "userdel", "groupdel"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (Debian package passwd)")
    primary = next((g for g in ("nogroup", "nobody") if _group_exists(g)), None)
    if primary is None:
        pytest.skip("no nogroup/nobody group to give the test users")
    group = f"{prefix}{os.getpid() % 100000}"
    names = {key: f"{group}{key}" for key in members}
    made: list[str] = []
    try:
        _run("groupadd", group)
        for key, member in members.items():
            _run("useradd", "--no-create-home", "--no-user-group", "--gid", primary,
                 "--shell", "/usr/sbin/nologin", *(["--groups", group] if member else []), names[key])
            made.append(names[key])
        yield group, names
    finally:
        for user in made:
            subprocess.run(["userdel", user], capture_output=True, timeout=30)
        subprocess.run(["groupdel", group], capture_output=True, timeout=30)


@contextlib.contextmanager
def shared_directory(prefix: str) -> Iterator[Path]:
    """A root-owned 0755 directory in /tmp: every user may reach a socket in it, none may
    write there, so only the socket's own mode decides who connects."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)

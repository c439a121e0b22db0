"""broker/logs.py: sd-daemon priority prefixes only when stderr is the journal stream.

Each case runs a real child process whose stderr is a real pipe or file, with
``JOURNAL_STREAM`` naming (or not naming) that very file, as systemd does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from portlease.broker import logs
from portlease.client.protocol.errors import ConfigError

CHILD = textwrap.dedent("""
    import logging, sys
    from portlease.broker import logs
    logs.setup(sys.argv[1])
    logs.setup(sys.argv[1])  # twice: must not print every line twice
    log = logging.getLogger("portlease.broker")
    log.debug("dbg %d", 1)
    log.info("info line")
    log.warning("careful")
    log.error("broken")
    log.critical("dead")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("with traceback")
    if len(sys.argv) > 2:
        logs.set_level(sys.argv[2])
        log.debug("after set_level")
        log.info("info after set_level")
""")


def run_child(level: str, *, journal: str | None, stderr_file: Path | None = None,
              new_level: str | None = None) -> list[str]:
    """Run CHILD with stderr on a pipe (or ``stderr_file``); ``journal`` is
    ``"match"`` (JOURNAL_STREAM names that stderr), ``"other"`` or None."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    argv = [sys.executable, "-c", CHILD, level, *([new_level] if new_level else [])]
    if stderr_file is not None:
        with open(stderr_file, "wb") as err:
            st = os.fstat(err.fileno())
            if journal == "match":
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            elif journal == "other":
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
            subprocess.run(argv, env=env, stderr=err, check=True, timeout=60)
        return stderr_file.read_text().splitlines()
    read_end, write_end = os.pipe()
    try:
        st = os.fstat(write_end)
        if journal == "match":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal == "other":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
        proc = subprocess.Popen(argv, env=env, stderr=write_end)
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as reader:
            read_end = -1
            out = reader.read().decode()
        assert proc.wait(timeout=60) == 0, out
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    return out.splitlines()


def test_journal_stream_gets_priority_prefixes() -> None:
    lines = run_child("debug", journal="match")
    assert lines[:5] == [
        "<7>portlease.broker: dbg 1",
        "<6>portlease.broker: info line",
        "<4>portlease.broker: careful",
        "<3>portlease.broker: broken",
        "<3>portlease.broker: dead",
    ]
    # The traceback: every physical line carries the error priority, or
    # journald would file the continuation lines at info.
    rest = lines[5:]
    assert rest[0] == "<3>portlease.broker: with traceback"
    assert rest[-1] == "<3>RuntimeError: boom"
    assert all(line.startswith("<3>") for line in rest)
    assert len(rest) > 2


def test_plain_without_journal_stream(tmp_path: Path) -> None:
    lines = run_child("info", journal=None, stderr_file=tmp_path / "err")
    assert lines[:4] == [
        "INFO portlease.broker: info line",
        "WARNING portlease.broker: careful",
        "ERROR portlease.broker: broken",
        "CRITICAL portlease.broker: dead",
    ]
    assert not any(line.startswith("<") for line in lines)


@pytest.mark.parametrize("use_file", [False, True])
def test_plain_when_stderr_is_not_the_named_stream(tmp_path: Path, use_file: bool) -> None:
    """JOURNAL_STREAM inherited from a unit, stderr redirected elsewhere: no prefixes."""
    lines = run_child("warning", journal="other",
                      stderr_file=tmp_path / "err" if use_file else None)
    assert lines[:3] == [
        "WARNING portlease.broker: careful",
        "ERROR portlease.broker: broken",
        "CRITICAL portlease.broker: dead",
    ]


def test_matching_file_gets_prefixes(tmp_path: Path) -> None:
    lines = run_child("warning", journal="match", stderr_file=tmp_path / "err")
    assert lines[:3] == [
        "<4>portlease.broker: careful",
        "<3>portlease.broker: broken",
        "<3>portlease.broker: dead",
    ]


def test_set_level_changes_what_is_logged() -> None:
    lines = run_child("warning", journal="match", new_level="debug")
    assert "<6>portlease.broker: info line" not in lines
    assert "<7>portlease.broker: dbg 1" not in lines
    assert lines[-2:] == ["<7>portlease.broker: after set_level",
                          "<6>portlease.broker: info after set_level"]
    lines = run_child("debug", journal="match", new_level="error")
    assert "<7>portlease.broker: dbg 1" in lines
    assert not any("set_level" in line for line in lines)


def test_setup_twice_does_not_duplicate() -> None:
    lines = run_child("info", journal=None)
    assert lines.count("WARNING portlease.broker: careful") == 1


@pytest.mark.parametrize("bad", ["verbose", "", "warn"])
def test_bad_level_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="log_level"):
        logs.set_level(bad)
    with pytest.raises(ConfigError, match="log_level"):
        logs.setup(bad)


def test_malformed_journal_stream_is_not_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("", "12", "a:b", "1:2:3"):
        monkeypatch.setenv("JOURNAL_STREAM", value)
        assert logs.journal_stream() is False

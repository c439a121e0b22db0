"""The broker's log lines on stderr, with journald priorities under systemd.

journald stores every line of a service's stderr at priority 6 (info) unless
the line starts with an sd-daemon prefix such as ``<4>``; without the prefix
``journalctl -p warning`` shows none of the broker's warnings. systemd sets
``JOURNAL_STREAM`` (``DEVICE:INODE``) when it connects stderr to the journal;
the prefix is only written when stderr still is that stream, so a broker
started by hand from a unit's shell, or with stderr redirected to a file,
keeps the plain ``LEVEL name: message`` lines.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Final

from portlease.client.protocol.errors import ConfigError

__all__ = ["journal_stream", "set_level", "setup"]

PLAIN_FORMAT: Final = "%(levelname)s %(name)s: %(message)s"
# The journal shows the priority itself (colour, -p filters): the level word
# would only repeat it.
JOURNAL_FORMAT: Final = "%(name)s: %(message)s"

_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO,
                  "warning": logging.WARNING, "error": logging.ERROR}

_HANDLER_NAME: Final = "portlease-stderr"


def _level(level: str) -> int:
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ConfigError(f"log_level {level!r} is not one of {', '.join(_LEVELS)}") from None


def journal_stream() -> bool:
    """True when stderr is the journal stream systemd named in ``JOURNAL_STREAM``."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        # No usable stderr, or a malformed variable: not the journal.
        return False


def _syslog_priority(levelno: int) -> int:
    """sd-daemon(3) priority for a logging level: err 3, warning 4, info 6, debug 7."""
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """Prefixes every physical line with ``<N>``.

    journald splits the stream at newlines, so a traceback's continuation
    lines would otherwise land at priority 6 even for an error.
    """

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_syslog_priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.split("\n"))


def setup(level: str) -> None:
    """Send the root logger's records to stderr at ``level`` (debug, info, warning, error).

    Calling it again replaces the handler it installed before, so the format
    follows a changed stderr; handlers installed by others are left alone.
    Raises :class:`ConfigError` for an unknown level, before changing anything.
    """
    levelno = _level(level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    if journal_stream():
        handler.setFormatter(JournalFormatter(JOURNAL_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    root.addHandler(handler)
    root.setLevel(levelno)


def set_level(level: str) -> None:
    """Change the level at run time, e.g. on ``systemctl reload``; :class:`ConfigError` if unknown."""
    logging.getLogger().setLevel(_level(level))

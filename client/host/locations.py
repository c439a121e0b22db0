"""Which socket to use: the one rule for the broker, both clients and the CLI.

1. ``--socket`` / ``socket=`` (explicit);
2. ``$PORTLEASE_SOCKET``;
3. ``/run/portlease/portlease.sock`` where a system deployment exists
   (``/run/portlease`` or ``/etc/portlease/config.toml`` is present);
4. else the per-user socket, ``$XDG_RUNTIME_DIR/portlease/portlease.sock``, or
   ``/tmp/portlease-$UID/portlease.sock`` without ``XDG_RUNTIME_DIR``.

:data:`CLIENT_RULE` is that rule in the words ``--help`` prints; README.md,
docs/concepts.md, docs/rust.md and docs/diagrams/socket-choice.dot say step 3 in
the same words (tests/unit/test_paths.py checks it).

Only the per-user socket is ever started on demand (see
:mod:`portlease.client.autostart`); a system broker that is down is waited for
and then reported, never replaced by a private one, or two users of one host
would be handed the same ports.

``PORTLEASE_SYSTEM_DIR`` and ``PORTLEASE_SYSTEM_CONFIG`` move the system
paths; they are test hooks, not configuration.
"""

from __future__ import annotations

import os
from typing import Final, Literal, NamedTuple

SYSTEM_DIR: Final = "/run/portlease"
SYSTEM_SOCKET: Final = "/run/portlease/portlease.sock"
"""The socket systemd (``portlease.socket``) and the NixOS module provide."""
SYSTEM_CONFIG: Final = "/etc/portlease/config.toml"
SOCKET_NAME: Final = "portlease.sock"

CHECK_SYSTEM: Final = "run `systemctl status portlease.socket` to see why"

SYSTEM_RULE: Final = (f"where a system deployment exists ({SYSTEM_DIR} or {SYSTEM_CONFIG} "
                      "is present)")
"""When the system socket is chosen (step 3 of the rule), in the words every document uses."""
PER_USER_RULE: Final = (f"$XDG_RUNTIME_DIR/portlease/{SOCKET_NAME}, or "
                        f"/tmp/portlease-$UID/{SOCKET_NAME} without XDG_RUNTIME_DIR")
"""The per-user socket (step 4)."""
CLIENT_RULE: Final = (f"--socket, else $PORTLEASE_SOCKET, else {SYSTEM_SOCKET} {SYSTEM_RULE}, "
                      f"else the per-user socket {PER_USER_RULE}")
"""The whole rule, as ``portlease --help`` states it."""

Source = Literal["argument", "PORTLEASE_SOCKET", "system", "per-user"]


def system_dir() -> str:
    """The system socket's directory (``$PORTLEASE_SYSTEM_DIR`` in tests)."""
    return os.environ.get("PORTLEASE_SYSTEM_DIR") or SYSTEM_DIR


def system_socket() -> str:
    """The system socket's path."""
    return os.path.join(system_dir(), SOCKET_NAME)


def system_config() -> str:
    """The system config file (``$PORTLEASE_SYSTEM_CONFIG`` in tests)."""
    return os.environ.get("PORTLEASE_SYSTEM_CONFIG") or SYSTEM_CONFIG


def system_deployment() -> bool:
    """Whether this host has a system broker (its directory or its config file exists)."""
    return os.path.lexists(system_dir()) or os.path.lexists(system_config())


def user_socket() -> str:
    """The per-user socket: under ``$XDG_RUNTIME_DIR``, else ``/tmp/portlease-$UID/``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "portlease", SOCKET_NAME)
    return os.path.join("/tmp", f"portlease-{os.getuid()}", SOCKET_NAME)


class SocketChoice(NamedTuple):
    """A socket path and why it was chosen.

    A NamedTuple, not a dataclass: the ``portlease`` command imports this module
    on every start, and dataclasses brings inspect, ast, dis and tokenize along.
    """

    path: str
    source: Source

    @property
    def explicit(self) -> bool:
        """Configured by the caller: never autostarted, never second-guessed."""
        return self.source in ("argument", "PORTLEASE_SOCKET")

    @property
    def per_user(self) -> bool:
        """The per-user socket: checked as the caller's own, and the only one autostarted."""
        return self.source == "per-user"

    @property
    def system(self) -> bool:
        """The system socket: its broker is waited for when down, never replaced."""
        return self.source == "system"


def _configured(cli_value: str | None) -> SocketChoice | None:
    # Steps 1 and 2 of the rule: the socket the caller configured.
    if cli_value:
        return SocketChoice(cli_value, "argument")
    env = os.environ.get("PORTLEASE_SOCKET")
    return SocketChoice(env, "PORTLEASE_SOCKET") if env else None


def explicit_socket(cli_value: str | None = None) -> str | None:
    """The socket the caller configured (flag, then ``$PORTLEASE_SOCKET``), if any."""
    configured = _configured(cli_value)
    return configured.path if configured is not None else None


def choose_socket(cli_value: str | None = None) -> SocketChoice:
    """Pick the socket by the rule in the module docstring."""
    configured = _configured(cli_value)
    if configured is not None:
        return configured
    if system_deployment():
        return SocketChoice(system_socket(), "system")
    return SocketChoice(user_socket(), "per-user")


def autostart_enabled(flag: bool | None) -> bool:
    """Whether a client may start a per-user broker.

    ``flag`` if given, else ``$PORTLEASE_AUTOSTART`` (default on).
    """
    if flag is not None:
        return flag
    return os.environ.get("PORTLEASE_AUTOSTART", "1").strip().lower() not in (
        "0", "false", "no", "off",
    )

"""The broker's settings: one msgspec Struct, read from TOML and overridden by flags.

The same keys are documented in ``docs/configuration.md`` and rendered by the
NixOS module (``services.portlease.settings``).
"""

from __future__ import annotations

import os
from typing import Annotated

import msgspec

from portlease.client.protocol.bounds import DEFAULT_PORTS_PER_REQUEST
from portlease.client.protocol.errors import ConfigError

from . import kernel

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Every broker setting. Unknown keys in the file are an error, not ignored."""

    socket: str | None = None
    """Path of the listening socket (ignored under socket activation)."""
    socket_mode: str = "0660"
    """Octal mode of the socket file the broker creates itself."""
    group: str | None = None
    """Group that owns the socket file the broker creates itself."""
    state: str | None = None
    """Journal of leases for restart safety; default ``$STATE_DIRECTORY/state.jsonl``,
    else ``<socket>.state``."""
    port_min: Port = 10000
    port_max: Port = 32000
    ttl: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    """Backstop lifetime (s) of leases with no live connection: detached or restored."""
    max_ports_per_request: Positive = DEFAULT_PORTS_PER_REQUEST
    max_ports_per_uid: Positive = 4096
    max_leases_per_connection: Positive = 1024
    max_connections_per_uid: Positive = 1024
    """Open connections one uid may have at once; more are refused with ``quota``,
    so one user cannot take every file descriptor the broker has."""
    portalloc_dir: str | None = None
    """A fedimint-portalloc data directory (``FM_PORTALLOC_DATA_DIR``) to share the range with."""
    idle_exit: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Exit after this many seconds with no connection and no lease; 0 = never."""
    log_level: str = "info"
    exclude: list[int | str] = []
    """The operator's ports never to grant: ports and ``"LO-HI"`` ranges, on top of the
    kernel's ephemeral and reserved ports and the ports browsers refuse."""
    portserver: str | None = None
    """Also answer Google portpicker's port-server protocol (``PORTSERVER_ADDRESS``) on this
    socket: a path, or ``@name`` in the abstract namespace. Off when unset; under socket
    activation the socket named ``portserver`` is used instead."""
    metrics_textfile: str | None = None
    """Write the metrics (classic Prometheus text format) to this file, atomically, for
    node_exporter's textfile collector."""

    def __post_init__(self) -> None:
        kernel.parse_exclude(self.exclude)  # a bad entry is an error at load, with its value
        if self.port_min > self.port_max:
            raise ValueError(f"port_min {self.port_min} is above port_max {self.port_max}")
        try:
            int(self.socket_mode, 8)
        except ValueError:
            raise ValueError(f"socket_mode {self.socket_mode!r} is not an octal mode") from None


def load_file(path: str) -> Config:
    """Read a TOML config file; raise :class:`ConfigError` with the reason on any fault."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        return msgspec.toml.decode(data, type=Config)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def parse_range(text: str) -> tuple[int, int]:
    """``"10000-32000"`` → ``(10000, 32000)``."""
    lo, sep, hi = text.partition("-")
    try:
        low, high = int(lo), int(hi)
    except ValueError:
        raise ConfigError(f"range {text!r} is not LO-HI") from None
    if not sep or not (1 <= low <= high <= 65535):
        raise ConfigError(f"range {text!r} must be LO-HI with 1 <= LO <= HI <= 65535")
    return low, high


def default_state_path(socket_path: str) -> str:
    state_dir = os.environ.get("STATE_DIRECTORY")
    if state_dir:
        # systemd may pass several colon-separated directories; the first is ours.
        # Under DynamicUser=yes it is a root-owned symlink into /var/lib/private/,
        # which systemd made and others cannot change; the broker refuses to
        # create files through a symlink, so it works in the real directory.
        return os.path.join(os.path.realpath(state_dir.split(":")[0]), "state.jsonl")
    return socket_path + ".state"

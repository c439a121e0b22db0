"""``portlease serve``: the broker's one command.

The parser is the client's (:mod:`portlease.client.cli.main` defines every
subcommand's flags); this module turns ``serve``'s flags into a
:class:`~portlease.broker.config.Config` and runs the broker.
"""

from __future__ import annotations

import argparse
import functools
import signal

from portlease.client.host.locations import explicit_socket, user_socket
from portlease.client.protocol.errors import ConfigError

from . import logs
from .config import Config, load_file, parse_range
from .server import run

__all__ = ["serve"]


def serve(args: argparse.Namespace) -> int:
    """Run the broker in the foreground until SIGTERM/SIGINT, or until idle when asked."""
    config = _serve_config(args)
    # A parent that blocked signals (as `portlease lease -- CMD` does while it
    # waits) must not leave the broker deaf to SIGTERM and SIGHUP.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    # Priority prefixes for journald when stderr is the journal (logs.py).
    logs.setup(config.log_level)
    # SIGHUP re-reads the file and applies the same flags on top again.
    reload = functools.partial(_serve_config, args) if args.config else None
    return run(config, reload=reload)


def _serve_config(args: argparse.Namespace) -> Config:
    """The config file (if any) with the command line's flags on top."""
    config = load_file(args.config) if args.config else Config()
    if args.socket:
        config.socket = args.socket
    if not config.socket:
        config.socket = explicit_socket() or user_socket()
    if args.range:
        config.port_min, config.port_max = parse_range(args.range)
    for attr in ("ttl", "state", "group", "portalloc_dir", "idle_exit", "log_level", "metrics_textfile",
                 "portserver"):
        value = getattr(args, attr)
        if value is not None:
            setattr(config, attr, value)
    if config.ttl <= 0:
        raise ConfigError("--ttl must be positive")
    return config

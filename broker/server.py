"""Start-up: open the sockets, read the journal, and run the broker's service under trio."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import resource
from collections.abc import Callable

import trio

from portlease.client.host.procinfo import boot_id

from .config import Config, default_state_path
from .handler import Broker
from .listening import open_listeners
from .notify import Notifier
from .service import Service
from .state import Journal

log = logging.getLogger("portlease.broker")

FD_MARGIN = 64
"""File descriptors kept back from connections for the journal, logs and bind probes."""
LARGE_STATE = 4 << 20
"""Bytes of journal above which start-up asks systemd for more time."""


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def tune_gc() -> None:
    """Fewer and cheaper garbage collections for a long-lived loop with many connections.

    A full collection walks every object the broker holds and stalls every
    client meanwhile; at the default gen-0 threshold a ``status`` of many
    leases set one off nearly every time (bench/load.py measures the effect).
    Start-up objects (imports, config) are frozen out of every later collection.
    """
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


def run(config: Config, *, reload: Callable[[], Config] | None = None) -> int:
    """Run a broker in the foreground until SIGTERM/SIGINT or idle exit; return the exit status."""
    soft = raise_fd_limit()
    notifier = Notifier()
    listening, portserver, stored_claims = open_listeners(config)
    state_path = config.state or default_state_path(listening.path)
    broker = Broker(
        config=config, journal=Journal(state_path, boot=boot_id()),
        max_connections=max(16, soft - FD_MARGIN),
        fd_store=notifier if notifier.enabled else None,
        fd_store_capacity=notifier.fd_store_capacity, stored_claims=stored_claims,
    )
    service = Service(broker, notifier, config_loader=reload)
    try:
        with contextlib.suppress(OSError):
            if os.path.getsize(state_path) > LARGE_STATE:
                # Reading a big journal may outlast systemd's start timeout.
                notifier.extend_timeout(60)
        broker.restore()
        log.info("state %s, socket %s", state_path, listening.path)
        if portserver is not None:
            log.info("portserver (portpicker's protocol) on %s", portserver.path)
        tune_gc()
        trio.run(functools.partial(
            service.serve, listening.sock, portserver=None if portserver is None else portserver.sock,
        ))
    finally:
        listening.close()
        if portserver is not None:
            portserver.close()
    return 0


__all__ = ["raise_fd_limit", "run", "tune_gc"]

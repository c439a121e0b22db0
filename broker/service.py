"""The broker's service loop: signals, reload, expiry ticks, systemd and the metrics file.

:class:`Service` runs one :class:`~.handler.Broker` under trio: the connection
driver, the portalloc share and the portpicker endpoint as tasks of one nursery,
beside the periodic work (expiry and compaction each ``TICK``, systemd's STATUS
and watchdog, the metrics text file, idle exit) and the signals (SIGTERM and
SIGINT stop, SIGHUP reloads the config file).
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from portlease.client.host import procnet
from portlease.client.protocol.errors import ConfigError

from .config import Config
from .handler import Broker
from .metrics import write_textfile
from .notify import Notifier
from .portserver_shell import PortServer

log = logging.getLogger("portlease.broker")

TICK = 0.5
"""Seconds between expiry sweeps, STATUS updates and idle checks."""
METRICS_EVERY = 5.0
"""Seconds between rewrites of the metrics text file."""
RESTART_ONLY = ("socket", "state", "group", "portalloc_dir", "socket_mode", "portserver")
"""Config keys a reload keeps: changing them under live connections has no safe meaning."""


@dataclass
class Service:
    """One broker served until stopped: its tasks, its signals, its word to systemd."""

    broker: Broker
    notifier: Notifier
    config_loader: Callable[[], Config] | None = None
    """Re-reads the configuration on SIGHUP; None when there is no file to re-read."""
    _cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    _last_status: str = ""
    _metrics_written: float = -1e9

    async def serve(
        self, listener: socket.socket, *, portserver: socket.socket | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``listener`` (and portpicker on ``portserver``) until :meth:`stop`;
        leases stay in the journal after."""
        broker = self.broker
        driver = broker.start_serving(listener)
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    # Signal handlers first: a SIGTERM that arrives right after the
                    # first reply must stop the broker cleanly, not kill it.
                    await nursery.start(self._signals)
                    nursery.start_soon(self._tick)
                    nursery.start_soon(self._watchdog)
                    if broker.share is not None:
                        # Publishes restored leases and the blocks grants need; never
                        # waited for here: a wedged share directory must not stop hello.
                        nursery.start_soon(broker.share.run)
                    nursery.start_soon(driver.run)
                    if portserver is not None:
                        endpoint = PortServer(broker, portserver)
                        await nursery.start(endpoint.run)
                        adopted = endpoint.adopt([r for r in broker.table if r.orphaned])
                        if adopted:
                            log.info("portserver: %d restored lease(s) held by their processes again",
                                     adopted)
                    self.notifier.ready()
                    self._update_status(force=True)
                    log.info("serving; range %d-%d", broker.config.port_min, broker.config.port_max)
                    task_status.started()
        finally:
            broker.shutdown()
            self.notifier.close()

    def stop(self) -> None:
        """Stop serving; leases stay in the journal for reclaim after restart."""
        self.broker.stopping = True
        self._cancel.cancel()

    async def _signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reload()
                    continue
                log.info("%s: stopping; leases are kept for reclaim", signal.Signals(signum).name)
                self.notifier.stopping()
                self.stop()
                return

    def reload(self) -> None:
        """Re-read the config file: range, exclusions, TTL, limits and log level change; leases stay."""
        if self.config_loader is None:
            log.info("SIGHUP: no config file to reload")
            return
        self.notifier.reloading()
        try:
            new = self.config_loader()
        except ConfigError as exc:
            log.error("reload failed, keeping the old settings: %s", exc)
            self.notifier.ready()
            return
        current = self.broker.config
        for key in RESTART_ONLY:
            if getattr(new, key) != getattr(current, key):
                log.warning("reload: %s changes only at restart; keeping %r", key, getattr(current, key))
                setattr(new, key, getattr(current, key))
        self.broker.apply_config(new)
        log.info("reloaded: range %d-%d, ttl %g s, log level %s", new.port_min, new.port_max,
                 new.ttl, new.log_level)
        self.notifier.ready()
        self._update_status(force=True)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        # From inside the event loop on purpose: a wedged loop stops the pings.
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)

    async def _tick(self) -> None:
        broker = self.broker
        while True:
            await trio.sleep(TICK)
            if broker.tick():
                log.info("idle for %g s with no lease: exiting", broker.config.idle_exit)
                self.stop()
            self._update_status()
            textfile = broker.config.metrics_textfile
            now = broker.clock()
            if textfile and now - self._metrics_written >= METRICS_EVERY:
                self._metrics_written = now
                await self._write_metrics(textfile)

    async def _write_metrics(self, path: str) -> None:
        """Rewrite the metrics text file, squatters included.

        Looking for squatters walks the kernel's socket tables (milliseconds), so
        it runs in a worker thread, on a copy of the leases taken here.
        """
        table = self.broker.table
        a = table.allocator
        spans = [(r.start, r.count) for r in table]
        try:
            found = await trio.to_thread.run_sync(procnet.squatters, a.low, a.high, spans)
            squatted: int | None = len({s.port for s in found})
        except OSError:
            squatted = None
        try:
            write_textfile(path, self.broker.metrics_text(squatted=squatted, openmetrics=False))
        except OSError as exc:
            log.warning("cannot write metrics to %s: %s", path, exc)

    def _update_status(self, *, force: bool = False) -> None:
        if not self.notifier.enabled:
            return
        text = self.broker.status_text()
        if force or text != self._last_status:
            self._last_status = text
            self.notifier.status(text)


__all__ = ["Service"]

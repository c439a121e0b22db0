"""The broker's metrics: counters kept as events happen, gauges read from a snapshot at render time.

Two text formats come out of the same numbers:

- OpenMetrics 1.0 (``render(snapshot)``), the answer to the protocol's
  ``metrics`` op and to ``portlease metrics``; it ends in ``# EOF``.
- The classic Prometheus text format (``render(snapshot, openmetrics=False)``,
  which is :func:`to_classic` of the OpenMetrics text) for node_exporter's textfile
  collector, which parses only that format: in it a counter's ``TYPE`` line
  names the sample with its ``_total`` suffix, and it has no ``UNIT`` lines and
  no ``# EOF``. :func:`write_textfile` converts OpenMetrics text it is given.

Nothing here reads a clock or does I/O except :func:`write_textfile`; the
caller passes durations and the snapshot.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["DURATION_BUCKETS", "LEASE_STATES", "Metrics", "Snapshot", "to_classic", "write_textfile"]

LEASE_STATES = ("attached", "detached", "orphaned")
"""Lease states as ``portlease_leases{state=…}`` shows them; all three are always present."""

DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 10800.0)
"""Upper bounds (s) of the lease-duration histogram, from a unit test's second to a long CI job."""

# Refusal reasons that exist on every broker from the start, so that rate() and
# increase() see a 0 before the first refusal instead of a series appearing later.
_REFUSALS = ("exhausted", "quota", "too-large")
_PROBES = (("tcp", "ipv4"), ("tcp", "ipv6"), ("udp", "ipv4"), ("udp", "ipv6"))


@dataclass(frozen=True)
class Snapshot:
    """The broker's state at one moment, as the gauges show it."""

    ports_held: int
    """Ports in the range that a lease holds."""
    ports_free: int
    """Ports in the range that could be granted now."""
    ports_quarantined: int
    """Ports passed over for a few seconds after failing the bind check."""
    ports_excluded: int
    """Ports in the range never granted: the kernel's ephemeral and reserved ports, bad ports, ``exclude``."""
    largest_free_run: int
    """The largest ``count`` a request could be granted now."""
    leases: Mapping[str, int]
    """Leases by state (``attached``, ``detached``, ``orphaned``); a missing state counts 0."""
    clients: int
    """Open client connections."""
    squatted_ports: int | None
    """Ports in the range bound by something that holds no lease; None when not looked at."""
    range_low: int
    range_high: int


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break


class Metrics:
    """Counters and the lease-duration histogram of one broker; :meth:`render` adds the gauges.

    Counters only go up and start at 0 when the broker starts (a restart
    resets them, which Prometheus' ``rate()`` handles).
    """

    def __init__(self) -> None:
        self._grants = 0
        self._ports_granted = 0
        self._refusals: dict[str, int] = dict.fromkeys(_REFUSALS, 0)
        self._bind_failures: dict[tuple[str, str], int] = dict.fromkeys(_PROBES, 0)
        self._reclaims = 0
        self._token_misses: dict[tuple[str, int | None], int] = {}
        self._orphan_expiries = 0
        self._duration = _Histogram(DURATION_BUCKETS)

    def granted(self, count: int) -> None:
        """A lease of ``count`` ports was granted."""
        self._grants += 1
        self._ports_granted += count

    def refused(self, code: str) -> None:
        """A lease request was refused with this ErrorCode value (``"exhausted"``, ``"quota"``, …)."""
        self._refusals[code] = self._refusals.get(code, 0) + 1

    def bind_check_failed(self, proto: str, family: str) -> None:
        """A port failed the bind check: ``proto`` ``"tcp"``/``"udp"``, ``family`` ``"ipv4"``/``"ipv6"``."""
        key = (proto, family)
        self._bind_failures[key] = self._bind_failures.get(key, 0) + 1

    def reclaimed(self) -> None:
        """A lease was reclaimed with its token on a new connection."""
        self._reclaims += 1

    def token_missed(self, op: str, uid: int | None) -> int:
        """A ``release``/``renew``/``detach``/``reclaim`` (``op``) of ``uid`` named a token
        no lease has; returns that uid's count of such requests so far, every op."""
        key = (op, uid)
        self._token_misses[key] = self._token_misses.get(key, 0) + 1
        return sum(n for (_, u), n in self._token_misses.items() if u == uid)

    def orphan_expired(self) -> None:
        """An orphaned (restored, unreclaimed) lease reached its expiry and was freed."""
        self._orphan_expiries += 1

    def lease_ended(self, held_seconds: float) -> None:
        """A lease ended (released, its client gone, or expired) after being held this long."""
        if not math.isfinite(held_seconds) or held_seconds < 0:
            held_seconds = 0.0  # a clock step must not corrupt the sum
        self._duration.observe(held_seconds)

    def render(self, snapshot: Snapshot, *, openmetrics: bool = True) -> str:
        """The metrics as text: OpenMetrics (ending ``# EOF``), or else the classic Prometheus format."""
        out = _Writer()
        s = snapshot
        out.family("portlease_ports", "gauge", "Ports of the range by state.", [
            ({"state": "held"}, s.ports_held), ({"state": "free"}, s.ports_free),
            ({"state": "quarantined"}, s.ports_quarantined), ({"state": "excluded"}, s.ports_excluded),
        ])
        out.family("portlease_largest_free_run", "gauge",
                   "The most consecutive ports one request could be granted now.", [({}, s.largest_free_run)])
        out.family("portlease_leases", "gauge", "Leases by state.",
                   [({"state": st}, s.leases.get(st, 0)) for st in LEASE_STATES])
        out.family("portlease_clients", "gauge", "Open client connections.", [({}, s.clients)])
        if s.squatted_ports is not None:
            out.family("portlease_squatted_ports", "gauge",
                       "Ports of the range bound by a socket that holds no lease.", [({}, s.squatted_ports)])
        out.family("portlease_range_low", "gauge", "Lowest port of the configured range.",
                   [({}, s.range_low)])
        out.family("portlease_range_high", "gauge", "Highest port of the configured range.",
                   [({}, s.range_high)])
        out.counter("portlease_grants", "Leases granted.", [({}, self._grants)])
        out.counter("portlease_ports_granted", "Ports granted, summed over all leases.",
                    [({}, self._ports_granted)])
        out.counter("portlease_refusals", "Lease requests refused, by error code.",
                    [({"reason": r}, n) for r, n in sorted(self._refusals.items())])
        out.counter("portlease_bind_check_failures",
                    "Ports that failed the bind check, by the probe that failed.",
                    [({"proto": p, "family": f}, n) for (p, f), n in sorted(self._bind_failures.items())])
        out.counter("portlease_reclaims", "Leases reclaimed with their token on a new connection.",
                    [({}, self._reclaims)])
        misses = sorted(self._token_misses.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))
        out.counter("portlease_token_misses",
                    "Requests naming a token no lease has (ended, never granted, or guessed), by op and uid.",
                    [({"op": op, "uid": "" if uid is None else str(uid)}, n) for (op, uid), n in misses])
        out.counter("portlease_orphan_expiries", "Orphaned leases (restored, never reclaimed) that expired.",
                    [({}, self._orphan_expiries)])
        out.histogram("portlease_lease_duration_seconds", "How long leases were held, counted when they end.",
                      self._duration)
        text = out.finish()
        return text if openmetrics else to_classic(text)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class _Writer:
    """OpenMetrics text, family by family; :func:`to_classic` derives the other format."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def _head(self, name: str, kind: str, help_: str, unit: str | None = None) -> None:
        self.lines.append(f"# HELP {name} {_escape(help_)}")
        self.lines.append(f"# TYPE {name} {kind}")
        if unit:
            self.lines.append(f"# UNIT {name} {unit}")

    def family(self, name: str, kind: str, help_: str,
               samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        self._head(name, kind, help_)
        self.lines.extend(f"{name}{_labels(lb)} {_number(v)}" for lb, v in samples)

    def counter(self, name: str, help_: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        # OpenMetrics names the family without the suffix, the sample with it.
        self._head(name, "counter", help_)
        self.lines.extend(f"{name}_total{_labels(lb)} {_number(v)}" for lb, v in samples)

    def histogram(self, name: str, help_: str, h: _Histogram) -> None:
        self._head(name, "histogram", help_, unit="seconds")
        cumulative = 0
        for bound, count in zip(h.bounds, h.counts, strict=True):
            cumulative += count
            self.lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        self.lines.append(f'{name}_bucket{{le="+Inf"}} {h.n}')
        self.lines.append(f"{name}_sum {_number(h.total)}")
        self.lines.append(f"{name}_count {h.n}")

    def finish(self) -> str:
        self.lines.append("# EOF")
        return "\n".join(self.lines) + "\n"


def to_classic(text: str) -> str:
    """OpenMetrics text from :meth:`Metrics.render` in the classic Prometheus format.

    Counter families are renamed to their ``_total`` sample name in HELP and TYPE,
    and ``UNIT`` and ``# EOF`` lines are dropped. Text already in the classic
    format (no ``# EOF``) comes back unchanged.
    """
    if not text.endswith("# EOF\n"):
        return text
    lines = text.splitlines()[:-1]
    counters = {line.split(" ")[2] for line in lines
                if line.startswith("# TYPE ") and line.endswith(" counter")}
    out = []
    for line in lines:
        if line.startswith("# UNIT "):
            continue
        if line.startswith(("# HELP ", "# TYPE ")):
            hash_, keyword, name, *rest = line.split(" ", 3)
            if name in counters:
                line = " ".join([hash_, keyword, name + "_total", *rest])
        out.append(line)
    return "\n".join(out) + "\n"


def write_textfile(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, mode 0644, for node_exporter's textfile collector.

    OpenMetrics text (what :meth:`Metrics.render` gives by default) is written in
    the classic format (:func:`to_classic`), the only one the collector parses.
    The text goes to a new temporary file in the same directory (created with
    O_EXCL and O_NOFOLLOW, so a planted file or symlink there is never written
    through), which is then renamed over ``path``: a reader sees the old file
    or the new one, never half of one. The temporary name does not end in
    ``.prom``, so the collector never reads it. No fsync: after a power cut
    the file may be stale or empty, and the next write replaces it anyway.
    Raises OSError (the caller logs it and tries again at the next interval).
    """
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            os.fchmod(fd, 0o644)  # the umask may have taken bits the collector's user needs
            data = to_classic(text).encode()
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

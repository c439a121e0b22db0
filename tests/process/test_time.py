"""Leases run on elapsed time: wall-clock steps and restarts change no lifetime.

The clock steps are real: the broker runs under libfaketime with a timestamp
file that the test rewrites, and with the monotonic clock left alone
(FAKETIME_DONT_FAKE_MONOTONIC), which is what an NTP step does to a host.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from brokerproc import BrokerProc, Raw

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def leases(b: BrokerProc) -> dict[tuple[int, ...], str]:
    status = Raw(b.socket).call({"op": "status"})
    return {tuple(i["ports"]): i["state"] for i in status["leases"]}  # type: ignore[union-attr, index]


@pytest.mark.skipif(not os.path.exists(LIBFAKETIME), reason="needs libfaketime (apt-get install faketime)")
def test_wall_clock_steps_neither_expire_live_leases_nor_keep_dead_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ten_ports: str
) -> None:
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    monkeypatch.setenv("LD_PRELOAD", LIBFAKETIME)
    monkeypatch.setenv("FAKETIME_TIMESTAMP_FILE", str(offset))
    monkeypatch.setenv("FAKETIME_NO_CACHE", "1")
    monkeypatch.setenv("FAKETIME_DONT_FAKE_MONOTONIC", "1")
    b = BrokerProc(tmp_path, ["--ttl", "3"], range=ten_ports).start()
    monkeypatch.delenv("LD_PRELOAD")
    try:
        client = Raw(b.socket)
        renewed = client.call({"op": "lease", "count": 2, "detach": True, "ttl": 3})
        token = renewed["token"]
        # The broker's wall clock jumps 600 s ahead (its reply shows it: real steps).
        offset.write_text("+600\n")
        time.sleep(0.2)
        after_step = client.call({"op": "renew", "token": token})
        assert after_step["reply"] == "renewed"
        assert after_step["expires"] > time.time() + 590  # type: ignore[operator]
        for _ in range(4):  # 4 s of renewals every second: a 3 s TTL never lapses
            time.sleep(1.0)
            assert client.call({"op": "renew", "token": token})["reply"] == "renewed"
        assert leases(b) == {tuple(renewed["ports"]): "detached"}  # type: ignore[arg-type]
        # Now an hour back, with a lease nobody renews: it still lapses after its 2 s.
        dead = client.call({"op": "lease", "count": 1, "detach": True, "ttl": 2})
        offset.write_text("-3600\n")
        deadline = time.monotonic() + 10
        while tuple(dead["ports"]) in leases(b):  # type: ignore[arg-type]
            assert time.monotonic() < deadline, "a dead lease outlived its TTL after a clock step back"
            time.sleep(0.2)
        client.call({"op": "release", "token": token})
    finally:
        b.stop()


def test_a_detached_lease_keeps_its_ttl_across_a_restart(tmp_path: Path, ten_ports: str) -> None:
    """Only leases bound to a connection come back as orphans kept while their owner lives."""
    b = BrokerProc(tmp_path, ["--ttl", "60"], range=ten_ports).start()
    try:
        client = Raw(b.socket)  # this (live) process took both leases
        detached = client.call({"op": "lease", "count": 2, "detach": True, "ttl": 2})
        attached = client.call({"op": "lease", "count": 2})
        b.stop()
        b.start()
        got = leases(b)
        assert got == {tuple(detached["ports"]): "detached",  # type: ignore[arg-type]
                       tuple(attached["ports"]): "orphaned"}  # type: ignore[arg-type]
        time.sleep(3.0)  # past the detached lease's 2 s, well inside the orphan's 60 s
        assert leases(b) == {tuple(attached["ports"]): "orphaned"}  # type: ignore[arg-type]
    finally:
        b.stop()

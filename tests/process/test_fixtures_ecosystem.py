"""pytest-asyncio's, anyio's and aiohttp's port fixtures, served by leases (the real plugins).

The toy suites below are written only against those plugins' fixtures, as an
existing suite is. Every port they get is checked to be a lease: in the
broker's range (the originals bind port 0 and get an ephemeral port, above it),
and in ``portlease status`` with the test's id and the run's own command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from brokerproc import BrokerProc, Raw
from xdistsuite import SUITE_HEAD, assert_overlapping_holds_disjoint, run_concurrently

pytest.importorskip("pytest_asyncio")
pytest.importorskip("anyio")

# Plugins of this environment that have nothing to do with the fixtures.
UNRELATED = ("-p", "no:hypothesispytest", "-p", "no:benchmark", "-p", "no:cacheprovider")

# Each test records the ports it got, binds them while it holds them, and what
# `portlease status` says about them; the barrier and the binding are
# tests/xdistsuite.py's.
TOY_SUITE = SUITE_HEAD + r'''

def hold(ports, request):
    socks = bind_all(ports)
    start = time.time()
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "portlease", "status", "--json"],
        capture_output=True, text=True, check=True).stdout)
    seen = {port: lease["note"] for lease in status["leases"] for port in lease["ports"]}
    with open(OUT, "a") as f:
        f.write(json.dumps({
            "run": os.environ["PL_RUN"], "node": request.node.nodeid, "ports": list(ports),
            "notes": [seen.get(port) for port in ports], "start": start, "end": time.time(),
            "types": sorted({type(p).__name__ for p in ports}),
        }) + "\n")
    for s in socks:
        s.close()


@pytest.mark.parametrize("i", range(2))
def test_pytest_asyncio(unused_tcp_port, unused_udp_port, unused_tcp_port_factory,
                        unused_udp_port_factory, request, i):
    hold([unused_tcp_port, unused_udp_port, unused_tcp_port_factory(),
          unused_tcp_port_factory(), unused_udp_port_factory()], request)


@pytest.mark.parametrize("i", range(2))
def test_anyio(free_tcp_port, free_udp_port, free_tcp_port_factory, free_udp_port_factory,
               request, i):
    assert free_tcp_port_factory.kind == socket.SOCK_STREAM
    assert free_udp_port_factory.kind == socket.SOCK_DGRAM
    hold([free_tcp_port, free_udp_port, free_tcp_port_factory(),
          free_tcp_port_factory(socket.AF_INET6), free_udp_port_factory(family=socket.AF_INET)],
         request)
'''


def broker_range(b: BrokerProc) -> range:
    low, high = (int(x) for x in b.range.split("-"))
    return range(low, high + 1)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_ADDOPTS", "PORTLEASE_SOCKET", "PYTEST_XDIST_WORKER")}
    env.update(extra)
    return env


def test_two_concurrent_xdist_runs_get_leased_ports_named_by_test_and_run(
    broker: BrokerProc, tmp_path: Path
) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_toy.py").write_text(TOY_SUITE)
    # The broker is configured the way CI configures it: $PORTLEASE_SOCKET.
    env = clean_env(PORTLEASE_SOCKET=broker.socket, PORTLEASE_AUTOSTART="0")
    pids, records = run_concurrently(suite, [*UNRELATED, "test_toy.py"], workers=4, env=env,
                                     passed="4 passed", timeout=300)
    assert len(records) == 8
    for r in records:
        assert r["types"] == ["int"]
        # From the broker: in its range, and `portlease status` names the test and its run.
        assert all(port in broker_range(broker) for port in r["ports"]), r
        for note in r["notes"]:
            assert note is not None and note.startswith(r["node"] + " "), r
            assert f"[run {pids[r['run']]}: pytest -n 4 -q" in note, r
            assert note.endswith("test_toy.py]"), r
        assert len(set(r["ports"])) == len(r["ports"])
    assert_overlapping_holds_disjoint(records)
    # Function-scoped leases ended with their tests, the factories' with their sessions.
    assert Raw(broker.socket).call({"op": "status"})["leases"] == []


# ------------------------------------------------------------------ which definition wins

# Prints what each fixture gave, for the outer test to check against the range.
PROBE = r'''
import json, socket

def test_probe(unused_tcp_port, unused_udp_port, unused_tcp_port_factory, unused_udp_port_factory,
               free_tcp_port, free_udp_port, free_tcp_port_factory, free_udp_port_factory, request):
    ports = {
        "unused_tcp_port": unused_tcp_port, "unused_udp_port": unused_udp_port,
        "unused_tcp_port_factory": unused_tcp_port_factory(),
        "unused_udp_port_factory": unused_udp_port_factory(),
        "free_tcp_port": free_tcp_port, "free_udp_port": free_udp_port,
        "free_tcp_port_factory": free_tcp_port_factory(socket.AF_INET),
        "free_udp_port_factory": free_udp_port_factory(),
    }
    if "aiohttp_unused_port" in request.fixturenames or EXTRA:
        factory = request.getfixturevalue("aiohttp_unused_port")
        ports["aiohttp_unused_port"] = factory()
    print("PROBE " + json.dumps(ports))
'''


def probe(tmp_path: Path, *args: str, env: dict[str, str], aiohttp: bool = False,
          conftest: str | None = None, ini: str | None = None) -> dict[str, int]:
    (tmp_path / "test_probe.py").write_text(f"EXTRA = {aiohttp}\n" + PROBE)
    if conftest is not None:
        (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n"
                                         + (ini or ""))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-n", "0", *UNRELATED, *args, "test_probe.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("PROBE ")]
    ports: dict[str, int] = json.loads(line[len("PROBE "):])
    return ports


ORDERS = {
    "entry points": (),
    "anyio then pytest-asyncio": ("-p", "anyio", "-p", "asyncio"),
    "pytest-asyncio then anyio": ("-p", "asyncio", "-p", "anyio"),
    "portlease first": ("-p", "portlease", "-p", "anyio", "-p", "asyncio"),
    "portlease last": ("-p", "anyio", "-p", "asyncio", "-p", "portlease"),
}


@pytest.mark.parametrize("order", ORDERS)
def test_leased_in_any_plugin_order(broker: BrokerProc, tmp_path: Path, order: str) -> None:
    env = clean_env(PORTLEASE_SOCKET=broker.socket, PORTLEASE_AUTOSTART="0")
    ports = probe(tmp_path, *ORDERS[order], env=env)
    assert len(ports) == 8
    assert all(port in broker_range(broker) for port in ports.values()), ports
    assert len(set(ports.values())) == 8


def aiohttp_plugin() -> bool:
    try:
        import aiohttp.pytest_plugin  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not aiohttp_plugin(), reason="aiohttp is not installed")
@pytest.mark.parametrize("how", ["-p", "conftest"])
def test_aiohttp_unused_port_is_leased(broker: BrokerProc, tmp_path: Path, how: str) -> None:
    env = clean_env(PORTLEASE_SOCKET=broker.socket, PORTLEASE_AUTOSTART="0")
    # aiohttp's own plugin defines the fixture (pytest-aiohttp, entry point "aiohttp",
    # does not); it is loaded by -p or by a conftest's pytest_plugins, as suites do.
    if how == "-p":
        ports = probe(tmp_path, "-p", "no:aiohttp", "-p", "aiohttp.pytest_plugin", env=env, aiohttp=True)
    else:
        ports = probe(tmp_path, "-p", "no:aiohttp", env=env, aiohttp=True,
                      conftest='pytest_plugins = ["aiohttp.pytest_plugin"]\n')
    assert ports["aiohttp_unused_port"] in broker_range(broker)
    assert all(port in broker_range(broker) for port in ports.values()), ports


def test_originals_when_turned_off_or_unconfigured(broker: BrokerProc, tmp_path: Path) -> None:
    """The checks above can fail: the originals give ephemeral ports, outside the range."""
    configured = clean_env(PORTLEASE_SOCKET=broker.socket, PORTLEASE_AUTOSTART="0")
    for args, ini in ((("--portlease-no-fixtures",), None), ((), "portlease_fixtures = false\n")):
        ports = probe(tmp_path, *args, env=configured, ini=ini)
        assert not any(port in broker_range(broker) for port in ports.values()), (args, ports)
    # auto: no socket configured and no system deployment here.
    nowhere = clean_env(PORTLEASE_AUTOSTART="0", PORTLEASE_SYSTEM_DIR=str(tmp_path / "none"),
                        PORTLEASE_SYSTEM_CONFIG=str(tmp_path / "none.toml"))
    ports = probe(tmp_path, env=nowhere)
    assert not any(port in broker_range(broker) for port in ports.values()), ports
    # ... and the ini's socket setting is "configured" too.
    ports = probe(tmp_path, env=nowhere, ini=f"portlease_socket = {broker.socket}\n")
    assert all(port in broker_range(broker) for port in ports.values()), ports


def test_pytest_fixtures_names_portlease(broker: BrokerProc, tmp_path: Path) -> None:
    env = clean_env(PORTLEASE_SOCKET=broker.socket, PORTLEASE_AUTOSTART="0")
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--fixtures", *UNRELATED, "test_nothing.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    section = text[text.index("fixtures defined from portlease.client.pytest_plugin"):]
    for name, origin in (("unused_tcp_port_factory", "pytest-asyncio's"), ("free_udp_port", "anyio's")):
        assert f"\n{name} " in section, name
        assert f"in place of {origin}" in section, origin

"""The bind check against the real kernel: every kind of squatter is seen."""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import sys
from typing import Any

import pytest

from portlease.broker import kernel

V6 = kernel.has_ipv6()

SQUATTERS = [
    (family, addr, v6only, reuse, listen)
    for family, addr in [
        (socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "127.0.0.2"),
        (socket.AF_INET6, "::"), (socket.AF_INET6, "::1"),
    ]
    if family == socket.AF_INET or V6
    for v6only in ([False, True] if family == socket.AF_INET6 else [None])
    for reuse, listen in itertools.product([False, True], [False, True])
]


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["tcp", "udp"])
def test_every_squatter_fails_the_check(kind: socket.SocketKind, port_range: str) -> None:
    port = int(port_range.split("-")[0])
    for family, addr, v6only, reuse, listen in SQUATTERS:
        if listen and kind != socket.SOCK_STREAM:
            continue
        port += 1
        assert kernel.bind_ok(port), f"port {port} busy before the test"
        s = socket.socket(family, kind)
        try:
            if v6only is not None:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            if reuse:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
            if listen:
                s.listen()
            assert not kernel.bind_ok(port), (addr, v6only, reuse, listen)
            # bind_failure names the probe: the protocol held, and whether the holder covers IPv4.
            covers_v4 = family == socket.AF_INET or (addr == "::" and not v6only)
            expected = ("tcp" if kind == socket.SOCK_STREAM else "udp", "ipv4" if covers_v4 else "ipv6")
            assert kernel.bind_failure(port) == expected, (addr, v6only, reuse, listen)
        finally:
            s.close()
        assert kernel.bind_ok(port)  # and free again once it is gone
        assert kernel.bind_failure(port) is None


def test_a_port_that_passes_can_be_bound_every_way(port_range: str) -> None:
    port = int(port_range.split("-")[0]) + 60
    assert kernel.bind_ok(port)
    held = []
    for family, addr in [(socket.AF_INET, "0.0.0.0")] + ([(socket.AF_INET6, "::")] if V6 else []):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(family, kind)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))  # no SO_REUSEADDR: the strictest bind a server may do
            held.append(s)
    for s in held:
        s.close()


def test_a_udp_squatter_is_named_after_a_free_tcp_probe(port_range: str) -> None:
    port = int(port_range.split("-")[0]) + 70
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))
        assert kernel.bind_failure(port) == ("udp", "ipv4")


# ---------------------------------------------------------------- the kernel's own ranges


def in_netns(ephemeral: str, reserved: str, expr: str) -> Any:
    """Evaluate ``expr`` (with ``kernel`` imported) in a new network namespace whose
    ip_local_port_range and ip_local_reserved_ports are set as given: both sysctls are
    per namespace, so the host and the other tests never see the change."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    code = (
        "import json\n"
        f"open('/proc/sys/net/ipv4/ip_local_port_range', 'w').write({ephemeral!r})\n"
        f"open('/proc/sys/net/ipv4/ip_local_reserved_ports', 'w').write({reserved!r})\n"
        "from portlease.broker import kernel\n"
        f"print(json.dumps({expr}))\n"
    )
    r = subprocess.run(["unshare", "--net", sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0 and "unshare failed" in r.stderr:
        pytest.skip(f"cannot make a network namespace here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_range_hint_names_the_ephemeral_and_reserved_ports_in_the_range() -> None:
    got = in_netns("20000 20100", "25000-25002,25010,40000", "[kernel.range_hint(20050, 29999), "
                   "kernel.range_hint(20000, 20100), kernel.range_hint(21000, 24999)]")
    assert got == [
        "ports 20050-20100 of the range 20050-29999 are in the kernel's ephemeral range "
        "(net.ipv4.ip_local_port_range); ports 25000-25002, 25010 of the range 20050-29999 are reserved "
        "by the kernel (net.ipv4.ip_local_reserved_ports), so they are never granted",
        "all ports of the range 20000-20100 are in the kernel's ephemeral range "
        "(net.ipv4.ip_local_port_range), so they are never granted",
        None,
    ]


def test_range_hint_reads_the_host_as_it_is() -> None:
    eph = kernel.ephemeral_range()
    assert eph is not None
    lo = eph[0]
    hint = kernel.range_hint(lo, lo + 9)
    assert hint is not None and hint.startswith(f"all ports of the range {lo}-{lo + 9} are in")


def test_excluded_runs_folds_kernel_bad_and_operator_ports() -> None:
    runs, warnings = in_netns(
        "20000 20100", "25000-25002",
        "kernel.excluded_runs(6600, 30000, extra=[6700, '25002-25005', '29990-30010', 5])",
    )
    assert runs == [
        [6665, 5], [6679, 1], [6697, 1], [6700, 1],  # bad ports, then the operator's 6700
        [10080, 1],  # amanda
        [20000, 101],  # ephemeral
        [25000, 6],  # reserved 25000-25002 merged with the operator's 25002-25005
        [29990, 11],  # the operator's, cut to the range
    ]
    assert len(warnings) == 3
    assert "ephemeral range 20000-20100" in warnings[0]
    assert "ip_local_reserved_ports" in warnings[1]
    assert warnings[2] == "exclude entries 5 lie outside the port range 6600-30000"


def test_excluded_runs_without_bad_ports_and_everything_excluded() -> None:
    runs, warnings = in_netns("40000 40100", "", "kernel.excluded_runs(10070, 10090, bad_ports=False)")
    assert (runs, warnings) == ([], [])
    runs, warnings = in_netns("40000 40100", "", "kernel.excluded_runs(10070, 10090, extra=['10070-10090'])")
    assert runs == [[10070, 21]]
    assert warnings == ["every port of the range 10070-10090 is excluded: nothing can be granted"]


def test_the_current_call_still_works() -> None:
    runs, _ = kernel.excluded_runs(10000, 10100)
    assert (10080, 1) in runs


@pytest.mark.parametrize("bad", ["x", "9-8", "0", 0, 70000, "65536", True, "1-", "-5", 1.5, "80,81"])
def test_parse_exclude_refuses_with_the_entry(bad: object) -> None:
    with pytest.raises(ValueError, match="exclude entry"):
        kernel.parse_exclude([bad])  # type: ignore[list-item]


def test_parse_exclude_and_merge_runs() -> None:
    assert kernel.parse_exclude([8080, "9000-9010", " 7 ", "65535"]) == [
        (8080, 1), (9000, 11), (7, 1), (65535, 1)]
    runs = [(10, 5), (15, 1), (12, 2), (30, 10), (1, 2)]
    assert kernel.merge_runs(runs, 2, 35) == [(2, 1), (10, 6), (30, 6)]
    assert kernel.merge_runs([(50, 5)], 1, 10) == []

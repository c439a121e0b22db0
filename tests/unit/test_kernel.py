"""The bind check against the real kernel: every kind of squatter is seen."""

from __future__ import annotations

import itertools
import socket

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
        finally:
            s.close()
        assert kernel.bind_ok(port)  # and free again once it is gone


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

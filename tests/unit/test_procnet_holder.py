"""Which pid ``status`` names for a socket several processes hold."""

from __future__ import annotations

from portlease.client.host.procnet import holder


def test_the_lowest_pid_is_named() -> None:
    assert holder([4242, 310, 99999]) == 310


def test_pid_1_is_named_only_when_it_alone_holds_the_socket() -> None:
    # systemd's fd store: PID 1 holds a copy of every claim of the system broker.
    assert holder([1, 8123]) == 8123
    assert holder([1]) == 1

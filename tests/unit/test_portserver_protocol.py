"""portpicker's port-server protocol, sans I/O: request parsing, the reply, the ancestry walk."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portlease.broker.portserver import (
    MAX_ANCESTRY,
    MAX_REQUEST,
    NEED_MORE,
    PID_MAX,
    Refused,
    format_reply,
    is_ancestor,
    parse_request,
)


def test_portpickers_request_is_read() -> None:
    # What portpicker sends: b"%d\n" % pid.
    assert parse_request(b"4242\n") == 4242
    assert parse_request(b"4242\r\n") == 4242
    assert parse_request(b" 4242 \n") == 4242


def test_a_partial_line_waits_for_more() -> None:
    assert parse_request(b"") is NEED_MORE
    assert parse_request(b"42") is NEED_MORE


def test_end_of_input_reads_the_line_as_it_stands() -> None:
    assert parse_request(b"42", eof=True) == 42
    assert isinstance(parse_request(b"", eof=True), Refused)


@pytest.mark.parametrize("line", [
    b"0\n", b"1\n", b"-5\n", b"+5\n", b"1_000\n", b"0x10\n", b"abc\n", b"\n", b"12 13\n",
    "\u0664\u0662\n".encode(),  # Arabic-Indic digits, which int() would take
    b"%d\n" % (PID_MAX + 1), b"99999999999\n", b"\x00\n", b"1.5\n",
])
def test_anything_but_a_pid_above_1_is_refused(line: bytes) -> None:
    assert isinstance(parse_request(line), Refused)


def test_a_long_line_is_refused_without_waiting() -> None:
    assert isinstance(parse_request(b"1" * (MAX_REQUEST + 1)), Refused)
    assert parse_request(b"1" * MAX_REQUEST) is NEED_MORE


@given(st.binary(max_size=200), st.booleans())
def test_any_bytes_give_a_pid_a_refusal_or_a_wait(data: bytes, eof: bool) -> None:
    result = parse_request(data, eof=eof)
    if result is NEED_MORE:
        assert not eof and b"\n" not in data and len(data) <= MAX_REQUEST
    elif isinstance(result, int):
        assert 2 <= result <= PID_MAX
    else:
        assert isinstance(result, Refused)
        assert len(result.why) < 200  # the log line stays short, whatever came in


@given(st.integers(min_value=2, max_value=PID_MAX), st.binary(max_size=50))
def test_every_pid_round_trips_and_what_follows_is_ignored(pid: int, rest: bytes) -> None:
    assert parse_request(b"%d\n" % pid + rest) == pid


@given(st.integers(min_value=1, max_value=65535))
def test_reply_is_the_port_and_a_newline(port: int) -> None:
    reply = format_reply(port)
    assert reply == f"{port}\n".encode()
    assert int(reply.splitlines()[0]) == port  # what portpicker does with it


def test_refusal_is_an_empty_reply() -> None:
    assert format_reply(None) == b""
    with pytest.raises(ValueError):
        format_reply(70000)



def test_the_process_itself_and_its_ancestors_count() -> None:
    tree = {500: 400, 400: 300, 300: 1, 1: 0}
    for pid in (500, 400, 300):
        assert is_ancestor(pid, 500, tree.get)
    assert not is_ancestor(1, 500, tree.get)  # init is never a holder
    assert not is_ancestor(600, 500, tree.get)
    assert not is_ancestor(500, 400, tree.get)  # a child is not an ancestor


def test_a_gap_or_a_loop_means_no() -> None:
    assert not is_ancestor(300, 500, {500: 400}.get)  # 400 is gone
    assert not is_ancestor(300, 500, {500: 400, 400: 500}.get)


def test_a_deep_chain_is_cut_off() -> None:
    deep = {n: n + 1 for n in range(2, MAX_ANCESTRY + 10)}
    assert is_ancestor(50, 2, deep.get)
    assert not is_ancestor(MAX_ANCESTRY + 9, 2, deep.get)


@given(st.dictionaries(st.integers(0, 50), st.integers(0, 50)), st.integers(0, 50), st.integers(0, 50))
def test_the_walk_ends_on_any_table(tree: dict[int, int], pid: int, start: int) -> None:
    # Any parent table, loops included, gives an answer; "yes" only on the chain.
    answer = is_ancestor(pid, start, tree.get)
    chain, current = [], start
    while current and current not in chain and current != 1:
        chain.append(current)
        current = tree.get(current, 0)
    assert answer == (pid in chain)

"""The one line framer (protocol.framing.LineFramer) by plain calls."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portlease.client.protocol.framing import LineFramer, LineTooLongError


def drain(framer: LineFramer) -> list[bytes]:
    out = []
    while (line := framer.next_line()) is not None:
        out.append(line)
    return out


def test_a_partial_line_waits_for_its_newline() -> None:
    f = LineFramer(100)
    f.feed(b'{"op":')
    assert f.next_line() is None and f.buffered == 6
    f.feed(b'"ping"')
    assert f.next_line() is None
    f.feed(b"}\nrest")
    assert f.next_line() == b'{"op":"ping"}'
    assert f.next_line() is None and f.buffered == 4


def test_many_lines_in_one_feed_come_out_one_by_one_in_order() -> None:
    f = LineFramer(100)
    f.feed(b"a\n\nbb\nccc\nd")
    assert drain(f) == [b"a", b"", b"bb", b"ccc"]  # an empty line is a line; the caller skips it
    assert f.buffered == 1
    f.feed(b"\n")
    assert drain(f) == [b"d"] and f.buffered == 0


def test_a_line_of_exactly_the_limit_passes_and_one_byte_more_does_not() -> None:
    f = LineFramer(8)
    f.feed(b"12345678\n")
    assert f.next_line() == b"12345678"
    f.feed(b"12345678")  # at the limit, no newline yet: still waiting
    assert f.next_line() is None
    f.feed(b"\n")
    assert f.next_line() == b"12345678"
    f.feed(b"123456789\n")  # over, though its newline is there
    with pytest.raises(LineTooLongError, match="longer than 8 bytes"):
        f.next_line()
    g = LineFramer(8)
    g.feed(b"123456789")  # over, and no newline: the stream cannot be resynchronised
    with pytest.raises(LineTooLongError):
        g.next_line()


def test_an_earlier_short_line_is_served_before_a_long_one_is_refused() -> None:
    f = LineFramer(4)
    f.feed(b"ok\n" + b"x" * 10)
    assert f.next_line() == b"ok"
    with pytest.raises(LineTooLongError):
        f.next_line()


def test_the_scanned_offset_is_remembered_and_reset_after_each_line() -> None:
    f = LineFramer(1 << 20)
    for _ in range(50):
        f.feed(b"x" * 100)
        assert f.next_line() is None
    # What was scanned is not scanned again, and nothing is skipped either:
    assert f._scanned == 5000
    f.feed(b"\nnext")
    assert f.next_line() == b"x" * 5000
    assert f._scanned == 0  # the next line is scanned from its start
    f.feed(b"\n")
    assert f.next_line() == b"next"


def test_clear_forgets_the_buffer_and_the_scan() -> None:
    f = LineFramer(10)
    f.feed(b"half a lin")
    assert f.next_line() is None
    f.clear()
    assert f.buffered == 0 and f._scanned == 0
    f.feed(b"new\n")
    assert f.next_line() == b"new"


lines_st = st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=20)


@settings(max_examples=300, deadline=None)
@given(lines_st, st.lists(st.integers(1, 40), min_size=1, max_size=50), st.booleans())
def test_however_the_bytes_are_cut_the_same_lines_come_out(
    lines: list[bytes], cuts: list[int], drain_between: bool
) -> None:
    data = b"".join(line + b"\n" for line in lines)
    f = LineFramer(30)
    got: list[bytes] = []
    pos, i = 0, 0
    while pos < len(data):
        n = cuts[i % len(cuts)]
        f.feed(data[pos:pos + n])
        pos += n
        i += 1
        if drain_between:
            got += drain(f)
    got += drain(f)
    assert got == lines and f.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(0, 100), st.lists(st.integers(1, 20), min_size=1))
def test_a_line_is_refused_exactly_when_it_is_longer_than_the_limit(
    limit: int, length: int, cuts: list[int]
) -> None:
    data = b"y" * length + b"\n"
    f = LineFramer(limit)
    pos, i = 0, 0
    try:
        while pos < len(data):
            f.feed(data[pos:pos + cuts[i % len(cuts)]])
            pos += cuts[i % len(cuts)]
            i += 1
            line = f.next_line()
            if line is not None:
                assert line == b"y" * length
                assert length <= limit
                return
    except LineTooLongError:
        assert length > limit
        return
    raise AssertionError("neither a line nor a refusal")

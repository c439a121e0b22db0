"""The allocator against a brute-force model, over random operation sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from portlease.broker.allocator import Allocator

LOW, HIGH = 100, 163  # small range: runs collide and fragment often


def first_run(free: list[bool], start: int, count: int) -> int | None:
    """Brute force: the first s >= start with free[s .. s+count) all true."""
    run = 0
    for port in range(start, len(free)):
        run = run + 1 if free[port] else 0
        if run >= count:
            return port - count + 1
    return None


def test_find_from_matches_brute_force_on_every_start() -> None:
    a = Allocator(LOW, HIGH)
    for start, count in [(100, 3), (104, 1), (110, 10), (130, 2), (150, 14)]:
        a.hold(start, count)
    free = [a.is_free(port) for port in range(65536)]
    for pos in range(LOW - 5, HIGH + 5):
        for count in range(1, 20):
            assert a._find_from(pos, count) == first_run(free, pos, count), (pos, count)


def test_excluded_ports_are_never_granted() -> None:
    a = Allocator(100, 199, excluded=[(120, 30)])
    got = []
    while (start := a.allocate(1, lambda p: True, 0.0)) is not None:
        got.append(start)
    assert sorted(got) == [p for p in range(100, 200) if not 120 <= p < 150]
    assert a.free_count == 0 and a.largest_free_run == 0


ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(1, 12), st.frozensets(st.integers(LOW, HIGH), max_size=6)),
        st.tuples(st.just("release"), st.integers(0, 1000), st.just(frozenset())),
        st.tuples(st.just("tick"), st.integers(1, 10), st.just(frozenset())),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_allocations_never_overlap_and_release_returns_exactly_their_ports(script: list) -> None:
    a = Allocator(LOW, HIGH, quarantine=5.0)
    held: list[tuple[int, int]] = []
    owner = [None] * 65536
    now = 0.0
    for op, n, unbindable in script:
        if op == "tick":
            now += n
            continue
        if op == "release":
            if held:
                start, count = held.pop(n % len(held))
                before = a.free_count
                a.unhold(start, count)
                for port in range(start, start + count):
                    owner[port] = None
                # Quarantined ports are held too, so only the run's own ports come back.
                assert a.free_count == before + count
            continue
        count = n
        cursor = a._cursor
        a.expire(now)
        free_before = [a.is_free(port) for port in range(65536)]
        checked: list[int] = []

        def bind_ok(port: int, checked: list[int] = checked, unbindable: frozenset[int] = unbindable) -> bool:
            checked.append(port)
            return port not in unbindable

        start = a.allocate(count, bind_ok, now)
        usable = [free_before[port] and port not in unbindable for port in range(65536)]
        if start is None:
            assert first_run(usable, LOW, count) is None
            continue
        # Every granted port was free, bind-checked and passed.
        for port in range(start, start + count):
            assert owner[port] is None and free_before[port] and port not in unbindable
            assert port in checked
            owner[port] = (start, count)
        # Next-fit: the first usable run at or after the cursor, else from the bottom.
        expect = first_run(usable, cursor, count)
        if expect is None or expect + count - 1 > HIGH:
            expect = first_run(usable, LOW, count)
        assert start == expect
        held.append((start, count))
    # Releasing everything and letting quarantines lapse gives the whole range back.
    for start, count in held:
        a.unhold(start, count)
    a.expire(now + 10)
    assert a.free_count == HIGH - LOW + 1
    assert a.largest_free_run == HIGH - LOW + 1


def test_just_released_port_is_handed_out_last() -> None:
    a = Allocator(100, 109)
    ok = lambda p: True  # noqa: E731
    first = a.allocate(1, ok, 0.0)
    assert first == 100
    a.unhold(first, 1)
    seen = [a.allocate(1, ok, 0.0) for _ in range(10)]
    assert seen == [101, 102, 103, 104, 105, 106, 107, 108, 109, 100]


def test_exhausted_returns_none_and_reports_largest_run() -> None:
    a = Allocator(100, 109)
    ok = lambda p: True  # noqa: E731
    a.hold(103, 1)
    assert a.allocate(7, ok, 0.0) is None
    assert a.largest_free_run == 6
    assert a.allocate(6, ok, 0.0) == 104


def test_bind_failure_quarantines_then_retries_after_the_period() -> None:
    a = Allocator(100, 101, quarantine=5.0)
    assert a.allocate(2, lambda p: p != 100, 0.0) is None
    assert not a.is_free(100)  # quarantined
    assert a.allocate(2, lambda p: True, 4.9) is None
    assert a.allocate(2, lambda p: True, 5.0) == 100


@settings(max_examples=40, deadline=None)  # each example builds two 65536-port trees
@given(st.lists(st.tuples(st.booleans(), st.integers(LOW, HIGH), st.integers(1, 12)), max_size=60))
def test_the_lazily_settled_tree_equals_one_built_from_scratch(ops: list[tuple[bool, int, int]]) -> None:
    """Tree updates are deferred until a search or a query; the result must not differ."""
    a = Allocator(LOW, HIGH)
    held: list[tuple[int, int]] = []
    for hold, start, count in ops:
        count = min(count, HIGH + 1 - start)
        if hold or not held:
            a.hold(start, count)
            held.append((start, count))
        else:
            a.unhold(*held.pop(start % len(held)))
    free = [a.is_free(port) for port in range(65536)]
    longest = max((len(run) for run in "".join("1" if f else "0" for f in free).split("0")), default=0)
    assert a.largest_free_run == longest
    fresh = Allocator(LOW, HIGH)
    fresh._holds = list(a._holds)
    fresh._build()
    assert (a._best, a._pre, a._suf) == (fresh._best, fresh._pre, fresh._suf)

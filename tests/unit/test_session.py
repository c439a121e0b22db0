"""The client session core, by plain calls: bytes in, bytes and results out."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portlease.client import protocol as p
from portlease.client import session as session_module
from portlease.client.grant import Lease
from portlease.client.protocol.errors import (
    ConnectionLost,
    Exhausted,
    LeaseLost,
    NotFound,
    QuotaExceeded,
    VersionMismatch,
)
from portlease.client.session import RECONNECT_MAX_DELAY, Backoff, Call, Dropped, Retry, Session


def lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


def reply(**fields: Any) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def welcome(hello_id: int, pid: int = 42) -> bytes:
    return reply(reply="hello", id=hello_id, version=1, broker="test", pid=pid)


def granted(rid: int, port: int, token: str, ttl: float = 120.0) -> bytes:
    return reply(reply="granted", id=rid, ports=[port], token=token, ttl=ttl)


def deliver(s: Session, data: bytes) -> list[Call[Any]]:
    s.feed(data)
    done = []
    while (event := s.next_event()) is not None:
        if isinstance(event, Call):
            done.append(event)
    return done


def test_a_new_socket_says_hello_in_the_same_write_as_the_first_request() -> None:
    s = Session("t")
    s.new_socket()
    call = s.lease(2, note="n")
    first = lines(s.send(call))
    assert [m["op"] for m in first] == ["hello", "lease"]
    assert first[0]["client"] == "t" and first[0]["version"] == p.PROTOCOL_VERSION
    assert first[1]["count"] == 2 and first[1]["note"] == "n"
    assert [m["op"] for m in lines(s.send(s.ping()))] == ["ping"]  # hello only once
    done = deliver(s, welcome(first[0]["id"]) + granted(first[1]["id"], 20000, "tok"))
    assert done == [call] and s.broker_pid == 42 and s.welcomed
    held = call.result()
    assert held.ports == (20000,) and s.leases == {"tok": held}


def test_reclaims_of_every_held_lease_ride_on_the_first_write_of_a_reconnect() -> None:
    s = Session("t")
    s.new_socket()
    calls = [s.lease(1) for _ in range(3)]
    sent = lines(s.send(*calls))
    deliver(s, welcome(sent[0]["id"]) + b"".join(
        granted(m["id"], 20000 + i, f"t{i}") for i, m in enumerate(sent[1:])))
    held = [c.result() for c in calls]
    s.connection_lost("broker restarted", retry=True)
    s.new_socket()
    ping = s.ping()
    out = lines(s.send(ping))
    assert [m["op"] for m in out] == ["hello", "reclaim", "reclaim", "reclaim", "ping"]
    assert sorted(m["token"] for m in out[1:4]) == ["t0", "t1", "t2"]
    ids = [m["id"] for m in out]
    assert len(set(ids)) == len(ids)  # ids never repeat across sockets
    # The broker kept two; one had lapsed.
    answer = welcome(out[0]["id"], pid=43)
    for m in out[1:4]:
        if m["token"] == "t1":
            answer += reply(reply="error", id=m["id"], code="not-found", message="gone")
        else:
            answer += reply(reply="reclaimed", id=m["id"], ports=[0])
    lost: list[tuple[Lease, LeaseLost]] = []
    s._on_lost = lambda lease, exc: lost.append((lease, exc))
    assert deliver(s, answer + reply(reply="pong", id=out[4]["id"])) == [ping]
    assert s.broker_pid == 43 and set(s.leases) == {"t0", "t2"}
    assert [lease for lease, _ in lost] == [held[1]] and held[1].lost is lost[0][1]
    assert "not-found" in str(held[1].lost)
    with pytest.raises(LeaseLost):
        s.lease(1)  # raised once by the next lease
    s.lease(1)
    assert s.release(held[1]) is None and held[1].released  # acknowledging a loss sends nothing


@pytest.mark.parametrize(
    ("code", "exc_type", "largest"),
    [("exhausted", Exhausted, 7), ("quota", QuotaExceeded, None), ("not-found", NotFound, None)],
)
def test_every_error_reply_becomes_its_exception_with_largest(
    code: str, exc_type: type[Exception], largest: int | None
) -> None:
    s = Session("t")
    s.new_socket()
    for make in (lambda: s.lease(8), lambda: s.renew("x"), lambda: s.detach("x"),
                 lambda: s.reclaim("x"), s.status, s.ping):
        call = make()
        sent = lines(s.send(call))
        if sent[0]["op"] == "hello":
            deliver(s, welcome(sent[0]["id"]))
        deliver(s, reply(reply="error", id=sent[-1]["id"], code=code, message="no",
                         **({"largest": largest} if largest is not None else {})))
        with pytest.raises(exc_type) as exc:
            call.result()
        assert getattr(exc.value, "largest", None) == largest


def test_release_tolerates_not_found_for_a_lease_but_not_for_a_stranger_token() -> None:
    s = Session("t")
    s.new_socket()
    mine = Lease((20000,), "mine", 120.0)
    s.leases["mine"] = mine
    call = s.release(mine)
    assert call is not None and "mine" not in s.leases  # forgotten before the reply
    sent = lines(s.send(call))
    deliver(s, welcome(sent[0]["id"]) + reply(reply="error", id=sent[1]["id"], code="not-found",
                                               message="gone"))
    call.result()
    assert mine.released
    stranger = s.release("nobody")
    assert stranger is not None
    sent = lines(s.send(stranger))
    deliver(s, reply(reply="error", id=sent[0]["id"], code="not-found", message="gone"))
    with pytest.raises(NotFound):
        stranger.result()


def test_a_refused_hello_raises_and_an_unreadable_request_fails_the_oldest_call() -> None:
    s = Session("t")
    s.new_socket()
    first = s.ping()
    sent = lines(s.send(first))
    s.feed(reply(reply="error", id=sent[0]["id"], code="version", message="speak 2"))
    with pytest.raises(VersionMismatch):
        s.next_event()
    assert s.connection_lost("hello refused", retry=False) == [first]  # what a shell does next
    s.new_socket()
    a, b = s.ping(), s.ping()
    sent = lines(s.send(a, b))
    done = deliver(s, welcome(sent[0]["id"])
                   + reply(reply="error", id=None, code="bad-request", message="?"))
    assert done == [a] and not b.done


def test_connection_lost_fails_calls_in_flight_but_not_abandoned_ones() -> None:
    s = Session("t")
    s.new_socket()
    waited, given_up = s.lease(1), s.lease(1)
    s.send(waited, given_up)
    s.abandon(given_up)
    failed = s.connection_lost("hang-up", retry=True)
    assert failed == [waited] and isinstance(waited.error, Dropped)
    with pytest.raises(Dropped):
        waited.result()
    assert not s.has_data_to_send and s.pending == 0
    later = s.ping()
    s.new_socket()
    s.send(later)
    (final,) = s.connection_lost("closed", retry=False)
    assert type(final.error) is ConnectionLost


@pytest.mark.parametrize("abandon_after_reply", [False, True])
def test_a_grant_nobody_waits_for_is_released(abandon_after_reply: bool) -> None:
    s = Session("t")
    s.new_socket()
    call = s.lease(3)
    sent = lines(s.send(call))
    if not abandon_after_reply:
        s.abandon(call)
    done = deliver(s, welcome(sent[0]["id"]) + granted(sent[1]["id"], 20000, "orphan"))
    if abandon_after_reply:
        assert done == [call]
        s.abandon(call)
    else:
        assert done == []
    assert s.has_data_to_send and s.leases == {}
    (undo,) = lines(s.data_to_send())
    assert undo["op"] == "release" and undo["token"] == "orphan"
    assert deliver(s, reply(reply="released", id=undo["id"], ports=[20000])) == []


def test_backoff_deadline_is_the_longest_ttl_and_at_least_the_timeout() -> None:
    s = Session("t", timeout=5.0)
    assert s.reconnect_backoff(100.0).deadline == 105.0
    s.leases["a"] = Lease((1,), "a", 30.0)
    s.leases["b"] = Lease((2,), "b", 120.0)
    assert s.reconnect_backoff(100.0).deadline == 220.0


def test_a_dropped_request_is_retried_once_then_only_on_fresh_sockets_until_the_deadline() -> None:
    s = Session("t", timeout=1.0)
    for reclaim, fresh in ((True, False), (False, True)):
        retry = Retry(s, reclaim=reclaim)
        assert retry.after_drop(fresh=fresh, now=0.0) == 0.0
        assert retry.after_drop(fresh=fresh, now=0.0) is None
    assert Retry(s, reclaim=False).after_drop(fresh=False, now=0.0) is None

    retry = Retry(s, reclaim=True)
    assert retry.after_drop(fresh=True, now=0.0) == 0.0
    now, waits = 0.0, []
    while (delay := retry.after_drop(fresh=True, now=now)) is not None:
        assert delay > 0
        waits.append(delay)
        now += delay
    assert waits[0] < waits[-1] <= RECONNECT_MAX_DELAY
    assert now == pytest.approx(1.0)  # the schedule ends at the deadline: the timeout here


@given(st.floats(min_value=0.1, max_value=300), st.lists(st.floats(min_value=0, max_value=1),
                                                         max_size=200))
def test_backoff_waits_grow_to_the_cap_and_stop_at_the_deadline(
    span: float, gaps: list[float]
) -> None:
    b = Backoff(0.0, span)
    now, previous = 0.0, 0.0
    for gap in gaps:
        delay = b.next_delay(now)
        if now >= span:
            assert delay is None
            return
        assert delay is not None
        assert 0 < delay <= RECONNECT_MAX_DELAY and now + delay <= span + 1e-9
        assert delay >= min(previous, span - now) - 1e-9  # never shorter than before, short of the end
        previous = delay
        now += delay + gap
    assert b.next_delay(span) is None


@settings(max_examples=60)
@given(st.lists(st.sampled_from(["lease", "ping", "status"]), min_size=1, max_size=20),
       st.lists(st.integers(min_value=1, max_value=50), max_size=40), st.data())
def test_pipelined_replies_in_any_chunking_reach_their_calls(
    ops: list[str], cuts: list[int], data: st.DataObject
) -> None:
    s = Session("t")
    s.new_socket()
    calls: list[Call[Any]] = [getattr(s, op)() for op in ops]
    # Sent in a few writes, as concurrent tasks would.
    sent: list[dict[str, Any]] = []
    pending = list(calls)
    while pending:
        n = data.draw(st.integers(min_value=1, max_value=len(pending)))
        sent += lines(s.send(*pending[:n]))
        pending = pending[n:]
    answer = b""
    for i, m in enumerate(sent):
        if m["op"] == "hello":
            answer += welcome(m["id"])
        elif m["op"] == "lease":
            answer += granted(m["id"], 20000 + i, f"tok{i}")
        elif m["op"] == "ping":
            answer += reply(reply="pong", id=m["id"])
        else:
            answer += reply(reply="status", id=m["id"], leases=[], summary={
                "range": [20000, 20099], "leases": 0, "ports_held": 0, "ports_free": 100,
                "largest_free_run": 100, "clients": 1, "ttl": 120.0})
    done: list[Call[Any]] = []
    at = 0
    for cut in cuts:  # the reply bytes arrive in arbitrary pieces
        done += deliver(s, answer[at:at + cut])
        at += cut
    done += deliver(s, answer[at:])
    assert done == calls  # each call completed once, in order
    tokens = [c.result().token for c in calls if isinstance(c.request, p.Lease)]
    assert len(tokens) == len(set(tokens)) == ops.count("lease")
    assert set(s.leases) == set(tokens) and s.pending == 0


def test_the_core_does_no_io_of_its_own() -> None:
    tree = ast.parse(Path(session_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    banned = {"socket", "select", "selectors", "threading", "time", "trio", "anyio", "asyncio"}
    assert not imported & banned, imported & banned


def test_a_reply_far_longer_than_a_request_line_is_read() -> None:
    s = Session("t")
    s.new_socket()
    call = s.status()
    sent = lines(s.send(call))
    infos = [{"ports": [20000 + i], "state": "detached", "granted": 0.0, "note": "n" * 256}
             for i in range(1000)]
    big = reply(reply="status", id=sent[1]["id"], leases=infos, more=False, summary={
        "range": [20000, 20999], "leases": 1000, "ports_held": 1000, "ports_free": 0,
        "largest_free_run": 0, "clients": 1, "ttl": 120.0})
    assert len(big) > 8 * p.MAX_LINE
    done = deliver(s, welcome(sent[0]["id"]) + big)
    assert done == [call] and len(call.result().leases) == 1000


def test_a_reconnect_round_sleeps_on_the_backoff_then_gives_the_leases_up() -> None:
    from portlease.client.protocol.errors import UnsafeSocket
    from portlease.client.session import GiveUp, Reconnect

    s = Session("t", timeout=1.0)
    held = Lease((20000,), "tok", 2.0)
    s.leases["tok"] = held
    round_ = Reconnect(s, now=0.0)
    now, slept = 0.0, []
    while not isinstance(step := round_.after_failure(OSError("refused"), now), GiveUp):
        slept.append(step)
        now += step
    assert slept[0] == 0.02 and max(slept) <= RECONNECT_MAX_DELAY
    assert now == pytest.approx(2.0)  # the longest TTL at stake
    assert isinstance(step.error, ConnectionLost) and "refused" in str(step.error)
    assert held.lost is not None and not s.leases
    # An unsafe socket ends a round at once, with that very error.
    s.leases["t2"] = other = Lease((20001,), "t2", 60.0)
    unsafe = UnsafeSocket("not yours")
    step = Reconnect(s, now=0.0).after_failure(unsafe, 0.0)
    assert isinstance(step, GiveUp) and step.error is unsafe and other.lost is not None

"""The conversation rules (protocol.conversation) by plain calls, and both sides that follow them."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portlease.broker.allocator import Allocator
from portlease.broker.core import BrokerCore
from portlease.broker.core import Session as BrokerSession
from portlease.broker.leases import Instant, LeaseTable, Limits, Peer
from portlease.client import protocol as p
from portlease.client.protocol.conversation import Outstanding, hello_gate
from portlease.client.session import Call, Session

T0 = Instant(mono=100.0, wall=1_700_000_000.0)

NOT_HELLO: list[p.Request] = [
    p.Lease(id=1, count=1), p.Release(id=2, token="t"), p.Renew(id=3, token="t"),
    p.Detach(id=4, token="t"), p.Reclaim(id=5, token="t"), p.Status(id=6), p.Ping(id=7),
    p.Metrics(id="m"),
]


# ---------------------------------------------------------------- rule 1: hello first


@pytest.mark.parametrize("request_", NOT_HELLO, ids=lambda r: type(r).__name__)
def test_every_request_before_hello_is_refused_with_its_own_id(request_: p.Request) -> None:
    refused = hello_gate(False, request_)
    assert isinstance(refused, p.Error) and refused.code is p.ErrorCode.HELLO_REQUIRED
    assert refused.id == request_.id
    assert refused.message == p.HELLO_REQUIRED_MESSAGE
    # The message shows a hello line that is itself accepted.
    shown = p.decode_request(refused.message.removeprefix("send ").removesuffix(" first").encode())
    assert isinstance(shown, p.Hello) and hello_gate(False, shown) is None
    assert hello_gate(True, request_) is None


def test_hello_is_refused_only_for_its_version_and_may_be_repeated() -> None:
    for said in (False, True):
        assert hello_gate(said, p.Hello(id=1, version=p.PROTOCOL_VERSION)) is None
        wrong = hello_gate(said, p.Hello(id=2, version=p.PROTOCOL_VERSION + 1))
        assert isinstance(wrong, p.Error) and wrong.code is p.ErrorCode.VERSION and wrong.id == 2
        assert f"version {p.PROTOCOL_VERSION + 1}" in wrong.message


def _core() -> BrokerCore:
    tokens = (f"{i:032x}" for i in itertools.count(1))
    return BrokerCore(table=LeaseTable(Allocator(40000, 40009), Limits()), ttl=30.0,
                      new_token=lambda: next(tokens), bind_ok=lambda port: True, pid=4321)


requests = st.one_of(
    st.builds(p.Hello, id=st.integers(0, 99), version=st.sampled_from([p.PROTOCOL_VERSION, 0, 2])),
    st.sampled_from(NOT_HELLO),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(requests, max_size=12))
def test_the_broker_core_refuses_exactly_what_the_rule_refuses(sequence: list[p.Request]) -> None:
    core = _core()
    session = BrokerSession(id=1, peer=Peer(pid=50, uid=1000, gid=1000))
    said = False
    for req in sequence:
        rule = hello_gate(said, req)
        reply = core.handle(session, req, T0, 1).reply if not isinstance(req, p.Metrics) else None
        if rule is not None:
            if reply is not None:
                assert reply == rule
        else:
            if reply is not None:
                assert not (isinstance(reply, p.Error) and reply.code in (
                    p.ErrorCode.HELLO_REQUIRED, p.ErrorCode.VERSION))
            said = said or isinstance(req, p.Hello)
        assert session.hello == said


# ---------------------------------------------------------------- rules 2 and 3: order, id null


def test_replies_are_matched_by_id_and_a_null_id_error_takes_the_oldest() -> None:
    out: Outstanding[str] = Outstanding()
    for rid, name in [(1, "a"), (2, "b"), ("x", "c")]:
        out.sent(rid, name)
    assert len(out) == 3 and out.oldest() == "a" and list(out) == ["a", "b", "c"]
    assert out.answer(p.Pong(id=2)) == "b"
    assert out.answer(p.Pong(id=2)) is None  # answered already
    assert out.answer(p.Pong(id=99)) is None  # never ours
    assert out.answer(p.Pong(id=None)) is None  # only an error may lack its id
    assert out.answer(p.Error(id=None, code=p.ErrorCode.BAD_REQUEST, message="?")) == "a"
    assert out.oldest() == "c"
    assert out.clear() == ["c"] and not out and out.oldest() is None
    assert out.answer(p.Error(id=None, code=p.ErrorCode.BUSY, message="?")) is None


def test_an_id_is_outstanding_once() -> None:
    out: Outstanding[int] = Outstanding()
    out.sent(1, 1)
    with pytest.raises(ValueError, match="already outstanding"):
        out.sent(1, 2)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=40))
def test_a_broker_that_answers_in_order_has_every_reply_matched_to_its_request(
    steps: list[tuple[bool, bool]],
) -> None:
    # A model broker: it answers the oldest unanswered request (rule 2), and
    # sometimes cannot read its id (rule 3). Each step sends, or answers.
    out: Outstanding[int] = Outstanding()
    queue: list[int] = []
    ids = itertools.count()
    for send, unreadable in steps:
        if send or not queue:
            rid = next(ids)
            out.sent(rid, rid)
            queue.append(rid)
            continue
        expected = queue.pop(0)
        reply = (p.Error(id=None, code=p.ErrorCode.BAD_REQUEST, message="?") if unreadable
                 else p.Pong(id=expected))
        assert out.answer(reply) == expected
    assert list(out) == queue


def _lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


def test_the_client_session_follows_the_rules() -> None:
    s = Session("t")
    s.new_socket()
    first, second = s.ping(), s.status()
    sent = _lines(s.send(first, second))
    assert sent[0]["op"] == "hello"  # rule 1: a new socket's first line
    welcome = {"reply": "hello", "id": sent[0]["id"], "version": 1, "broker": "b", "pid": 1}
    unreadable = {"reply": "error", "id": None, "code": "bad-request", "message": "?"}
    s.feed(json.dumps(welcome).encode() + b"\n" + json.dumps(unreadable).encode() + b"\n")
    events = []
    while (event := s.next_event()) is not None:
        events.append(event)
    # The handshake is matched by its id; the null-id error is the oldest call's.
    assert events == [True, first] and s.pending == 1
    assert isinstance(first, Call) and isinstance(first.reply, p.Error)
    assert second.reply is None

"""broker/claims.py against the real kernel: abstract names, pending claims, the fd limit."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from portlease.broker.claims import Claims, claim_name, presence_name
from portlease.client.host import procnet
from testblocks import claim_test_block


@pytest.fixture
def base() -> Iterator[int]:
    """The first of 100 ports no other test or suite on this host claims."""
    start, block = claim_test_block()
    try:
        yield start
    finally:
        block.close()


def other_holds(port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(claim_name(port))
    return s


def free(port: int) -> bool:
    """Whether anyone could take the claim on ``port`` now."""
    try:
        other_holds(port).close()
    except OSError as exc:
        assert exc.errno == errno.EADDRINUSE
        return False
    return True


def test_a_claim_is_held_until_released_and_refused_to_anyone_else(base: int) -> None:
    claims = Claims()
    assert claims.take(base) and claims.take(base)  # twice: still one claim
    assert len(claims) == 1 and base in claims and not free(base)
    with pytest.raises(OSError) as exc:
        other_holds(base)
    assert exc.value.errno == errno.EADDRINUSE
    found = procnet.port_claims(base, base + 99)
    assert list(found) == [base] and found[base].name == f"portlease/port/{base}"
    claims.release([base, base + 1])  # one never held: skipped
    assert free(base) and len(claims) == 0


def test_a_claim_held_elsewhere_is_in_use(base: int) -> None:
    holder = other_holds(base)
    claims = Claims()
    try:
        assert not claims.take(base)
        assert claims.taken_elsewhere == 1 and len(claims) == 0
    finally:
        holder.close()
    assert claims.take(base)
    claims.close()


def test_only_stream_names_count(base: int) -> None:
    # Abstract names are kept apart per socket type: a datagram socket of the
    # same name neither blocks a claim nor shows as one.
    dgram = other_holds(base, socket.SOCK_DGRAM)
    claims = Claims()
    try:
        assert claims.take(base)
        assert procnet.port_claims(base, base)[base].inode != 0
        assert len([n for n in procnet.abstract_names(f"portlease/port/{base}")]) == 1
    finally:
        dgram.close()
        claims.close()


def test_pending_claims_are_kept_or_given_back_when_settled(base: int) -> None:
    claims = Claims()
    held_before = base + 10
    assert claims.take(held_before)
    for port in (base, base + 1, base + 2, held_before):
        assert claims.take_pending(port)
    claims.settle(kept=[(base + 1, 1)])
    assert base + 1 in claims and held_before in claims
    assert free(base) and free(base + 2)
    claims.settle()  # nothing pending: nothing changes
    assert len(claims) == 2
    claims.close()
    assert free(base + 1) and free(held_before)


def test_a_run_is_taken_whole_or_not_at_all(base: int) -> None:
    holder = other_holds(base + 3)
    claims = Claims()
    try:
        assert claims.take_run(base, 5) == base + 3
        assert len(claims) == 0 and free(base) and free(base + 2)
        assert claims.take_run(base + 4, 3) is None and len(claims) == 3
    finally:
        holder.close()
        claims.close()


def test_presence_name() -> None:
    assert presence_name(1000, 42) == "\0portlease/broker/1000/42"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind("\0portlease/broker/4242424/7")
    try:
        assert (4242424, 7) in procnet.live_brokers()
    finally:
        s.close()


def test_out_of_file_descriptors_says_so(base: int) -> None:
    # In a child: the limit is lowered for the whole process.
    code = textwrap.dedent(f"""
        import errno, resource
        from portlease.broker.claims import Claims
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
        claims = Claims()
        for port in range({base}, {base} + 100):
            try:
                claims.take(port)
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                print(len(claims), exc.strerror)
                break
        claims.release(range({base}, {base} + 5))
        assert claims.take({base})
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    held, message = out.stdout.split(" ", 1)
    assert 0 < int(held) < 40
    assert "out of file descriptors" in message and f"{held} held, open-file limit 40" in message

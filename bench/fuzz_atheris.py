"""Open-ended fuzzing of the broker's request handling: coverage-guided with atheris, else random.

    pip install atheris
    python bench/fuzz_atheris.py -max_total_time=600            # ten minutes of libFuzzer
    python bench/fuzz_atheris.py -atheris_runs=200000 corpus/   # keep a corpus
    python bench/fuzz_atheris.py --random 100000                # no atheris: seeded random mutation

Without a corpus directory libFuzzer starts from a temporary one seeded with
valid requests. Without atheris (it has no wheel for every Python), or with
``--random N``, the same target gets N inputs made by mutating the seeds at
random (bytes flipped, cut, spliced, repeated): no coverage guidance, but the
same checks.

Each input is split into request lines and fed to the broker's protocol core
(:meth:`BrokerCore.handle_line`, pure: a real lease table and allocator, no
sockets, no clock) on a fresh connection, while another connection holds a
lease. A crash is any of: ``handle_line`` raising, a reply that cannot be
encoded and read back, an ``internal`` error, an id not echoed, the victim's
lease changing, a port in two leases, or ports not coming back once the fuzzed
connection closes and its detached leases are released. The bounded version
runs in the default suite (tests/inproc/test_fuzz.py, hypothesis).
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import tempfile
from collections.abc import Callable
from typing import Any

try:
    import atheris
except ImportError:  # no wheel for this Python, or not installed
    atheris = None

_instrument: Any = atheris.instrument_imports() if atheris is not None else None
if _instrument is not None:
    _instrument.__enter__()
import msgspec  # noqa: E402

from portlease.broker.allocator import Allocator  # noqa: E402
from portlease.broker.core import BrokerCore, Session  # noqa: E402
from portlease.broker.leases import Instant, LeaseTable, Limits, Peer  # noqa: E402
from portlease.client import protocol as p  # noqa: E402

if _instrument is not None:
    _instrument.__exit__(None, None, None)

RANGE = (20900, 20949)  # never bound: the bind check is a stub, the allocator logic is what is fuzzed
NOW = Instant(mono=1000.0, wall=1_700_000_000.0)
_tokens = (f"{i:032x}" for i in itertools.count(1))
CORE = BrokerCore(
    table=LeaseTable(Allocator(*RANGE), Limits(max_ports_per_request=16, max_ports_per_uid=40,
                                                max_leases_per_connection=8)),
    ttl=30.0, new_token=lambda: next(_tokens), bind_ok=lambda port: True, pid=os.getpid(),
)
VICTIM = Session(id=1, peer=Peer(pid=os.getpid(), uid=4242, gid=4242), hello=True)
_victim_reply = CORE.handle_line(VICTIM, b'{"op":"lease","id":1,"count":3,"note":"victim"}', NOW, 1).reply
assert isinstance(_victim_reply, p.Granted), _victim_reply
VICTIM_TOKEN, VICTIM_PORTS = _victim_reply.token, _victim_reply.ports
_next = itertools.count(2)


def check_victim() -> None:
    record = CORE.table.get(VICTIM_TOKEN)
    if record is None or record.ports != VICTIM_PORTS or record.connection != VICTIM.id:
        raise AssertionError(f"the victim's lease changed: {record}")


def one_input(hello: bool, uid: int, body: bytes) -> None:
    """Feed up to eight request lines of ``body`` to a fresh connection; raise on any crash."""
    lines = [line for line in body.split(b"\n")[:8] if line.strip()]
    session = Session(id=next(_next), peer=Peer(pid=1, uid=uid, gid=uid), hello=hello)
    for line in lines:
        decoded = p.decode_request(line) if _decodes(line) else None
        if isinstance(decoded, p.Metrics) and session.hello:
            continue  # answered by the shell, which holds the counters
        reply = CORE.handle_line(session, line, NOW, 2).reply
        if p.decode_reply(p.encode(reply)[:-1]) != reply:
            raise AssertionError(f"reply does not read back: {reply!r}")
        if isinstance(reply, p.Error) and reply.code == p.ErrorCode.INTERNAL:
            raise AssertionError(f"internal error for {line[:200]!r}")
        if decoded is not None and reply.id != decoded.id:
            raise AssertionError(f"id not echoed: {decoded!r} -> {reply!r}")
    seen: set[int] = set()
    for record in CORE.table:
        if seen & set(record.ports):
            raise AssertionError("a port is in two leases")
        seen |= set(record.ports)
    check_victim()
    CORE.closed(session)
    table = CORE.table
    for record in [r for r in table if r.token != VICTIM_TOKEN]:
        table.release(record.token)
    a = table.allocator
    if a.free_count + len(VICTIM_PORTS) != a.size:
        raise AssertionError(f"ports leaked: {a.size - a.free_count - len(VICTIM_PORTS)}")
    check_victim()


def _decodes(line: bytes) -> bool:
    try:
        p.decode_request(line)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return True


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    assert atheris is not None
    fdp = atheris.FuzzedDataProvider(data)
    hello = fdp.ConsumeBool()
    uid = fdp.PickValueInList([4242, 1000, 0])
    one_input(hello, uid, fdp.ConsumeBytes(fdp.remaining_bytes()))


SEEDS = [
    b'{"op":"hello","id":0,"version":1}',
    b'{"op":"lease","id":1,"count":3,"ttl":5.0,"note":"x","detach":true}',
    b'{"op":"release","id":2,"token":"00000000000000000000000000000000"}',
    b'{"op":"renew","id":"r","token":"x"}',
    b'{"op":"detach","id":3,"token":"x"}',
    b'{"op":"reclaim","id":4,"token":"x"}',
    b'{"op":"status","id":5}',
    b'{"op":"ping","id":6}',
]


def seed_corpus() -> str:
    """A directory of valid request lines for libFuzzer to start from (JSON is hard to guess)."""
    d = tempfile.mkdtemp(prefix="portlease-atheris-seeds-")
    for i, seed in enumerate(SEEDS):
        with open(os.path.join(d, f"seed{i}"), "wb") as f:
            f.write(b"\x01\x00" + seed + b"\n" + SEEDS[(i + 1) % len(SEEDS)])
    return d


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    edits: list[Callable[[], None]] = [
        lambda: out.__setitem__(rng.randrange(len(out)), rng.randrange(256)),
        lambda: out.__delitem__(slice(rng.randrange(len(out)), None)),
        lambda: out.extend(rng.choice(SEEDS)),
        lambda: out.extend(b"\n" + rng.choice(SEEDS)),
        lambda: out.__setitem__(slice(rng.randrange(len(out)), None), out[: rng.randrange(len(out))]),
        lambda: out.extend(rng.choice([b"9" * 25, b"-1", b"null", b'"', b"{}", b"[]", b"\\u0000"])),
    ]
    for _ in range(rng.randint(1, 4)):
        if out:
            rng.choice(edits)()
        else:
            out.extend(rng.choice(SEEDS))
    return bytes(out)


def random_run(n: int, seed: int = 0) -> None:
    """``n`` inputs made by mutating the seeds at random (no atheris needed)."""
    rng = random.Random(seed)
    for i in range(n):
        body = b"\n".join(_mutate(rng, rng.choice(SEEDS)) for _ in range(rng.randint(1, 8)))
        one_input(rng.random() < 0.8, rng.choice([4242, 1000, 0]), body)
        if (i + 1) % 10000 == 0:
            print(f"{i + 1} inputs, no crash", flush=True)
    print(f"{n} random inputs (seed {seed}), no crash")


def main() -> None:
    argv = list(sys.argv)
    if "--random" in argv or atheris is None:
        n = int(argv[argv.index("--random") + 1]) if "--random" in argv else 100_000
        if atheris is None:
            print("atheris is not installed: random mutation instead of coverage guidance")
        random_run(n)
        return
    if not any(os.path.isdir(a) for a in argv[1:]):
        argv.append(seed_corpus())
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""Coverage-guided fuzzing of the broker's request handling with atheris (optional).

    pip install atheris
    python bench/fuzz_atheris.py -max_total_time=600            # ten minutes
    python bench/fuzz_atheris.py -atheris_runs=200000 corpus/   # keep a corpus

Without a corpus directory it starts from a temporary one seeded with valid requests.

Each input is split into request lines and fed to ``Broker.dispatch`` in-process
(a real Broker with a real journal in a temporary directory), on a fresh
connection, while another connection holds a lease. A crash is any of: dispatch
raising, a reply that cannot be encoded and read back, an ``internal`` error,
the victim's lease changing, a port in two leases, or ports not coming back
once the fuzzed connection's leases are dropped. Runs for as long as libFuzzer
is told to; the tests' hypothesis version (tests/test_fuzz.py) is the bounded one.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import msgspec
    import trio

    from portlease.broker.config import Config
    from portlease.broker.leases import Peer
    from portlease.broker.notify import Notifier
    from portlease.broker.server import Broker, Connection
    from portlease.broker.state import Journal
    from portlease.client import protocol as p

RANGE = (20900, 20949)
_dir = tempfile.mkdtemp(prefix="portlease-atheris-")
BROKER = Broker(
    config=Config(port_min=RANGE[0], port_max=RANGE[1], ttl=30.0, max_ports_per_request=16,
                  max_ports_per_uid=40, max_leases_per_connection=8),
    journal=Journal(os.path.join(_dir, "state.jsonl")), notifier=Notifier(),
    bind_ok=lambda port: True,  # no sockets in the hot loop; the allocator logic is what is fuzzed
)
BROKER.restore()
VICTIM = Connection(id=1, peer=Peer(pid=os.getpid(), uid=4242, gid=4242), hello=True)
_next = [1]


async def _run(conn: Connection, lines: list[bytes]) -> list[p.Reply]:
    return [await BROKER.dispatch(conn, line) for line in lines]


_victim_reply = trio.run(_run, VICTIM, [b'{"op":"lease","id":1,"count":3,"note":"victim"}'])[0]
assert isinstance(_victim_reply, p.Granted)
VICTIM_TOKEN, VICTIM_PORTS = _victim_reply.token, _victim_reply.ports


def check_victim() -> None:
    record = BROKER.table.get(VICTIM_TOKEN)
    if record is None or record.ports != VICTIM_PORTS or record.connection != VICTIM.id:
        raise AssertionError(f"the victim's lease changed: {record}")


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    fdp = atheris.FuzzedDataProvider(data)
    hello = fdp.ConsumeBool()
    uid = fdp.PickValueInList([4242, 1000, 0])
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    lines = [line for line in body.split(b"\n")[:8] if line.strip()]
    _next[0] += 1
    conn = Connection(id=_next[0], peer=Peer(pid=1, uid=uid, gid=uid), hello=hello)
    replies = trio.run(_run, conn, lines)
    for line, reply in zip(lines, replies, strict=True):
        if p.decode_reply(p.encode(reply)[:-1]) != reply:
            raise AssertionError(f"reply does not read back: {reply!r}")
        if isinstance(reply, p.Error) and reply.code == p.ErrorCode.INTERNAL:
            raise AssertionError(f"internal error for {line[:200]!r}")
        try:
            request = p.decode_request(line)
        except msgspec.DecodeError:
            continue
        if reply.id != request.id:
            raise AssertionError(f"id not echoed: {request!r} -> {reply!r}")
    seen: set[int] = set()
    for record in BROKER.table:
        if seen & set(record.ports):
            raise AssertionError("a port is in two leases")
        seen |= set(record.ports)
    check_victim()
    table = BROKER.table
    for record in table.drop_connection(conn.id):
        BROKER.journal.ended(record)
    for record in [r for r in table if r.token != VICTIM_TOKEN]:
        BROKER.journal.ended(table.release(record.token))
    a = table.allocator
    if a.free_count + len(VICTIM_PORTS) != a.size:
        raise AssertionError(f"ports leaked: {a.size - a.free_count - len(VICTIM_PORTS)}")
    check_victim()


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


def main() -> None:
    argv = list(sys.argv)
    if not any(os.path.isdir(a) for a in argv[1:]):
        argv.append(seed_corpus())
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

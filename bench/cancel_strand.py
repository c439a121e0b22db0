"""How many detached leases an anyio cancellation strands on the broker.

Each try opens a connection and asks for a detached lease (one-hour TTL)
inside ``move_on_after`` with a random timeout of 0-3 ms, so the cancellation
lands anywhere: before the send, between the send and the grant, while the
connection closes. Afterwards ``status`` counts the leases still held: each is
one a caller never saw and nobody will release until its TTL.

    .venv/bin/python bench/cancel_strand.py --tries 3000 --backend asyncio --backend trio

The default suite runs 300 tries per event loop
(tests/process/test_async_client.py::test_cancellation_at_any_moment_strands_no_lease).
Before the fix, 300 tries stranded 60-176 leases on asyncio and 38-97 on trio
(the count moves with the machine's load); a client that strands them all
exhausts the 200-port range, which is reported as such.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from brokerproc import BrokerProc
from portlease.client import Exhausted, connect
from rawproto import Raw


def held(sock: str) -> int:
    raw = Raw(sock)
    try:
        return len(raw.call({"op": "status", "limit": 1000})["leases"])
    finally:
        raw.close()


async def tries(sock: str, n: int, seed: int) -> int:
    """Run ``n`` cancelled tries; return how many the caller actually got.

    Those the caller got are released at once, on a connection of their own,
    so that what stays on the broker is only what nobody was told of.
    """
    rng = random.Random(seed)
    got = 0
    async with connect(sock) as cleaner:
        for _ in range(n):
            token = None
            with anyio.move_on_after(rng.uniform(0, 0.003)):
                async with connect(sock) as conn:
                    token = (await conn.lease(1, detach=True, ttl=3600)).token
            if token is not None:
                got += 1
                await cleaner.release(token)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tries", type=int, default=3000)
    ap.add_argument("--backend", action="append", choices=["asyncio", "trio"])
    ap.add_argument("--range", default="31200-31399", help="the broker's port range")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cancel-strand-") as tmp:
        broker = BrokerProc(Path(tmp), range=args.range).start()
        try:
            for backend in args.backend or ["asyncio", "trio"]:
                before = held(broker.socket)
                t0 = time.monotonic()
                try:
                    got = anyio.run(tries, broker.socket, args.tries, args.seed, backend=backend)
                except Exhausted:
                    print(f"{backend}: the range ran out: {held(broker.socket) - before} "
                          "leases stranded before the end")
                    continue
                stranded = held(broker.socket) - before
                print(f"{backend}: {args.tries} tries, {got} completed, {stranded} detached leases "
                      f"stranded ({time.monotonic() - t0:.1f} s)")
        except BaseException:
            print(broker.log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            broker.stop()


if __name__ == "__main__":
    main()

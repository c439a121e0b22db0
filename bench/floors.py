#!/usr/bin/env python3
"""Minimal one-line servers on a Unix socket: the floors under any broker's reply.

    python bench/floors.py epoll|asyncio|trio PATH

Each answers every line it receives with one short line, and does nothing
else: no parsing, no state. ``bench/run.py`` times a raw client against them
(connect + one request + close, and a round trip on an open connection) in the
same rounds as portlease and portserver, so that "how far above the floor" is
measured, not remembered.

- ``epoll``: one thread, ``select.epoll``, non-blocking sockets, level-triggered:
  the least a Python server can do per request.
- ``asyncio``: ``asyncio.start_unix_server`` with streams, a task per connection.
- ``trio``: ``trio.serve_listeners``, a task per connection (portlease's old shell).
"""

from __future__ import annotations

import os
import select
import socket
import sys

REPLY = b'{"id":1,"reply":"pong"}\n'


def _listen(path: str) -> socket.socket:
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1024)
    return sock


def serve_epoll(path: str) -> None:
    listener = _listen(path)
    listener.setblocking(False)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    lfd = listener.fileno()
    while True:
        for fd, _events in ep.poll():
            if fd == lfd:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    conns[conn.fileno()] = (conn, bytearray())
                    ep.register(conn.fileno(), select.EPOLLIN)
                continue
            conn, buf = conns[fd]
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                del conns[fd]
                conn.close()
                continue
            buf += data
            n = buf.count(b"\n")
            if n:
                del buf[: buf.rfind(b"\n") + 1]
                conn.send(REPLY * n)  # a few dozen bytes: never a short write here


def serve_asyncio(path: str) -> None:
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readline():
                writer.write(REPLY)
                await writer.drain()
        finally:
            writer.close()

    async def main() -> None:
        if os.path.exists(path):
            os.unlink(path)
        server = await asyncio.start_unix_server(handle, path, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def serve_trio(path: str) -> None:
    import trio

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            async for data in stream:
                buf += data
                n = buf.count(b"\n")
                if n:
                    buf = buf[buf.rfind(b"\n") + 1:]
                    await stream.send_all(REPLY * n)
        except trio.BrokenResourceError:
            pass

    async def main() -> None:
        sock = trio.socket.from_stdlib_socket(_listen(path))
        await trio.serve_listeners(handle, [trio.SocketListener(sock)])

    trio.run(main)


SERVERS = {"epoll": serve_epoll, "asyncio": serve_asyncio, "trio": serve_trio}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in SERVERS:
        sys.exit(__doc__)
    SERVERS[sys.argv[1]](sys.argv[2])

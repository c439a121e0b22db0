"""procnet against real sockets and processes: what it sees is what this test bound."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from portlease.broker import kernel
from portlease.client.host import procnet
from portlease.client.host.procinfo import read_cmdline

V6 = kernel.has_ipv6()
KERNEL = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
needs_v6 = pytest.mark.skipif(not V6, reason="no IPv6 here")


@pytest.fixture
def base(port_range: str) -> int:
    return int(port_range.split("-")[0])


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def bind(held: list[socket.socket], family: socket.AddressFamily, kind: socket.SocketKind,
         addr: str, port: int, *, listen: bool = False) -> socket.socket:
    s = socket.socket(family, kind)
    held.append(s)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    if listen:
        s.listen()
    return s


def inode(s: socket.socket) -> int:
    return os.fstat(s.fileno()).st_ino


def only(port: int) -> procnet.NetSocket:
    found = procnet.sockets(range(port, port + 1))
    assert len(found) == 1, found
    return found[0]


def test_tcp_listener_ipv4(base: int, held: list[socket.socket]) -> None:
    s = bind(held, socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", base, listen=True)
    assert only(base) == procnet.NetSocket("tcp", 4, "127.0.0.1", base, True, inode(s), os.getuid())


def test_tcp_bound_but_not_listening_is_seen(base: int, held: list[socket.socket]) -> None:
    # Absent from /proc/net/tcp: this is the sock_diag half of procnet.
    if KERNEL < (6, 5):
        pytest.skip("the kernel lists bound-only TCP sockets from 6.5 on")
    s = bind(held, socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", base + 1)
    assert only(base + 1) == procnet.NetSocket("tcp", 4, "0.0.0.0", base + 1, False, inode(s), os.getuid())


@needs_v6
def test_tcp_bound_but_not_listening_ipv6(base: int, held: list[socket.socket]) -> None:
    if KERNEL < (6, 5):
        pytest.skip("the kernel lists bound-only TCP sockets from 6.5 on")
    s = bind(held, socket.AF_INET6, socket.SOCK_STREAM, "::1", base + 2)
    assert only(base + 2) == procnet.NetSocket("tcp", 6, "::1", base + 2, False, inode(s), os.getuid())


def test_udp_ipv4(base: int, held: list[socket.socket]) -> None:
    s = bind(held, socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0", base + 3)
    assert only(base + 3) == procnet.NetSocket("udp", 4, "0.0.0.0", base + 3, True, inode(s), os.getuid())


@needs_v6
def test_udp_and_tcp_ipv6(base: int, held: list[socket.socket]) -> None:
    u = bind(held, socket.AF_INET6, socket.SOCK_DGRAM, "::", base + 4)
    t = bind(held, socket.AF_INET6, socket.SOCK_STREAM, "::", base + 4, listen=True)
    found = sorted(procnet.sockets(range(base + 4, base + 5)), key=lambda s: s.proto)
    assert found == [
        procnet.NetSocket("tcp", 6, "::", base + 4, True, inode(t), os.getuid()),
        procnet.NetSocket("udp", 6, "::", base + 4, True, inode(u), os.getuid()),
    ]


@needs_v6
def test_v4_mapped_address_is_printed_as_such(base: int, held: list[socket.socket]) -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    held.append(s)
    s.bind(("::ffff:127.0.0.1", base + 5))
    assert only(base + 5).address == "::ffff:127.0.0.1"


def test_connected_sockets_are_not_listening(base: int, held: list[socket.socket]) -> None:
    lst = bind(held, socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", base + 6, listen=True)
    c = socket.create_connection(("127.0.0.1", base + 6))
    held.append(c)
    a, _ = lst.accept()
    held.append(a)
    found = procnet.sockets(range(base + 6, base + 7))
    assert {(s.inode, s.listening) for s in found} == {(inode(lst), True), (inode(a), False)}


def test_ports_filter_and_unfiltered_listing(base: int, held: list[socket.socket]) -> None:
    bind(held, socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", base + 7)
    bind(held, socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", base + 9)
    assert [s.port for s in procnet.sockets(range(base + 8, base + 9))] == []
    everything = {s.port for s in procnet.sockets()}
    assert {base + 7, base + 9} <= everything


def test_owners_and_all_owners_name_a_child_process(base: int, held: list[socket.socket]) -> None:
    code = (
        "import socket, sys\n"
        f"s = socket.socket(); s.bind(('127.0.0.1', {base + 10})); s.listen()\n"
        "print(s.fileno(), flush=True); sys.stdin.read()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        (sock,) = procnet.sockets(range(base + 10, base + 11))
        assert procnet.owners([sock.inode]) == {sock.inode: child.pid}
        mine = bind(held, socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", base + 11)
        assert procnet.all_owners([sock.inode, inode(mine), 0]) == {
            sock.inode: {child.pid}, inode(mine): {os.getpid()}}
        cmd = read_cmdline(child.pid)
        assert cmd is not None and cmd.startswith(sys.executable + " -c import socket")
    finally:
        child.kill()
        child.wait()
    assert procnet.owners([sock.inode]) == {}
    assert read_cmdline(child.pid) is None


def test_a_socket_shared_across_fork_has_every_holder(base: int, held: list[socket.socket]) -> None:
    s = bind(held, socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", base + 12)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE, pass_fds=[s.fileno()])
    try:
        assert procnet.all_owners([inode(s)]) == {inode(s): {os.getpid(), child.pid}}
        assert procnet.owners([inode(s)]) == {inode(s): min(os.getpid(), child.pid)}
    finally:
        child.kill()
        child.wait()


def test_descendants_follow_the_tree_and_only_live_processes() -> None:
    # sh starts a grandchild (sleep) and then waits; a sibling of sh is not below sh.
    child = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen(["sleep", "60"])
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        tree = procnet.descendants(child.pid)
        assert tree == {child.pid, grandchild}
        assert other.pid not in tree
        assert {child.pid, grandchild, other.pid} <= procnet.descendants(os.getpid())
        os.kill(grandchild, 9)
        # Reaped by sh (its wait returns), so sh exits and becomes a zombie until we reap it.
        child.wait()
        assert procnet.descendants(child.pid) == set()
        assert grandchild not in procnet.descendants(os.getpid())
    finally:
        for p in (child, other):
            p.kill()
            p.wait()


def test_squatters_are_the_sockets_outside_every_lease(base: int, held: list[socket.socket]) -> None:
    lo, hi = base + 20, base + 39
    bind(held, socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", base + 19, listen=True)  # below the range
    bind(held, socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", base + 20, listen=True)  # in a lease
    bind(held, socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", base + 22)  # in the same lease
    squat_tcp = bind(held, socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", base + 23)  # just past it
    squat_udp = bind(held, socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0", base + 39)  # the last port
    bind(held, socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0", base + 30)  # a one-port lease
    bind(held, socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0", base + 40)  # above the range
    found = procnet.squatters(lo, hi, [(base + 30, 1), (base + 20, 3)])
    assert [(s.port, s.inode) for s in found] == [
        (base + 23, inode(squat_tcp)), (base + 39, inode(squat_udp))]
    assert procnet.squatters(lo, hi, [(base + 20, 20)]) == []


def test_time_wait_is_not_a_squatter(held: list[socket.socket]) -> None:
    # A kernel-chosen port: TIME_WAIT outlives the test by a minute, so a fixed port would fail a rerun.
    lst = bind(held, socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 0, listen=True)
    port = lst.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = lst.accept()
    a.close()  # the side that closes first goes to TIME_WAIT: the one on the range's port
    c.close()
    lst.close()
    left = procnet.sockets(range(port, port + 1))
    assert left and all(s.inode == 0 and not s.listening for s in left), left
    assert procnet.squatters(port, port, []) == []


needs_root = pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to run as another uid")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture(scope="module")
def nobody_python() -> str:
    """An interpreter uid 65534 can run: this one, else the system's.

    pyenv's interpreters live under /root (mode 0700) and load their libpython
    from there, so `nobody` cannot start them; /usr/bin/python3 it can.
    """
    tried = []
    for candidate in dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3")]):
        if candidate is None or not os.path.exists(candidate):
            continue
        r = subprocess.run([*NOBODY, candidate, "-c", "import json, socket"], capture_output=True,
                           text=True, cwd="/")
        if r.returncode == 0:
            return candidate
        tried.append(f"{candidate}: {r.stderr.strip().splitlines()[-1:]}")
    pytest.skip(f"no Python interpreter that uid 65534 can run ({'; '.join(tried)})")


@needs_root
def test_another_users_socket_shows_its_uid_and_root_sees_its_owner(base: int,
                                                                    nobody_python: str) -> None:
    code = (
        "import socket, sys\n"
        f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', {base + 60}))\n"
        "print('ready', flush=True); sys.stdin.read()\n"
    )
    child = subprocess.Popen([*NOBODY, nobody_python, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        (sock,) = procnet.sockets(range(base + 60, base + 61))
        assert sock.uid == 65534
        # setpriv execs the interpreter, so the pid Popen knows is the socket's holder
        assert procnet.owners([sock.inode]) == {sock.inode: child.pid}
    finally:
        child.kill()
        child.wait()


@needs_root
def test_an_unprivileged_caller_sees_the_socket_but_not_roots_process(
    base: int, held: list[socket.socket], nobody_python: str
) -> None:
    s = bind(held, socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", base + 61, listen=True)
    # procnet imports nothing of portlease, so the other uid loads it from its file.
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('procnet', {procnet.__file__!r})\n"
        "procnet = importlib.util.module_from_spec(spec); sys.modules['procnet'] = procnet\n"
        "spec.loader.exec_module(procnet)\n"
        f"found = procnet.sockets(range({base + 61}, {base + 62}))\n"
        "owners = procnet.owners([x.inode for x in found])\n"
        "print(json.dumps([[x.inode, x.uid] for x in found])); print(json.dumps(owners))\n"
    )
    r = subprocess.run([*NOBODY, nobody_python, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    seen, owners = (json.loads(part) for part in r.stdout.splitlines())
    assert seen == [[inode(s), 0]]
    assert owners == {}

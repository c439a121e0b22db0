"""A process that exits holding a lease never hangs, whatever the broker is doing.

The case from the field: a program leaves a ``lease()`` context un-exited (a
generator that never finished, a global) and exits while the broker restarts,
so the client is reconnecting at that very moment. Each try restarts a real
broker (SIGKILL, then start) at a different moment 0-0.6 s before the process
exits; none may hang. The same for a forked child that exits while its parent
holds the lease: the child must neither hang nor end the parent's lease.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brokerproc import BrokerProc, Raw, wait_for_socket

HOLDER = r"""
import os, sys, time
from portlease.client import lease

sock, style = sys.argv[1], sys.argv[2]


def wait_then(what):
    delay = float(sys.stdin.readline())
    time.sleep(delay)
    what()


def held_by_a_generator():
    with lease(1, socket=sock, note="exit-test") as held:
        yield held


if style == "global":      # never exited: left to interpreter finalization
    HELD = lease(1, socket=sock, note="exit-test")
    print("ready", HELD.__enter__().port, flush=True)
    wait_then(lambda: sys.exit(0))
elif style == "generator":  # suspended inside its with block
    GEN = held_by_a_generator()
    print("ready", next(GEN).port, flush=True)
    wait_then(lambda: sys.exit(0))
elif style == "with":      # sys.exit from inside the block
    with lease(1, socket=sock, note="exit-test") as held:
        print("ready", held.port, flush=True)
        wait_then(lambda: sys.exit(0))
"""

FORK_PARENT = r"""
import os, sys, time
from portlease.client import lease

sock = sys.argv[1]
with lease(1, socket=sock, note="exit-test") as held:
    print("ready", held.port, flush=True)
    delay = float(sys.stdin.readline())
    pid = os.fork()
    if pid == 0:
        time.sleep(delay)
    else:
        os.waitpid(pid, 0)
        print("child-exited", flush=True)
        sys.stdin.readline()
if pid == 0:
    sys.exit(0)            # the child left the block: atexit and finalizers run
"""

STYLES = ("global", "generator", "with")
TRIES = 20


def _holder(broker: BrokerProc, style: str) -> tuple[subprocess.Popen[str], int]:
    code = FORK_PARENT if style == "fork" else HOLDER
    # A session of its own, so that a hung forked child can be killed with it.
    proc = subprocess.Popen([sys.executable, "-c", code, broker.socket, style],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[:1] == ["ready"], line
    return proc, int(line[1])


def _restart_without_waiting(broker: BrokerProc) -> None:
    broker.kill()
    broker.start(wait=False)


def _kill_all(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _finish(proc: subprocess.Popen[str], what: str) -> None:
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        _kill_all(proc)
        pytest.fail(f"{what}: the process hung at exit")
    assert code == 0, f"{what}: exit status {code}"


def test_exit_while_the_broker_restarts_never_hangs(broker: BrokerProc) -> None:
    for i in range(TRIES):
        delay = 0.6 * i / (TRIES - 1)
        style = STYLES[i % len(STYLES)]
        proc, _ = _holder(broker, style)
        _restart_without_waiting(broker)
        assert proc.stdin is not None
        proc.stdin.write(f"{delay}\n")
        proc.stdin.flush()
        _finish(proc, f"try {i} ({style}, exit {delay:.2f} s after the restart began)")
        wait_for_socket(broker.socket, proc=broker.proc)


def _held_by(sock: str, pid: int) -> list[dict[str, object]]:
    raw = Raw(sock)
    try:
        leases = raw.call({"op": "status"})["leases"]
    finally:
        raw.close()
    return [info for info in leases if info.get("pid") == pid]  # type: ignore[union-attr]


def test_a_forked_child_exiting_neither_hangs_nor_ends_the_parents_lease(
    broker: BrokerProc, tmp_path: Path
) -> None:
    for i in range(0, TRIES, 4):
        delay = 0.6 * i / (TRIES - 1)
        proc, port = _holder(broker, "fork")
        _restart_without_waiting(broker)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{delay}\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        if not ready:
            _kill_all(proc)
            pytest.fail(f"try {i}: the forked child hung at exit")
        assert proc.stdout.readline().strip() == "child-exited"
        wait_for_socket(broker.socket, proc=broker.proc)
        # The parent still holds its port: reclaimed by its own watcher, not
        # released by the child's exit.
        deadline = time.monotonic() + 10
        while True:
            mine = _held_by(broker.socket, proc.pid)
            if mine and mine[0]["state"] == "attached":
                break
            assert time.monotonic() < deadline, f"try {i}: the parent's lease is gone: {mine}"
            time.sleep(0.02)
        assert mine[0]["ports"] == [port]
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        _finish(proc, f"fork try {i}")
        assert _held_by(broker.socket, proc.pid) == []


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry))
    return members


def test_the_detached_lease_recipe_of_the_docs_leaves_nothing_behind(
    broker: BrokerProc, tmp_path: Path
) -> None:
    # The recipe calls `portlease`: the script pip installed beside this interpreter
    # comes first on its PATH (a venv's bin/ is not on PATH unless activated).
    bindir = os.path.dirname(sys.executable)
    search = os.pathsep.join([bindir, os.environ.get("PATH", os.defpath)])
    if shutil.which("bash") is None or shutil.which("portlease", path=search) is None:
        pytest.skip("needs bash and the portlease command (beside this interpreter or on PATH)")
    usage = (Path(__file__).resolve().parents[2] / "docs" / "usage.md").read_text()
    (recipe,) = [b.split("```", 1)[0] for b in usage.split("```sh\n")[1:] if "--detach" in b
                 and "RENEWER" in b.split("```", 1)[0]]
    assert "docker compose up -d" in recipe
    out = tmp_path / "ports"
    # The job runs long enough for the renew loop to be waiting in its sleep.
    script = recipe.replace("docker compose up -d", f'echo "$1 $2" > {out}; sleep 0.5')
    env = dict(os.environ, PORTLEASE_SOCKET=broker.socket, PATH=search)
    proc = subprocess.Popen(["bash", "-c", script], env=env, start_new_session=True)
    assert proc.wait(timeout=60) == 0
    ports = [int(x) for x in out.read_text().split()]
    assert len(ports) == 2
    assert Raw(broker.socket).call({"op": "status"})["leases"] == []  # released by the trap
    deadline = time.monotonic() + 5
    while (left := _session_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], "the renew loop (or its sleep) outlived the script"


def test_close_returns_even_if_a_frozen_thread_holds_every_lock(broker: BrokerProc) -> None:
    """The mechanism of the hang: a daemon thread frozen at finalization while holding a lock.

    Here a thread takes the connection's I/O lock and the watcher's lock and
    never lets go; close() must still return (it gives up on the watcher's
    bookkeeping after half a second) and end the lease.
    """
    import threading

    from portlease.client import Connection, reclaim

    conn = Connection(broker.socket)
    held = conn.lease(1)
    watcher = reclaim.watcher()
    taken, release = threading.Event(), threading.Event()

    def freeze() -> None:
        with conn._io, watcher._lock:
            taken.set()
            release.wait(60)

    frozen = threading.Thread(target=freeze, daemon=True)
    frozen.start()
    assert taken.wait(10)
    try:
        done = threading.Event()
        closer = threading.Thread(target=lambda: (conn.close(), done.set()), daemon=True)
        closer.start()
        assert done.wait(10), "close() blocked on a lock held by a frozen thread"
        assert held.released
        deadline = time.monotonic() + 10
        while _held_by(broker.socket, os.getpid()):
            assert time.monotonic() < deadline, "the broker still holds the lease"
            time.sleep(0.02)
    finally:
        release.set()
        frozen.join(10)


def test_a_forked_child_cannot_use_or_end_the_parents_connection(broker: BrokerProc) -> None:
    from portlease.client import Connection, ConnectionLost

    with Connection(broker.socket) as conn:
        held = conn.lease(1)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                try:
                    conn.ping()
                    os.write(w, b"used")
                except ConnectionLost as exc:
                    os.write(w, str(exc).encode())
                try:
                    conn.release(held)
                    os.write(w, b" released")
                except ConnectionLost:
                    pass
                conn.close()  # must not end the parent's lease
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            said = f.read().decode()
        os.waitpid(pid, 0)
        assert "a forked child must open its own" in said and "released" not in said
        conn.ping()  # the parent's connection is intact
        (mine,) = _held_by(broker.socket, os.getpid())
        assert mine["ports"] == list(held.ports) and mine["state"] == "attached"


def test_a_detached_lease_granted_after_the_call_timed_out_is_given_back(broker: BrokerProc) -> None:
    """The broker answers only after the caller's timeout: the caller gets ConnectionLost,
    and the detached lease granted meanwhile is released, not held by nobody until its TTL.
    (Before, the socket was dropped at once and the lease stayed for its TTL.)"""
    import threading

    from portlease.client import Connection
    from portlease.client.protocol.errors import ConnectionLost

    assert broker.proc is not None
    pid = broker.proc.pid
    conn = Connection(broker.socket, timeout=2, reclaim=False)
    conn.ping()  # connected and welcomed: the lease is the call that waits
    os.kill(pid, signal.SIGSTOP)
    # Continued after the timeout (2 s), within the settle window that follows it.
    resume = threading.Timer(2.6, os.kill, (pid, signal.SIGCONT))
    resume.start()
    try:
        with pytest.raises(ConnectionLost, match="did not answer within"):
            conn.lease(2, detach=True, ttl=300)
    finally:
        resume.join()
        os.kill(pid, signal.SIGCONT)
        conn.close()
    leases = Raw(broker.socket).call({"op": "status"})["leases"]
    assert leases == [], leases

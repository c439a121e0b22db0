"""The shipped units under a real systemd 252 as PID 1 (Debian 12 in systemd-nspawn).

One container per run (module fixture): a debootstrapped bookworm rootfs,
cached under /var/cache/portlease-systest, booted on an overlay with
``systemd-nspawn -b``. portlease is installed into it by running the shell
blocks of docs/systemd.md that are marked ``<!-- system test: ... -->``, word
for word, so the page cannot drift from what works. Each check below is its
own test, in the order a deployer meets them; each prints what it saw (see
conftest.py). Run with ``python3 -m pytest -m system tests/system -p no:xdist -v -rs``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nspawn
import pytest
from nspawn import Container, record

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "systemd.md"
CLONE = "/root/portlease"
SOCKET = "/run/portlease/portlease.sock"
SERVICE = "portlease.service"
CONFIG = "/etc/portlease/config.toml"

T = TypeVar("T")

# What `systemctl reload` switches to: narrower than the default, but still
# holding the wrappers' ports (a restart restores only leases inside the range).
NEW_RANGE = {"port_min": 10000, "port_max": 10999}
NEW_RANGE_LIST = [NEW_RANGE["port_min"], NEW_RANGE["port_max"]]


def in_new_range(port: int) -> bool:
    return NEW_RANGE["port_min"] <= port <= NEW_RANGE["port_max"]


# ---------------------------------------------------------------- the documented install


def doc_blocks(where: str) -> list[str]:
    """The fenced blocks of docs/systemd.md marked ``<!-- system test: WHERE -->``."""
    text = DOC.read_text()
    blocks = re.findall(
        rf"^[ \t]*<!-- system test: {where} -->\n[ \t]*```[^\n]*\n(.*?)^[ \t]*```", text, re.M | re.S)
    # The blocks sit in a list item: drop the indentation, keep the commands.
    return ["\n".join(line.strip() for line in block.splitlines()) for block in blocks]


def working_tree_copy(dest: Path) -> None:
    """The clone a deployer would have: every tracked or new (not ignored) file as it is now."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if not source.is_file():
            continue  # deleted in the working tree, or a submodule
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30, every: float = 0.2) -> T:
    """Poll ``probe`` until it returns a value; the timeout only bounds a hang, it is no figure."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    reason = nspawn.missing_tools()
    if reason:
        if os.environ.get("PORTLEASE_SYSTEST_REQUIRED"):
            pytest.fail(f"PORTLEASE_SYSTEST_REQUIRED is set, but {reason}")
        pytest.skip(reason)
    attach = os.environ.get("PORTLEASE_SYSTEST_CONTAINER")
    if attach:
        # For working on the checks: a container booted and installed before
        # (its PID 1 as seen here), left running afterwards.
        yield Container.attached(int(attach))
        return
    started = time.monotonic()
    cached = any(nspawn.CACHE.glob(f"{nspawn.SUITE}-{nspawn.cache_key(nspawn.apt_mirror())}"))
    lower = nspawn.rootfs(tmp_path_factory.mktemp("debootstrap") / "debootstrap.log")
    rootfs_s = time.monotonic() - started

    # Step 1 of the page, on the host (the machine with network access).
    clone = tmp_path_factory.mktemp("clone") / "portlease"
    working_tree_copy(clone)
    host_blocks = doc_blocks("host")
    assert host_blocks, "docs/systemd.md has no block marked for the host"
    for block in host_blocks:
        subprocess.run(["sh", "-ec", block], cwd=clone, check=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    wheels_s = time.monotonic() - started - rootfs_s

    with nspawn.booted(lower) as c:
        boot_s = time.monotonic() - started - rootfs_s - wheels_s
        # "Copy the clone to the CI host."
        shutil.copytree(clone, c.host_path(CLONE), symlinks=True)
        container_blocks = doc_blocks("container")
        assert len(container_blocks) >= 2, "docs/systemd.md: the install blocks are not marked"
        for block in container_blocks:
            c.run(f"cd {CLONE} && set -e\n{block}", timeout=300)
        install_s = time.monotonic() - started - rootfs_s - wheels_s - boot_s
        record("container", f"rootfs {'cached' if cached else 'debootstrapped'} in {rootfs_s:.1f} s, "
               f"wheels {wheels_s:.1f} s, boot {boot_s:.1f} s, documented install {install_s:.1f} s")
        record("container", c.run("systemctl --version | head -1").stdout.strip())
        yield c
        record("container", f"total with checks {time.monotonic() - started:.1f} s")


# ---------------------------------------------------------------- helpers


def status(c: Container, user: str | None = None) -> dict[str, Any]:
    result = c.run("portlease status --json", user=user)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def show(c: Container, unit: str, *props: str) -> dict[str, str]:
    out = c.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def main_pid(c: Container) -> int:
    return int(show(c, SERVICE, "MainPID")["MainPID"])


def journal(c: Container, *args: str) -> str:
    return c.run(["journalctl", "--no-pager", "-o", "cat", "-u", SERVICE, *args]).stdout


def journal_cursor(c: Container) -> str:
    out = c.run(["journalctl", "--no-pager", "-n", "0", "--show-cursor", "-u", SERVICE]).stdout
    match = re.search(r"-- cursor: (\S+)", out)
    assert match, out
    return match.group(1)


def journal_since(c: Container, cursor: str, max_priority: int = 7) -> str:
    """The unit's lines after ``cursor`` at ``max_priority`` or more urgent.

    The priority is filtered here, not with ``-p``: journalctl combines
    ``--after-cursor`` with a filter by skipping the first matching entry.
    """
    return "".join(f"{message}\n" for priority, message in journal_entries(c, cursor)
                   if priority <= max_priority)


def journal_entries(c: Container, cursor: str) -> list[tuple[int, str]]:
    """(priority, message) of the unit's entries after ``cursor``."""
    out = c.run(["journalctl", "--no-pager", "-o", "json", "-u", SERVICE, f"--after-cursor={cursor}"]).stdout
    entries = [json.loads(line) for line in out.splitlines()]
    return [(int(e.get("PRIORITY", 6)), str(e.get("MESSAGE", ""))) for e in entries]


class Wrapper:
    """``portlease lease -n N -- sh`` in the container, holding its lease until killed.

    The command writes its own pid, its parent's (the wrapper's) and the
    ports to a file, then sleeps.
    """

    def __init__(self, c: Container, name: str, count: int, user: str | None = None) -> None:
        self.c = c
        self.name = name
        self.file = f"/run/plsys-{name}-{time.monotonic_ns()}"
        script = f'echo "$$ $PPID $PORTLEASE_PORTS" > {self.file}; exec sleep 100000'
        self.proc = c.spawn(
            f"exec portlease lease -n {count} --note {name} -- sh -c {shlex.quote(script)}", user=user)
        line = wait_for(f"wrapper {name} to get its ports", self._read)
        fields = line.split()
        self.cmd_pid, self.pid = int(fields[0]), int(fields[1])
        self.ports = [int(x) for x in fields[2:]]
        assert len(self.ports) == count, line

    def _read(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"wrapper {self.name} exited with {self.proc.returncode}")
        result = self.c.run(f"cat {self.file} 2>/dev/null", check=False)
        return result.stdout.strip() or None

    def kill(self) -> None:
        self.c.run(f"kill -KILL {self.pid}")


def leases_by_note(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {info.get("note", ""): info for info in data["leases"]}


def assert_disjoint(leases: list[dict[str, Any]]) -> None:
    seen: dict[int, str] = {}
    for info in leases:
        for port in info["ports"]:
            assert port not in seen, f"port {port} granted twice: {seen[port]} and {info}"
            seen[port] = str(info)


def reclaimed(c: Container, wrappers: list[Wrapper]) -> dict[str, dict[str, Any]] | None:
    """The wrappers' leases once every one is attached again with its old ports."""
    result = c.run("portlease status --json", check=False)
    if result.returncode != 0:
        return None
    data = leases_by_note(json.loads(result.stdout))
    for w in wrappers:
        info = data.get(w.name)
        if info is None or info["state"] != "attached":
            return None
        assert info["ports"] == w.ports, (w.name, info, w.ports)
    return data


def write_config(c: Container, **settings: object) -> None:
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    c.write(CONFIG, "\n".join(lines) + "\n")


def reload(c: Container) -> str:
    """``systemctl reload``; returns the journal cursor from just before it."""
    cursor = journal_cursor(c)
    c.run(["systemctl", "reload", SERVICE])
    return cursor


@pytest.fixture(autouse=True)
def service_not_failed(request: pytest.FixtureRequest) -> None:
    """Fail at once, not after every client's timeout, once the broker is down for good."""
    if "container" not in request.fixturenames:
        return
    c: Container = request.getfixturevalue("container")
    props = show(c, SERVICE, "ActiveState", "Result")
    if props["ActiveState"] == "failed":
        pytest.fail(f"portlease.service failed earlier (Result={props['Result']}); "
                    "the first failing check and its journal lines say why")


@pytest.fixture(scope="module")
def holders(container: Container) -> dict[str, Wrapper]:
    """Two wrappers that keep their leases across the restart checks."""
    return {}


# ---------------------------------------------------------------- the checks, in order


def test_socket_owner_group_mode_and_service_idle(container: Container) -> None:
    c = container
    sock = c.run(["stat", "-c", "%U:%G %a %F", SOCKET]).stdout.strip()
    directory = c.run(["stat", "-c", "%U:%G %a", "/run/portlease"]).stdout.strip()
    record("test_socket_owner_group_mode_and_service_idle", f"{SOCKET}: {sock}; /run/portlease: {directory}")
    assert sock == "root:portlease 660 socket"
    assert directory == "root:root 755"
    assert show(c, "portlease.socket", "ActiveState")["ActiveState"] == "active"
    state = show(c, SERVICE, "ActiveState")["ActiveState"]
    record("test_socket_owner_group_mode_and_service_idle", f"service before any connection: {state}")
    assert state == "inactive"


def test_first_connection_starts_and_is_served(container: Container) -> None:
    c = container
    out = c.run("portlease status").stdout.strip()
    record("test_first_connection_starts_and_is_served", f"first `portlease status`: {out.splitlines()[-1]}")
    props = show(c, SERVICE, "ActiveState", "SubState", "User", "DynamicUser")
    record("test_first_connection_starts_and_is_served", f"then: {props}")
    assert props["ActiveState"] == "active"
    assert props["User"] == "portlease-broker"
    assert props["DynamicUser"] == "yes"
    # The dynamic uid has no name without libnss-systemd: compare numbers.
    uid = show(c, SERVICE, "UID")["UID"]
    owner = c.run(["ps", "-o", "uid=", "-p", str(main_pid(c))]).stdout.strip()
    state = c.run(["stat", "-c", "%u %a", "/var/lib/private/portlease"]).stdout.strip()
    record("test_first_connection_starts_and_is_served",
           f"broker runs as dynamic uid {owner} (unit UID={uid}); its state directory: {state}")
    assert owner == uid
    assert state == f"{uid} 700"


def test_notify_ready_and_status_line(container: Container) -> None:
    c = container
    props = show(c, SERVICE, "Type", "NotifyAccess", "ActiveState", "StatusText", "WatchdogUSec")
    assert props["Type"] == "notify"
    assert props["NotifyAccess"] == "main"
    assert props["ActiveState"] == "active"
    assert props["WatchdogUSec"] == "30s"
    assert "free" in props["StatusText"], props
    text = c.run(["systemctl", "status", "--no-pager", "--lines=0", SERVICE]).stdout
    status_line = next(line.strip() for line in text.splitlines() if line.strip().startswith("Status:"))
    record("test_notify_ready_and_status_line", f"systemctl status: {status_line}")
    # Type=notify: systemd logs "Started" only once READY=1 came, which the
    # broker sends after it logs that it is serving.
    lines = c.run(["journalctl", "--no-pager", "-o", "cat", "-u", SERVICE, "-b"]).stdout.splitlines()
    serving = next(i for i, line in enumerate(lines) if "serving" in line)
    started = next(i for i, line in enumerate(lines) if line.startswith("Started portlease.service"))
    record("test_notify_ready_and_status_line",
           f"journal: {lines[serving]!r} then {lines[started]!r}")
    assert serving < started


def test_security_score_of_loaded_unit(container: Container) -> None:
    c = container
    limit = float((ROOT / "systemd" / "EXPOSURE").read_text().strip())
    out = c.run(["systemd-analyze", "security", "--no-pager", SERVICE], check=False).stdout
    match = re.search(r"Overall exposure level for portlease\.service: (\d+\.\d+) (\S+)", out)
    assert match, out
    record("test_security_score_of_loaded_unit",
           f"systemd-analyze security {SERVICE}: {match.group(1)} {match.group(2)} (EXPOSURE {limit})")
    assert float(match.group(1)) <= limit


def test_two_wrappers_get_disjoint_ports(container: Container, holders: dict[str, Wrapper]) -> None:
    c = container
    a = Wrapper(c, "wrapper-a", 4)
    b = Wrapper(c, "wrapper-b", 4)
    holders.update(a=a, b=b)
    record("test_two_wrappers_get_disjoint_ports", f"a: {a.ports}, b: {b.ports}")
    assert not set(a.ports) & set(b.ports)
    data = leases_by_note(status(c))
    assert data["wrapper-a"]["ports"] == a.ports and data["wrapper-a"]["state"] == "attached"
    assert data["wrapper-b"]["ports"] == b.ports and data["wrapper-a"]["pid"] == a.pid


def test_sigkilled_wrappers_ports_free_at_once(container: Container) -> None:
    c = container
    w = Wrapper(c, "wrapper-killed", 3)
    w.kill()
    # The TTL is 120 s: a lease gone well within that was freed by the dead
    # connection, not by expiry. The bound only stops a hang.
    started = time.monotonic()
    wait_for("the killed wrapper's lease to end",
             lambda: True if "wrapper-killed" not in leases_by_note(status(c)) else None, timeout=20)
    record("test_sigkilled_wrappers_ports_free_at_once",
           f"ports {w.ports} released {time.monotonic() - started:.2f} s after SIGKILL (ttl 120 s)")
    # Free means grantable: a probe in the container binds each of them.
    c.run(["/opt/portlease/bin/python3", "-c",
           "import socket,sys\n"
           "for p in map(int, sys.argv[1:]):\n"
           "    s = socket.socket(); s.bind(('127.0.0.1', p)); s.close()", *map(str, w.ports)])
    # The wrapper's CMD dies with it (the kernel kills it when its parent
    # dies); it is gone once init has reaped it, so wait for that, bounded.
    def cmd_alive() -> bool:
        return c.run(["kill", "-0", str(w.cmd_pid)], check=False).returncode == 0

    try:
        wait_for("the killed wrapper's command to end", lambda: True if not cmd_alive() else None,
                 timeout=20)
    finally:
        alive = cmd_alive()
        record("test_sigkilled_wrappers_ports_free_at_once", f"its command still running: {alive}")
        if alive:
            c.run(["kill", "-KILL", str(w.cmd_pid)], check=False)
    assert not cmd_alive(), f"the SIGKILLed wrapper's command (pid {w.cmd_pid}) outlived it"


def test_restart_with_leases_held_clients_reclaim(container: Container, holders: dict[str, Wrapper]) -> None:
    c = container
    detached = json.loads(c.run("portlease lease -n 2 --detach --json --note detached-1").stdout)
    held = holders["a"].ports + holders["b"].ports + detached["ports"]
    claims_before = claim_inodes(c, held)
    old_pid = main_pid(c)
    c.run(["systemctl", "restart", SERVICE])
    new_pid = main_pid(c)
    assert new_pid != old_pid
    # A grant made while the old holders may not have reclaimed yet must not
    # hand out their ports.
    fresh = json.loads(c.run("portlease lease -n 16 --detach --json --note fresh-1").stdout)
    data = wait_for("both wrappers to reclaim", lambda: reclaimed(c, [holders["a"], holders["b"]]))
    record("test_restart_with_leases_held_clients_reclaim",
           f"broker pid {old_pid} -> {new_pid}; reclaimed: "
           + ", ".join(f"{n} {i['ports']} {i['state']}" for n, i in data.items()))
    assert data["detached-1"]["ports"] == detached["ports"], data
    assert data["fresh-1"]["ports"] == fresh["ports"]
    # The claims crossed the restart in systemd's fd store: the same sockets, never unbound.
    assert claim_inodes(c, held) == claims_before and len(claims_before) == len(held)
    assert_disjoint(list(data.values()))
    record("test_restart_with_leases_held_clients_reclaim",
           f"granted during reclaim: {fresh['ports'][0]}-{fresh['ports'][-1]}, overlaps none")
    for token in (detached["token"], fresh["token"]):
        c.run(["portlease", "release", token])


def claim_inodes(c: Container, ports: list[int]) -> dict[int, int]:
    """Port -> the inode of the socket bound to its host-wide claim name, from /proc/net/unix."""
    found: dict[int, int] = {}
    for line in c.run("cat /proc/net/unix").stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith("@portlease/port/"):
            port = int(fields[7].rsplit("/", 1)[1])
            if port in ports:
                found[port] = int(fields[6])
    return found


def test_a_killed_brokers_claims_stay_in_systemds_fd_store(
    container: Container, holders: dict[str, Wrapper]
) -> None:
    """SIGKILL: until the next broker runs, no broker holds the claims but systemd does
    (FileDescriptorStoreMax=); the next broker is passed the very same sockets."""
    c = container
    ports = holders["a"].ports + holders["b"].ports
    before = claim_inodes(c, ports)
    assert sorted(before) == sorted(ports), before
    # systemd (PID 1 of the container) holds a copy of every claim socket.
    in_pid1 = {int(n) for n in re.findall(r"socket:\[(\d+)\]", c.run("ls -l /proc/1/fd").stdout)}
    assert set(before.values()) <= in_pid1, (before, sorted(in_pid1))
    pid = main_pid(c)
    # `status` names the broker as the claims' holder, not PID 1 beside it.
    named = json.loads(c.run([
        "/opt/portlease/bin/python", "-c",
        "import json, sys; from portlease.client.host import procnet; "
        "print(json.dumps(procnet.owners(map(int, sys.argv[1:]))))", *map(str, before.values()),
    ]).stdout)
    assert set(named.values()) == {pid}, (named, pid)
    c.run(["kill", "-KILL", str(pid)])
    wait_for("the killed broker to be gone",
             lambda: c.run(["test", "-e", f"/proc/{pid}"], check=False).returncode != 0 or None)
    state = show(c, SERVICE, "SubState", "MainPID")
    during = claim_inodes(c, ports)
    new_pid = wait_for("systemd to start the next broker", lambda: (
        p if (p := main_pid(c)) not in (0, pid) else None), timeout=60)
    data = wait_for("the wrappers to reclaim", lambda: reclaimed(c, [holders["a"], holders["b"]]))
    after = claim_inodes(c, ports)
    record("test_a_killed_brokers_claims_stay_in_systemds_fd_store",
           f"SIGKILL {pid}; read while {state['SubState']} (MainPID {state['MainPID']}): "
           f"{len(during)} of {len(ports)} claims bound, same sockets: {during == before}; "
           f"broker {new_pid} holds the same {len(after)} sockets: {after == before}")
    assert during == before
    assert after == before
    assert_disjoint(list(data.values()))


def test_reload_applies_new_range(container: Container, holders: dict[str, Wrapper]) -> None:
    c = container
    write_config(c, **NEW_RANGE)
    pid = main_pid(c)
    reload(c)
    summary = wait_for("the new range", lambda: (
        s if (s := status(c)["summary"])["range"] == NEW_RANGE_LIST else None))
    grant = json.loads(c.run("portlease lease -n 3 --detach --json --note in-new-range").stdout)
    c.run(["portlease", "release", grant["token"]])
    record("test_reload_applies_new_range",
           f"range now {summary['range']}, new grant {grant['ports']}, broker pid unchanged: "
           f"{main_pid(c) == pid}")
    assert all(in_new_range(p) for p in grant["ports"])
    held = summary["ports_held"]
    assert summary["ports_free"] <= NEW_RANGE["port_max"] - NEW_RANGE["port_min"] + 1 - held
    assert main_pid(c) == pid
    # The old leases outside the new range are kept.
    assert reclaimed(c, [holders["a"], holders["b"]]) is not None


def test_bad_config_on_reload_is_logged_and_ignored(container: Container) -> None:
    c = container
    pid = main_pid(c)
    write_config(c, port_min="oops", port_max=NEW_RANGE["port_max"])
    cursor = reload(c)
    line = wait_for("the reload error in the journal", lambda: next(
        (x for x in journal_since(c, cursor, 3).splitlines() if "reload" in x), None))
    record("test_bad_config_on_reload_is_logged_and_ignored", f"journalctl -p err: {line}")
    assert status(c)["summary"]["range"] == NEW_RANGE_LIST
    assert show(c, SERVICE, "ActiveState")["ActiveState"] == "active"
    assert main_pid(c) == pid
    write_config(c, **NEW_RANGE)


def test_journal_priority_warning_and_portalloc_dir_needs_restart(
    container: Container, holders: dict[str, Wrapper]
) -> None:
    c = container
    share = "/var/lib/fm-portalloc"
    write_config(c, **NEW_RANGE, portalloc_dir=share)
    cursor = reload(c)
    line = wait_for("the reload warning", lambda: next(
        (x for x in journal_since(c, cursor, 4).splitlines() if "portalloc_dir" in x), None))
    record("test_journal_priority_warning_and_portalloc_dir_needs_restart", f"journalctl -p warning: {line}")
    assert "WARNING" not in line, "the journal shows the priority; the level word is a duplicate"
    warnings = journal(c, "-b", "-p", "warning")
    assert "serving; range" not in warnings, "info lines must not pass -p warning"
    assert "serving; range" in journal(c, "-b", "-p", "info")
    # The docs say portalloc_dir needs a restart: after the reload, a grant
    # does not touch the share; after a restart, it does.
    table = f"{share}/fm-portalloc.json"
    grant = json.loads(c.run("portlease lease --detach --json --note share-probe").stdout)
    c.run(["portlease", "release", grant["token"]])
    assert c.run(["test", "-e", table], check=False).returncode != 0, "reload applied portalloc_dir"
    c.run(["systemctl", "restart", SERVICE])
    wait_for("the wrappers to reclaim", lambda: reclaimed(c, [holders["a"], holders["b"]]))
    grant = json.loads(c.run("portlease lease --detach --json --note share-probe").stdout)
    c.run(["portlease", "release", grant["token"]])
    listing = c.run(["ls", "-l", share]).stdout
    record("test_journal_priority_warning_and_portalloc_dir_needs_restart",
           f"after restart {share}: {' | '.join(listing.splitlines()[1:])}")
    assert "fm-portalloc.json" in listing


def test_reload_applies_log_level_debug(container: Container) -> None:
    c = container
    write_config(c, **NEW_RANGE, log_level="debug")
    cursor = reload(c)
    wait_for("the reload to finish", lambda: True if "reloaded" in journal_since(c, cursor) else None)
    status(c)
    debug = wait_for("debug lines", lambda: [m for p, m in journal_entries(c, cursor) if p == 7] or None)
    record("test_reload_applies_log_level_debug", f"{len(debug)} priority-7 lines after reload: {debug[:3]}")
    write_config(c, **NEW_RANGE)
    reload(c)


def test_watchdog_restarts_a_stopped_broker(container: Container, holders: dict[str, Wrapper]) -> None:
    c = container
    pid = main_pid(c)
    cursor = journal_cursor(c)
    c.run(["kill", "-STOP", str(pid)])
    started = time.monotonic()
    # WatchdogSec=30s: up to 30 s of silence, the abort, RestartSec=1s.
    new_pid = wait_for("systemd to restart the broker", lambda: (
        p if (p := main_pid(c)) not in (0, pid) else None), timeout=90, every=1)
    took = time.monotonic() - started
    log = journal_since(c, cursor)
    watchdog = next((x for x in log.splitlines() if "atchdog" in x), "")
    data = wait_for("the wrappers to reclaim", lambda: reclaimed(c, [holders["a"], holders["b"]]))
    record("test_watchdog_restarts_a_stopped_broker",
           f"SIGSTOP {pid}: {watchdog!r}; new broker {new_pid} after {took:.0f} s; leases restored: "
           + ", ".join(f"{n} {i['ports']}" for n, i in data.items()))
    assert watchdog, log


def test_outsider_gets_permission_error(container: Container) -> None:
    c = container
    c.run("id outsider >/dev/null 2>&1 || useradd --no-create-home outsider")
    uid = c.run("id -u outsider").stdout.strip()
    result = c.run("exec portlease lease -- true", user="outsider", check=False, timeout=120)
    message = result.stderr.strip()
    record("test_outsider_gets_permission_error", f"exit {result.returncode}: {message}")
    assert result.returncode != 0
    assert "permission denied" in message.lower()
    assert SOCKET in message
    assert "portlease serve" not in message and "starting" not in message.lower(), message
    brokers = c.run(["ps", "-o", "user=,args=", "-u", uid], check=False).stdout
    assert "serve" not in brokers, brokers
    assert c.run(f"test -e /tmp/portlease-{uid}", check=False).returncode != 0


def test_group_member_can_lease(container: Container) -> None:
    c = container
    c.run("id member >/dev/null 2>&1 || useradd --no-create-home --groups portlease member")
    out = c.run("exec portlease lease -n 2 -- sh -c 'echo $PORTLEASE_PORTS'", user="member").stdout
    ports = [int(x) for x in out.split()]
    grant = json.loads(c.run("portlease lease --detach --json --note member-detached", user="member").stdout)
    info = leases_by_note(status(c, user="member"))["member-detached"]
    c.run(["portlease", "release", grant["token"]], user="member")
    record("test_group_member_can_lease", f"member leased {ports}; status shows user {info.get('user')}")
    assert len(ports) == 2 and all(in_new_range(p) for p in ports)
    assert info["user"] == "member"


RUNNER_SANDBOX = ("DynamicUser=yes", "PrivateUsers=yes", "PrivateTmp=yes", "ProtectSystem=strict",
                  "ProtectHome=yes")


def runner(c: Container, *extra: str) -> subprocess.CompletedProcess[str]:
    props = [f"--property={p}" for p in (*RUNNER_SANDBOX, *extra)]
    return c.run(["systemd-run", "--wait", "--pipe", "--quiet", "--collect", *props,
                  "/usr/bin/portlease", "lease", "--", "sh", "-c", "echo $PORTLEASE_PORT"],
                 check=False, timeout=120)


def test_dynamicuser_runner_unit_with_supplementary_group(container: Container) -> None:
    c = container
    result = runner(c, "SupplementaryGroups=portlease")
    record("test_dynamicuser_runner_unit_with_supplementary_group",
           f"{' '.join(RUNNER_SANDBOX)} SupplementaryGroups=portlease: exit {result.returncode}, "
           f"port {result.stdout.strip()} {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert in_new_range(int(result.stdout))
    # The same unit without the group is refused: the group is what grants access.
    without = runner(c)
    record("test_dynamicuser_runner_unit_with_supplementary_group",
           f"without the group: exit {without.returncode}: {without.stderr.strip()}")
    assert without.returncode != 0
    assert "permission denied" in without.stderr.lower()


def test_journal_warning_filter_shows_only_warnings(container: Container) -> None:
    """`journalctl -p warning`, as docs/systemd.md recommends, shows the broker's warnings and errors only."""
    c = container
    lines = journal(c, "-b", "-p", "warning").splitlines()
    broker = [x for x in lines if x.startswith("portlease")]
    record("test_journal_warning_filter_shows_only_warnings",
           f"{len(broker)} broker lines at warning or above, e.g. {broker[:2]}")
    assert broker
    out = c.run(["journalctl", "--no-pager", "-o", "json", "-u", SERVICE, "-b"]).stdout
    priorities = {json.loads(x).get("PRIORITY") for x in out.splitlines()
                  if json.loads(x).get("SYSLOG_IDENTIFIER") == "portlease"}
    record("test_journal_warning_filter_shows_only_warnings",
           f"priorities used by the broker: {sorted(priorities)}")
    assert {"3", "4", "6"} <= priorities


def test_stopped_system_broker_no_private_brokers(container: Container, holders: dict[str, Wrapper]) -> None:
    c = container
    c.run(["systemctl", "stop", "portlease.socket", SERVICE])
    for who in ("member", None):
        result = c.run("exec portlease lease -- true", user=who, check=False, timeout=180)
        message = result.stderr.strip()
        record("test_stopped_system_broker_no_private_brokers",
               f"as {who or 'root'}: exit {result.returncode}: {message}")
        assert result.returncode == 69, message  # EX_UNAVAILABLE, as docs/systemd.md says
        assert "systemctl status portlease.socket" in message
        assert "portlease serve" not in message
    brokers = [x for x in c.run(["ps", "-eo", "user=,args="]).stdout.splitlines() if " serve" in x]
    private = c.run("ls -d /tmp/portlease-* /run/user/*/portlease 2>/dev/null", check=False).stdout.split()
    record("test_stopped_system_broker_no_private_brokers",
           f"brokers running: {brokers or 'none'}; private sockets: {private or 'none'}; "
           f"/run/portlease: {c.run('stat -c %a /run/portlease 2>&1', check=False).stdout.strip()}")
    assert not brokers
    assert not private
    mode = c.run("stat -c %a /run/portlease", check=False)
    assert mode.returncode != 0 or mode.stdout.strip() != "700", "a client chmodded /run/portlease"
    for w in holders.values():
        w.proc.kill()


def test_doc_blocks_are_found() -> None:
    """The install steps the fixture runs are the page's, so the page cannot lose them silently."""
    assert len(doc_blocks("host")) == 1
    assert any("pip install --no-index" in b for b in doc_blocks("container"))
    assert any("systemctl enable --now portlease.socket" in b for b in doc_blocks("container"))

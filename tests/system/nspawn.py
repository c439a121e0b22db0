"""A Debian container booted with systemd as PID 1, for the system tests.

The rootfs is built once with debootstrap and cached under
``/var/cache/portlease-systest``, keyed by everything that goes into it; each
run boots an overlay on top of it, so the cache is never written to and a
half-built rootfs is never reused (it is built in a temporary directory and
renamed into place only when debootstrap succeeded).

There is no systemd on the host here, so nspawn runs with ``--register=no
--keep-unit`` and the container is driven with ``nsenter`` into its PID 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

CACHE = Path("/var/cache/portlease-systest")
SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "procps")
FALLBACK_MIRROR = "http://deb.debian.org/debian"

RECORDS: dict[str, list[str]] = {}
"""What each check saw, by test name; conftest.py prints it after the run."""


def record(check: str, line: str) -> None:
    """Note one observation of ``check`` (the test function's name) for the summary."""
    RECORDS.setdefault(check, []).append(line)
    print(f"{check}: {line}")


def apt_mirror() -> str:
    """The Debian mirror apt is configured with on this host (deb822 .sources first)."""
    for source in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in source.read_text().split("\n\n"):
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        match = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", legacy.read_text(), re.M)
        if match:
            return match.group(1)
    return FALLBACK_MIRROR


def cache_key(mirror: str) -> str:
    recipe = "\n".join([SUITE, mirror, "minbase", *sorted(PACKAGES)])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def rootfs(log: Path | None = None) -> Path:
    """The cached rootfs, built first if absent. Never modified by the tests."""
    mirror = apt_mirror()
    final = CACHE / f"{SUITE}-{cache_key(mirror)}"
    if (final / "usr/lib/systemd/systemd").exists():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE))
    try:
        with open(log or os.devnull, "w") as out:
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                 SUITE, str(work / "root"), mirror],
                check=True, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                timeout=480,
            )
        # apt's downloaded .debs are a third of the tree and never used again.
        for deb in (work / "root/var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        (work / "root").rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def missing_tools() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "the system test needs root (debootstrap, overlay mounts, systemd-nspawn)"
    absent = [tool for tool in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(tool) is None]
    if absent:
        return (f"{', '.join(absent)} not installed "
                "(apt-get install debootstrap systemd-container util-linux)")
    return None


CONTAINER_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root", "LANG=C.UTF-8", "TERM=dumb", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0",
)


class Container:
    """One booted container on an overlay of the cached rootfs.

    Commands run through ``nsenter`` into the container's namespaces with a
    clean environment (``env -i``): the host's variables (PORTLEASE_SOCKET,
    XDG_RUNTIME_DIR, ...) must not leak into what is checked.
    """

    def __init__(self, lower: Path, workdir: Path) -> None:
        self.lower = lower
        self.workdir = workdir
        self.root = workdir / "root"
        self.console = workdir / "console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self._mounted = False
        self._spawned: list[subprocess.Popen[bytes]] = []

    @classmethod
    def attached(cls, leader: int) -> Container:
        """A container someone else booted and will tear down; only :meth:`run` and friends work."""
        # The magic link reaches the container's root through its mount namespace.
        root = Path(f"/proc/{leader}/root")
        container = cls(root, root)
        container.root = root
        container.leader = leader
        return container

    # ------------------------------------------------------------ lifecycle

    def _make_root(self) -> None:
        upper, work = self.workdir / "upper", self.workdir / "work"
        for d in (upper, work, self.root):
            d.mkdir()
        result = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.lower},upperdir={upper},workdir={work}", str(self.root)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode == 0:
            self._mounted = True
            return
        # No overlayfs (some CI sandboxes): a private copy keeps the cache clean too.
        self.root.rmdir()
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.lower), str(self.root)], check=True)

    def boot(self, timeout: float = 90) -> None:
        self._make_root()
        name = f"plsys-{os.getpid()}"
        with open(self.console, "wb") as console:
            self.nspawn = subprocess.Popen(
                # --register=no --keep-unit: there is no systemd (machined, bus) on the host.
                # --private-network: the container's ports are its own, so other
                # work on this host cannot take (or be given) the ports checked here.
                ["systemd-nspawn", "--boot", f"--directory={self.root}", f"--machine={name}",
                 "--register=no", "--keep-unit", "--private-network", "--console=pipe"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not self.leader:
            self._check_nspawn()
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            with contextlib.suppress(OSError):
                pids = children.read_text().split()
                if pids:
                    self.leader = int(pids[0])
            if time.monotonic() > deadline:
                raise TimeoutError(f"nspawn started no container in {timeout} s; {self.tail()}")
            time.sleep(0.1)
        state = ""
        while state not in ("running", "degraded"):
            self._check_nspawn()
            if time.monotonic() > deadline:
                raise TimeoutError(f"container not up in {timeout} s (is-system-running: {state}); "
                                   f"{self.tail()}")
            time.sleep(0.3)
            state = self.run("systemctl is-system-running", check=False, timeout=30).stdout.strip()

    def _check_nspawn(self) -> None:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited with {self.nspawn.returncode}; {self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return "no console output"
        return "console:\n" + "\n".join(text.splitlines()[-lines:])

    def shutdown(self) -> None:
        """Always safe to call: kills whatever is left, unmounts, removes the work dir."""
        for proc in self._spawned:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if self.nspawn is not None and self.nspawn.poll() is None:
            # SIGTERM asks nspawn to power the container off cleanly.
            self.nspawn.terminate()
            try:
                self.nspawn.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(timeout=20)
        if self._mounted:
            result = subprocess.run(["umount", str(self.root)], capture_output=True, check=False)
            if result.returncode != 0:
                subprocess.run(["umount", "--lazy", str(self.root)], capture_output=True, check=False)
            self._mounted = False
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------ running things inside

    def argv(self, command: str | Sequence[str], user: str | None = None) -> list[str]:
        cmd = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        if user is not None:
            cmd = ["runuser", "-u", user, "--", *cmd]
        return ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C",
                "--root", "--wd", "--", "/usr/bin/env", "-i", *CONTAINER_ENV, *cmd]

    def run(self, command: str | Sequence[str], *, user: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a shell command (or argv) in the container; stdout and stderr captured."""
        result = subprocess.run(self.argv(command, user), capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the container: {command!r} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def spawn(self, command: str, *, user: str | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running command in the container; killed at shutdown at the latest."""
        proc = subprocess.Popen(self.argv(command, user), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._spawned.append(proc)
        return proc

    def host_path(self, path: str) -> Path:
        """Where a path of the container's root filesystem (not its /run or /tmp) is on the host."""
        return self.root / path.lstrip("/")

    def write(self, path: str, text: str) -> None:
        target = self.host_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


@contextlib.contextmanager
def booted(lower: Path) -> Iterator[Container]:
    """A booted container that is torn down however the block ends (SIGTERM included)."""
    workdir = Path(tempfile.mkdtemp(prefix="portlease-systest-", dir="/var/tmp"))
    container = Container(lower, workdir)

    def on_term(signum: int, frame: object) -> None:
        # `timeout` in .ci/run sends SIGTERM: unwind so the container is killed.
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        container.boot()
        yield container
    finally:
        try:
            container.shutdown()
        finally:
            signal.signal(signal.SIGTERM, previous)

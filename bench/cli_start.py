#!/usr/bin/env python3
"""How long the ``portlease`` command takes to start, against the bare interpreter.

    python bench/cli_start.py [--rounds N] [--venv DIR] [--range LO-HI] [--json PATH]

Shell scripts and CI steps run ``portlease lease -- CMD`` once per command, so
its start-up is paid every time. Timed, in interleaved rounds (each round runs
every contender once, in an order rotated from round to round, so a slow spell of
this shared machine falls on all of them alike), median of ``--rounds``:

- ``python -c pass``: the interpreter's own start-up, the floor;
- ``python -c "import portlease.client"``: what the pytest plugin pays in every
  pytest run of everyone who installed portlease;
- ``python -c "import msgspec"``: the one dependency, for scale;
- ``import msgspec, argparse, socket``: the floor under any ``lease -- CMD`` that
  parses its arguments with argparse and speaks the protocol (msgspec Structs);
  and the same with ``dataclasses`` (which imports inspect, ast, dis, tokenize):
  what the sync client's dataclasses add to it;
- ``import pytest`` and ``import pytest, portlease.client.pytest_plugin``: what
  the plugin module adds to a pytest run, beyond the package;
- ``portlease --version``: the entry point and its parser, nothing sent;
- ``portlease lease -n 3 -- true``: connect, lease, run ``true``, release.

Everything runs from a **regular (non-editable) install** in a throwaway venv
(``pip install '.[broker]' pytest``), as a user has it: an editable install adds an
import hook to every start of the interpreter (pathlib, re, ... imported by its
``.pth``), which hides the same modules' cost in portlease. ``--venv DIR`` reuses a
venv made that way. A broker from the same venv serves ``--range`` on a private
socket. Then one ``-X importtime`` run of the lease command prints where its
imports go (cumulative microseconds of the top-level imports, and the modules with
the largest own time).

Targets (issue 23): the lease within 2.5x of ``python -c pass``, and ``import
portlease.client`` within 10 ms of it. They are reported as met or missed, never
asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    subprocess.run([str(where / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    f"{REPO}[broker]", "pytest"], check=True)
    return where


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of ``argv``; CPU is user + system of it and its children.

    On a shared machine the wall time swings with the other load; the CPU time
    much less, so both are reported.
    """
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=[
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed with status {os.waitstatus_to_exitcode(status)}")
    return elapsed, usage.ru_utime + usage.ru_stime


def importtime(python: str, argv: list[str], env: dict[str, str]
               ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(top-level imports by cumulative µs, modules by own µs) of one run of the script ``argv``."""
    out = subprocess.run([python, "-X", "importtime", *argv], env=env, capture_output=True,
                         text=True, check=True)
    top, own = [], []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative, name = line[len("import time:"):].split("|")
        own.append((name.strip(), int(self_us)))
        if not name.startswith("  "):  # imported by the program, not by another module
            top.append((name.strip(), int(cumulative)))
    return top, own


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--venv", type=Path, help="a venv with portlease[broker] installed (not -e)")
    parser.add_argument("--baseline", type=Path, metavar="VENV",
                        help="also time the same commands from this venv (an older install), "
                        "in the same rounds")
    parser.add_argument("--range", default="31000-31199", help="ports for the bench's broker")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="portlease-clistart-") as tmp:
        venv = args.venv or make_venv(Path(tmp) / "venv")
        python = str(venv / "bin" / "python")
        exe = str(venv / "bin" / "portlease")
        sock = os.path.join(tmp, "broker.sock")
        env = {"PATH": os.environ.get("PATH", os.defpath), "PORTLEASE_SOCKET": sock,
               "PORTLEASE_AUTOSTART": "0", "HOME": os.environ.get("HOME", "/")}
        broker = subprocess.Popen([exe, "serve", "--socket", sock, "--range", args.range,
                                   "--state", sock + ".state"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                if time.monotonic() > deadline or broker.poll() is not None:
                    raise SystemExit("the bench's broker did not start")
                time.sleep(0.05)
            contenders = {
                "python -c pass": [python, "-c", "pass"],
                "import msgspec": [python, "-c", "import msgspec"],
                "floor: msgspec, argparse, socket": [
                    python, "-c", "import msgspec, argparse, socket"],
                "floor + dataclasses": [
                    python, "-c", "import msgspec, argparse, socket, dataclasses"],
                "import portlease.client": [python, "-c", "import portlease.client"],
                "import pytest": [python, "-c", "import pytest"],
                "import pytest + the plugin": [
                    python, "-c", "import pytest, portlease.client.pytest_plugin"],
                "portlease --version": [exe, "--version"],
                "portlease lease -n 3 -- true": [exe, "lease", "-n", "3", "--", "true"],
            }
            if args.baseline:
                old_python = str(args.baseline / "bin" / "python")
                old_exe = str(args.baseline / "bin" / "portlease")
                contenders["baseline: import portlease.client"] = [
                    old_python, "-c", "import portlease.client"]
                contenders["baseline: portlease --version"] = [old_exe, "--version"]
                contenders["baseline: lease -n 3 -- true"] = [
                    old_exe, "lease", "-n", "3", "--", "true"]
            names = list(contenders)
            for argv in contenders.values():  # warm the page cache and the bytecode
                timed(argv, env)
            times: dict[str, list[float]] = {name: [] for name in names}
            cpu: dict[str, list[float]] = {name: [] for name in names}
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    wall, used = timed(contenders[name], env)
                    times[name].append(wall)
                    cpu[name].append(used)
            top, own = importtime(python, contenders["portlease lease -n 3 -- true"], env)
            # Asked now: a throwaway venv is gone once this block ends.
            py = subprocess.run([python, "-c", "import sys, msgspec; print(sys.version.split()[0], "
                                 "msgspec.__version__)"], capture_output=True, text=True).stdout.split()
        finally:
            broker.terminate()
            broker.wait(10)

    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    med_cpu = {name: statistics.median(t) * 1e3 for name, t in cpu.items()}
    bare = med["python -c pass"]
    print(f"Python {py[0]}, msgspec {py[1]}; median of {args.rounds} interleaved rounds, "
          "regular install" + (f" ({venv})" if args.venv else " (throwaway venv)"))
    bare_cpu = med_cpu["python -c pass"]
    print(f"{'command':36} {'wall ms':>8} {'x bare':>7} {'+ ms':>6} {'CPU ms':>8} {'x bare':>7}")
    for name in names:
        print(f"{name:36} {med[name]:8.1f} {med[name] / bare:7.2f} {med[name] - bare:6.1f} "
              f"{med_cpu[name]:8.1f} {med_cpu[name] / bare_cpu:7.2f}")
    lease_ratio = med["portlease lease -n 3 -- true"] / bare
    client_extra = med["import portlease.client"] - bare
    print(f"target lease ≤ 2.5 x bare: {lease_ratio:.2f} x "
          f"({'met' if lease_ratio <= 2.5 else 'missed'})")
    print(f"target import portlease.client ≤ 10 ms over bare: {client_extra:.1f} ms "
          f"({'met' if client_extra <= 10 else 'missed'})")
    print("\n-X importtime of `portlease lease -n 3 -- true` (one run; importtime inflates "
          "every figure):")
    print("  top-level imports, cumulative µs:")
    for name, us in sorted(top, key=lambda x: -x[1])[:12]:
        print(f"    {us:7d}  {name}")
    print("  largest own times, µs:")
    for name, us in sorted(own, key=lambda x: -x[1])[:15]:
        print(f"    {us:7d}  {name}")
    if args.json:
        args.json.write_text(json.dumps({
            "python": py[0], "msgspec": py[1], "rounds": args.rounds, "median_ms": med,
            "median_cpu_ms": med_cpu,
            "lease_ratio": lease_ratio, "client_import_extra_ms": client_extra,
            "importtime_top": top, "importtime_own": own,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

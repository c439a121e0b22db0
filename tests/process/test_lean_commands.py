"""Every client command runs without the broker's dependencies, as it runs for a user.

Each command below runs in a fresh interpreter in which trio, sdnotify and anyio
cannot be imported at all (``sys.modules[name] = None`` makes any import of them
raise), against a real broker. A command that reached for one of them, directly
or through an import that runs the wrong way, fails here.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from brokerproc import BrokerProc

_LEAN = (
    "import sys\n"
    "for name in ('trio', 'sdnotify', 'anyio'):\n"
    "    sys.modules[name] = None\n"
    "from portlease.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def lean(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _LEAN, *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_every_client_command_runs_with_the_broker_dependencies_unimportable(broker: BrokerProc) -> None:
    s = ["--socket", broker.socket]
    out = lean("lease", *s, "-n", "2", "--", "sh", "-c", 'echo "$PORTLEASE_PORTS"')
    assert out.returncode == 0, out.stderr
    first, second = map(int, out.stdout.split())
    assert second == first + 1

    out = lean("lease", *s, "-n", "3", "--detach", "--json")
    assert out.returncode == 0, out.stderr
    detached = json.loads(out.stdout)
    assert len(detached["ports"]) == 3

    out = lean("status", *s, "--json")
    assert out.returncode == 0, out.stderr
    shown = [info["ports"] for info in json.loads(out.stdout)["leases"]]
    assert detached["ports"] in shown

    for args in (("status", *s), ("status", *s, "--squatters"), ("metrics", *s)):
        out = lean(*args)
        assert out.returncode == 0, (args, out.stderr)
        assert out.stdout.strip(), args

    out = lean("renew", *s, detached["token"])
    assert out.returncode == 0 and out.stdout.startswith("expires in"), out.stderr

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", detached["ports"][0]))
        listener.listen()
        out = lean("wait", str(detached["ports"][0]), "--timeout", "10")
        assert out.returncode == 0, out.stderr

    out = lean("release", *s, detached["token"])
    assert out.returncode == 0, out.stderr
    out = lean("status", *s, "--json")
    assert detached["ports"] not in [info["ports"] for info in json.loads(out.stdout)["leases"]]


def test_serve_without_the_broker_dependencies_names_the_extra(tmp_path: object) -> None:
    out = lean("serve", "--socket", f"{tmp_path}/s.sock")
    assert out.returncode == 1
    assert "pip install 'portlease[broker]'" in out.stderr

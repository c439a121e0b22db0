"""The ``portlease`` command as a person meets it: arguments, messages, exit codes, output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from brokerproc import PYTHON, BrokerProc, Raw, portlease
from portlease.client import Connection
from portlease.client.cli.status_view import escape, typed_command

SUBCOMMANDS = ("serve", "lease", "renew", "release", "status", "wait")


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["-n", "70000", "--", "true"], "-n 70000: too many ports; a broker grants at most its "
         "max_ports_per_request, 256 unless configured"),
        (["-n", "0", "--", "true"], "-n 0: COUNT is a number of consecutive ports, at least 1"),
        (["-n", "-3", "--", "true"], "-n -3: COUNT is a number of consecutive ports, at least 1"),
        (["--detach", "--ttl", "0"], "--ttl 0: SECONDS must be 1 to 86400"),
        (["--detach", "--ttl", "-1"], "--ttl -1: SECONDS must be 1 to 86400"),
        (["--detach", "--ttl", "0.5"], "--ttl 0.5: SECONDS must be 1 to 86400"),
        (["--detach", "--ttl", "86401"], "--ttl 86401: SECONDS must be 1 to 86400"),
        (["--detach", "--ttl", "nan"], "--ttl nan: SECONDS must be 1 to 86400"),
        (["--env", "PATH=0", "--", "true"], "PATH is reserved"),
        (["--env", "PORTLEASE_PORT=0", "--", "true"], "PORTLEASE_PORT is reserved"),
        (["--env", "PORTLEASE_ANYTHING=0", "--", "true"], "PORTLEASE_ANYTHING is reserved"),
        (["--env", "1X=0", "--", "true"], "NAME a shell variable name"),
        (["--env", "A-B=0", "--", "true"], "NAME a shell variable name"),
        (["--env", "\u00e9t\u00e9=0", "--", "true"], "NAME a shell variable name"),
        (["--env", "A B=0", "--", "true"], "NAME a shell variable name"),
        (["--json", "--", "true"], "--json and --export apply to --detach only"),
        (["--export", "--", "true"], "--json and --export apply to --detach only"),
        (["--detach", "--json", "--export"], "pick one"),
        (["--listen", "1", "--", "true"], "--listen '1': OFFSET must be in 0..0"),
        (["--listen", "0/sctp", "--", "true"], "expected OFFSET[/udp][=NAME]"),
        (["--listen", "0=a:b", "--", "true"], "NAME must be printable"),
        (["--listen", "0", "--listen", "0=again", "--", "true"], "already listed"),
        (["--hold", "2", "--", "true"], "--hold '2': OFFSET must be in 0..0"),
        (["--hold", "0/udp", "--", "true"], "--hold '0/udp': expected an OFFSET"),
        (["--listen", "0", "--hold", "0", "--", "true"], "already bound by --listen"),
        (["--detach", "--listen", "0"], "need a command"),
        (["--hold", "0", "--hold-timeout", "0", "--", "true"], "--hold-timeout must be a positive number"),
        (["--listen-host", "::1", "--", "true"], "--listen-host applies to --listen only"),
    ],
)
def test_bad_lease_arguments_exit_2_with_a_sentence(
    broker: BrokerProc, args: list[str], says: str
) -> None:
    out = portlease("lease", "--socket", broker.socket, *args)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert says in out.stderr, out.stderr
    # Checked before anything reached the broker: no protocol dump.
    assert "bad-request" not in out.stderr and "$." not in out.stderr
    assert out.stderr.count("\n") == 1 and out.stdout == ""


def test_bad_arguments_leave_the_broker_untouched(broker: BrokerProc) -> None:
    assert portlease("lease", "--socket", broker.socket, "-n", "70000", "--detach").returncode == 2
    raw = Raw(broker.socket)
    try:
        assert raw.call({"op": "status"})["leases"] == []
    finally:
        raw.close()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["status", "--squatters", "--json"], "leave out --json and --watch"),
        (["status", "--watch", "0"], "--watch SECONDS must be a positive number"),
        (["wait", "70000"], "PORT 70000: must be 1 to 65535"),
        (["release", ""], "not a lease token"),
        (["renew", "x" * 129], "not a lease token"),
        (["release", "ab\x1bcd"], "not a lease token"),
        (["wait", "80", "--timeout", "-1"], "--timeout must be a non-negative number"),
    ],
)
def test_bad_other_arguments_exit_2(args: list[str], says: str) -> None:
    out = portlease(*args)
    assert out.returncode == 2 and says in out.stderr, out


# ---------------------------------------------------------------- help, version


def test_version() -> None:
    from importlib.metadata import version

    out = portlease("--version")
    assert out.returncode == 0 and out.stdout == f"portlease {version('portlease')}\n"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_help_names_the_tmp_fallback_and_the_exit_codes(command: str) -> None:
    out = portlease(command, "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert "/tmp/portlease-$UID/portlease.sock" in text
    for code in ("69", "126", "127", "128+N"):
        assert f"\n  {code} " in out.stdout, (code, out.stdout)


def test_the_count_limit_is_stated_once_and_is_the_one_the_broker_applies(broker: BrokerProc) -> None:
    """`lease --help` names the broker's per-request limit, from the protocol's constant."""
    from portlease.client import protocol as p

    text = " ".join(portlease("lease", "--help").stdout.split())
    limit = p.DEFAULT_PORTS_PER_REQUEST
    assert f"a broker grants at most its max_ports_per_request, {limit} unless configured" in text
    assert str(p.MAX_COUNT) not in text  # the wire's bound is not a limit anyone meets
    over = portlease("lease", "--socket", broker.socket, "-n", str(limit + 1), "--", "true")
    assert over.returncode == 69 and f"limit of {limit} ports" in over.stderr, over.stderr


def test_a_bare_number_as_cmd_suggests_the_count_option(broker: BrokerProc) -> None:
    out = portlease("lease", "--socket", broker.socket, "3", "--", "true")
    assert out.returncode == 127, out
    assert "cannot run 3: No such file or directory" in out.stderr
    assert "did you mean `portlease lease -n 3 -- true`?" in out.stderr, out.stderr
    # A command that is not a number gets no such guess.
    out = portlease("lease", "--socket", broker.socket, "--", "no-such-command-x")
    assert out.returncode == 127 and "did you mean" not in out.stderr, out.stderr


def test_serve_on_a_served_socket_names_the_broker_and_points_at_status(broker: BrokerProc) -> None:
    assert broker.proc is not None
    out = portlease("serve", "--socket", broker.socket)
    assert out.returncode == 75, out
    assert f"another portlease broker is serving on {broker.socket} (pid {broker.proc.pid}, " in out.stderr
    assert f"`portlease status --socket {broker.socket}`" in out.stderr, out.stderr


def test_serve_help_tells_the_truth_about_its_socket() -> None:
    text = " ".join(portlease("serve", "--help").stdout.split())
    assert "socket to listen on (default: $PORTLEASE_SOCKET, else the per-user socket" in text
    assert "/run/portlease/portlease.sock is used only when given here or by the system service" in text


@pytest.mark.parametrize("command", ["renew", "release"])
def test_token_has_help_text(command: str) -> None:
    text = " ".join(portlease(command, "--help").stdout.split())
    assert "TOKEN the lease's token, as `lease --detach` printed it" in text


def test_serve_with_system_socket_absent_uses_the_per_user_socket(tmp_path: Path) -> None:
    # What `serve --help` promises: without --socket or PORTLEASE_SOCKET, the per-user path.
    env = {k: v for k, v in os.environ.items() if k != "PORTLEASE_SOCKET"}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    code = (
        "from portlease.broker.serve import _serve_config\n"
        "from portlease.client.cli.main import build_parser\n"
        "print(_serve_config(build_parser().parse_args(['serve'])).socket)\n"
    )
    out = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == str(tmp_path / "portlease" / "portlease.sock"), out.stderr
    env.pop("XDG_RUNTIME_DIR")
    out = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"/tmp/portlease-{os.getuid()}/portlease.sock", out.stderr


# ---------------------------------------------------------------- BrokenPipe


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_status_into_a_closed_pipe_exits_quietly(broker: BrokerProc, flags: list[str]) -> None:
    with Connection(broker.socket) as conn:
        for _ in range(5):
            conn.lease(1, note="x" * 200, detach=True, ttl=60)
        r, w = os.pipe()
        os.close(r)  # the reader is gone before a byte is written: EPIPE, every time
        try:
            proc = subprocess.run(
                [PYTHON, "-m", "portlease", "status", "--socket", broker.socket, *flags],
                stdout=w, stderr=subprocess.PIPE, text=True, timeout=60,
            )
        finally:
            os.close(w)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize("flags", ["", "--json"])
def test_status_piped_into_head_exits_zero_without_traceback(broker: BrokerProc, flags: str) -> None:
    with Connection(broker.socket) as conn:
        for _ in range(8):
            conn.lease(1, note="y" * 100, detach=True, ttl=60)
        script = (f"set -o pipefail; {PYTHON} -m portlease status --socket {broker.socket} "
                  f"{flags} 2>err | head -2; echo \"status=${{PIPESTATUS[0]}}\"")
        out = subprocess.run(["bash", "-c", script], cwd=broker.dir, capture_output=True, text=True,
                             timeout=60)
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and lines[-1] == "status=0", (out, (broker.dir / "err").read_text())
    assert (broker.dir / "err").read_text() == ""


# ---------------------------------------------------------------- --export


def test_export_sets_the_shell_variables_and_release_ends_it(broker: BrokerProc) -> None:
    script = (
        f'eval "$({PYTHON} -m portlease lease --socket {broker.socket} -n 3 --detach '
        f'--export --env DB_PORT=2 --note export-test)" || exit 9\n'
        'echo "$PORTLEASE_PORTS|$PORTLEASE_PORT|$PORTLEASE_TOKEN|$DB_PORT"\n'
        f'{PYTHON} -m portlease status --socket {broker.socket} --json\n'
        f'{PYTHON} -m portlease release --socket {broker.socket} "$PORTLEASE_TOKEN" || exit 8\n'
        f'{PYTHON} -m portlease status --socket {broker.socket} --json\n'
    )
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PORTLEASE_AUTOSTART="0"))
    assert out.returncode == 0, out
    first, rest = out.stdout.split("\n", 1)
    ports, port, token, db = first.split("|")
    got = [int(x) for x in ports.split()]
    assert len(got) == 3 and got == list(range(got[0], got[0] + 3))
    assert int(port) == got[0] and int(db) == got[2] and len(token) == 32
    decoder = json.JSONDecoder()
    held, end = decoder.raw_decode(rest)
    after = json.loads(rest[end:])
    assert [i["ports"] for i in held["leases"]] == [got]
    assert held["leases"][0]["note"] == "export-test"
    assert after["leases"] == []


def test_export_output_is_shell_quoted(broker: BrokerProc) -> None:
    out = portlease("lease", "--socket", broker.socket, "-n", "2", "--detach", "--export")
    lines = out.stdout.splitlines()
    assert lines[0].startswith("export PORTLEASE_PORTS='") and lines[0].endswith("'")
    assert lines[1].startswith("export PORTLEASE_PORT=")
    assert lines[2].startswith("export PORTLEASE_TOKEN=")


# ---------------------------------------------------------------- status rendering


def test_status_shows_the_command_as_typed_and_escapes_every_cell(broker: BrokerProc) -> None:
    hostile = "\x1b[2J\x1b[Hroot: 1 lease, 1 port\r\n  21000   attached  1 \x07\x9b\x7f\u202e"
    with Connection(broker.socket) as conn:
        conn.lease(1, note=hostile, detach=True, ttl=60)
        wrapper = subprocess.Popen(
            [PYTHON, "-m", "portlease", "lease", "--socket", broker.socket, "-n", "3",
             "--note", "itests", "--", "sh", "-c", "echo up; read _"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PORTLEASE_AUTOSTART="0"),
        )
        try:
            assert wrapper.stdout is not None and wrapper.stdout.readline() == "up\n"
            text = portlease("status", "--socket", broker.socket).stdout
            data = json.loads(portlease("status", "--socket", broker.socket, "--json").stdout)
        finally:
            wrapper.communicate("\n", timeout=30)
    # No byte that could steer a terminal, and no forged line.
    assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F or c == "\u202e"
                   for c in text)
    lines = text.splitlines()
    assert len(lines) == 5, text  # user, header, two leases, summary
    assert sum(line.startswith("  ") for line in lines) == 3
    forged = next(line for line in lines if "\\x1b[2J" in line)
    assert ("\\x1b[2J\\x1b[Hroot: 1 lease, 1 port\\r\\n  21000   attached  1 "
                           "\\x07\\x9b\\x7f\\u202e | ") in forged
    typed = next(line for line in lines if "itests" in line)
    assert typed.endswith(f"itests | portlease lease --socket {broker.socket} -n 3 --note itests "
                          "-- sh -c echo up; read _")
    assert "python" not in typed
    # --json stays exact.
    assert hostile in [i.get("note") for i in data["leases"]]
    # Two leases; two connections (this test's and the wrapper's) besides the status call.
    assert lines[-1].startswith("2 leases, 4 ports held,") and ", 2 clients," in lines[-1]


def test_status_of_the_installed_entry_point_reads_as_typed(broker: BrokerProc) -> None:
    # The script pip installed beside this interpreter: a venv's bin/ is not on PATH
    # unless the venv is activated (the README's command does not activate it).
    exe = shutil.which("portlease", path=os.path.dirname(sys.executable)) or shutil.which("portlease")
    if exe is None:
        pytest.skip("no `portlease` script beside this interpreter or on PATH")
    wrapper = subprocess.Popen(
        [exe, "lease", "--socket", broker.socket, "-n", "2", "--", "sh", "-c", "echo up; read _"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PORTLEASE_AUTOSTART="0"),
    )
    try:
        assert wrapper.stdout is not None and wrapper.stdout.readline() == "up\n"
        text = portlease("status", "--socket", broker.socket).stdout
    finally:
        wrapper.communicate("\n", timeout=30)
    line = next(line for line in text.splitlines() if "attached" in line)
    assert line.endswith(f"| portlease lease --socket {broker.socket} -n 2 -- sh -c echo up; read _")


def test_typed_command_strips_interpreter_only_before_known_entry_points() -> None:
    assert typed_command("/venv/bin/python3 /venv/bin/portlease lease -n 3 -- ./run-itests.sh") == (
        "portlease lease -n 3 -- ./run-itests.sh")
    assert typed_command("/usr/bin/python3.11 -u -X dev /usr/local/bin/pytest -n 4") == "pytest -n 4"
    assert typed_command("python3 -m portlease lease -n 2") == "portlease lease -n 2"
    assert typed_command("python3 -m pytest -q") == "pytest -q"
    assert typed_command("/venv/bin/portlease status") == "portlease status"
    # A script people run by path keeps its interpreter: that is what they typed.
    assert typed_command("python3 ./serve.py --port 1") == "python3 ./serve.py --port 1"
    assert typed_command("sh -c sleep 1") == "sh -c sleep 1"


def test_escape_makes_controls_visible_and_keeps_text() -> None:
    assert escape("plain text, ünïcode ✓") == "plain text, ünïcode ✓"
    assert escape("a\nb\rc\td\x00e\x1b[31mf\x7fg\x85h\x9bi") == (
        "a\\nb\\rc\\td\\x00e\\x1b[31mf\\x7fg\\x85h\\x9bi")
    assert escape("x\u2028y\u2029z\u202ew\ufeff") == "x\\u2028y\\u2029z\\u202ew\\ufeff"
    assert escape("back\\slash") == "back\\\\slash"


def test_serve_without_trio_says_which_extra_to_install(tmp_path: Path) -> None:
    # As in the lean client install: trio cannot be imported.
    code = ("import sys; sys.modules['trio'] = None\n"
            "from portlease.cli import main\n"
            f"sys.exit(main(['serve', '--socket', {str(tmp_path / 's.sock')!r}]))\n")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr == ("portlease: `portlease serve` needs the broker's dependencies (trio is "
                          "missing): pip install 'portlease[broker]'\n")


def test_status_json_watch_prints_one_object_per_refresh(broker: BrokerProc) -> None:
    import signal

    watch = subprocess.Popen(
        [PYTHON, "-m", "portlease", "status", "--socket", broker.socket, "--json",
         "--watch", "0.05"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PORTLEASE_AUTOSTART="0"),
    )
    assert watch.stdout is not None
    first = json.loads(watch.stdout.readline())
    with Connection(broker.socket) as conn:
        conn.lease(2)
        while True:  # later lines show the lease; each line is a whole reply
            line = json.loads(watch.stdout.readline())
            if line["summary"]["leases"] == 1:
                break
    watch.send_signal(signal.SIGINT)
    rest, _ = watch.communicate(timeout=30)
    assert watch.returncode == 0
    assert first["summary"]["leases"] == 0 and "\x1b" not in rest
    assert all(json.loads(x)["reply"] == "status" for x in rest.splitlines())


def test_metrics_prints_openmetrics_text_that_counts_grants(broker: BrokerProc) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    with Connection(broker.socket) as conn:
        conn.lease(3)
        out = portlease("metrics", "--socket", broker.socket)
        assert out.returncode == 0, out.stderr
        assert out.stdout.endswith("# EOF\n")
        families = {f.name: f for f in text_string_to_metric_families(out.stdout)}
        grants = {s.name: s.value for s in families["portlease_grants"].samples}
        assert grants["portlease_grants_total"] == 1
        held = {s.labels["state"]: s.value for s in families["portlease_ports"].samples}
        assert held["held"] == 3
        assert "portlease_grants_total 1" in conn.metrics()  # the same counters through the client

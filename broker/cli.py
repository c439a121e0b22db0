"""The ``portlease`` command: ``serve`` runs the broker; the rest are clients.

Only ``serve`` imports trio (lazily): ``portlease lease -- CMD`` loads nothing
but the sync client, which keeps its start-up short (``bench/clients.py``
measures ``portlease lease -- true``).

Arguments are checked here, against the protocol's own bounds, before anything
is sent: a person who typed ``-n 70000`` gets a sentence and exit status 2, not
a broker's validation message and 69.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from portlease.client import protocol as p
from portlease.client.errors import (
    BrokerUnavailable,
    ConnectionLost,
    LeaseError,
    PortleaseError,
)
from portlease.client.sync import Connection, default_note

from .errors import ConfigError, StartupError
from .listeners import check_host, check_offset, parse_hold, parse_listen
from .status_view import render_squatters, render_status

if TYPE_CHECKING:
    from .config import Config

__all__ = ["build_parser", "main", "render_status"]

EXIT_USAGE = 2
EXIT_BROKER = 69  # EX_UNAVAILABLE: no broker, or it refused
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127

EXIT_CODES = f"""\
exit status:
  0      success; with `lease -- CMD`: CMD's own status
  1      an error the message explains (a leased port could not be bound,
         `wait` timed out, the broker could not start)
  2      bad arguments or configuration
  69     no broker answers, or the broker refused (no free ports, quota)
  {EXIT_CANNOT_RUN}    `lease -- CMD`: CMD exists but cannot be run (not executable)
  {EXIT_NOT_FOUND}    `lease -- CMD`: CMD was not found
  128+N  `lease -- CMD`: CMD was killed by signal N
"""
_CLIENT_SOCKET_NOTE = """
socket: --socket, else $PORTLEASE_SOCKET, else /run/portlease/portlease.sock when it
exists (the system service), else the per-user socket
$XDG_RUNTIME_DIR/portlease/portlease.sock, or /tmp/portlease-$UID/portlease.sock
when XDG_RUNTIME_DIR is unset.
"""
_SERVE_SOCKET_NOTE = """
socket: --socket, else the config file's `socket`, else $PORTLEASE_SOCKET, else the
per-user socket $XDG_RUNTIME_DIR/portlease/portlease.sock, or
/tmp/portlease-$UID/portlease.sock when XDG_RUNTIME_DIR is unset. The system socket
/run/portlease/portlease.sock is served only when named here or passed by systemd.
"""

_SOCKET_HELP = (
    "broker socket (default: $PORTLEASE_SOCKET, else /run/portlease/portlease.sock if it "
    "exists, else $XDG_RUNTIME_DIR/portlease/portlease.sock, or /tmp/portlease-$UID/"
    "portlease.sock without XDG_RUNTIME_DIR)"
)
_SERVE_SOCKET_HELP = (
    "socket to listen on (default: $PORTLEASE_SOCKET, else the per-user socket "
    "$XDG_RUNTIME_DIR/portlease/portlease.sock, or /tmp/portlease-$UID/portlease.sock "
    "without XDG_RUNTIME_DIR; /run/portlease/portlease.sock is used only when given here "
    "or by the system service)"
)
_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _socket_arg(parser: argparse.ArgumentParser, text: str = _SOCKET_HELP) -> None:
    parser.add_argument("--socket", metavar="PATH", help=text)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("portlease")
    except PackageNotFoundError:  # run from a tree that was never installed
        return "unknown"


def _sub(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str,
         usage: str | None = None) -> argparse.ArgumentParser:
    note = _SERVE_SOCKET_NOTE if name == "serve" else _CLIENT_SOCKET_NOTE
    return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                          epilog=EXIT_CODES + note,
                          formatter_class=argparse.RawDescriptionHelpFormatter, usage=usage)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portlease",
        description="Lease TCP/UDP ports from a shared broker, released when the holder exits.",
        epilog=EXIT_CODES + _CLIENT_SOCKET_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"portlease {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _sub(sub, "serve", "run the broker in the foreground")
    _socket_arg(serve, _SERVE_SOCKET_HELP)
    serve.add_argument("--config", metavar="FILE.toml", help="TOML config file (SIGHUP re-reads it)")
    serve.add_argument("--range", metavar="LO-HI", help="ports to grant (default 10000-32000)")
    serve.add_argument("--ttl", type=float, metavar="SECONDS",
                       help="backstop lifetime of detached and restored leases (default 120)")
    serve.add_argument("--state", metavar="PATH", help="lease journal (default: next to the socket)")
    serve.add_argument("--group", help="group that may use the socket (mode 0660)")
    serve.add_argument("--portalloc-dir", metavar="DIR",
                       help="share the range with fedimint-portalloc users of this directory")
    serve.add_argument("--idle-exit", type=float, metavar="SECONDS",
                       help="exit after this long with no client and no lease (default: never)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--metrics-textfile", metavar="PATH",
                       help="write the metrics there every 5 s, for node_exporter's textfile collector")

    lease = _sub(
        sub, "lease", "lease ports, run CMD with them, release them when CMD ends",
        usage="portlease lease [-n COUNT] [--env NAME=OFFSET]... [--listen OFFSET[/udp][=NAME]]...\n"
        "                       [--hold OFFSET]... [--note TEXT] -- CMD [ARG]...\n"
        "       portlease lease [-n COUNT] --detach [--ttl SECONDS] [--json | --export]",
    )
    _socket_arg(lease)
    lease.add_argument("-n", "--count", type=int, default=1,
                       help=f"consecutive ports, 1 to {_COUNT_MAX} (default 1)")
    lease.add_argument("--env", action="append", default=[], metavar="NAME=OFFSET",
                       help="set NAME to the port at OFFSET (0 = first) in CMD's environment "
                       "(or in --export's output)")
    lease.add_argument("--note", help="shown by `portlease status` (default: the command line)")
    lease.add_argument("--listen", action="append", default=[], metavar="OFFSET[/udp][=NAME]",
                       help="bind the port at OFFSET (TCP listening, or UDP) and pass it to CMD "
                       "as fd 3, 4, … with LISTEN_FDS, LISTEN_FDNAMES (NAME, default portN) "
                       "and LISTEN_PID, as systemd socket activation does")
    lease.add_argument("--listen-host", metavar="ADDR",
                       help="address for --listen (default: every IPv4 and IPv6 address)")
    lease.add_argument("--hold", action="append", default=[], metavar="OFFSET",
                       help="keep the TCP port at OFFSET bound (not listening) until a process "
                       "of CMD listens on it: binds without SO_REUSEADDR fail meanwhile")
    lease.add_argument("--hold-timeout", type=float, metavar="SECONDS", default=60.0,
                       help="give up holding after this long (default 60)")
    lease.add_argument("--detach", action="store_true",
                       help="print the ports and token and exit; the lease lives by its TTL")
    lease.add_argument("--ttl", type=float, metavar="SECONDS",
                       help=f"TTL of a detached lease, {p.MIN_TTL:g} to {p.MAX_TTL:g} "
                       "(default: the broker's)")
    lease.add_argument("--json", action="store_true", help="with --detach: print JSON")
    lease.add_argument("--export", action="store_true",
                       help="with --detach: print shell `export` lines for "
                       "eval \"$(portlease lease --detach --export)\" (PORTLEASE_PORTS, "
                       "PORTLEASE_PORT, PORTLEASE_TOKEN); end it with "
                       "portlease release \"$PORTLEASE_TOKEN\"")
    lease.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG]...")

    for name, text in (("renew", "push a detached lease's expiry forward by its TTL"),
                       ("release", "end a lease now; its ports can be granted again")):
        cmd = _sub(sub, name, text)
        _socket_arg(cmd)
        cmd.add_argument("token", metavar="TOKEN",
                         help="the lease's token, as `lease --detach` printed it "
                         "(e.g. \"$PORTLEASE_TOKEN\")")

    status = _sub(sub, "status", "show every lease and the free ports")
    _socket_arg(status)
    status.add_argument("--json", action="store_true",
                        help="machine-readable output (with --watch: one JSON object per line)")
    status.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                        help="refresh in place every SECONDS (default 2)")
    status.add_argument("--squatters", action="store_true",
                        help="list sockets bound to ports in the range that no lease covers, "
                        "with pid and command where /proc shows them")

    metrics = _sub(sub, "metrics", "print the broker's metrics (OpenMetrics text, for Prometheus)")
    _socket_arg(metrics)

    wait = _sub(sub, "wait", "wait until each PORT has a listener")
    wait.add_argument("ports", metavar="PORT", nargs="+", type=int, help="TCP port to wait for")
    wait.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                      help="give up after this long, exit 1 (default 30)")
    wait.add_argument("--pid", type=int, metavar="PID",
                      help="count only listeners of PID or its descendants")
    return parser


_COUNT_MAX = 65535
_TOKEN_MAX = 128  # the protocol's bound on a token's length


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:
        # `portlease status | head`: the reader is gone, nothing left to say. Point
        # stdout at /dev/null so the interpreter's final flush stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


_BROKER_DEPENDENCIES = ("trio", "sdnotify")


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "serve":
            try:
                return _serve(args)
            except ModuleNotFoundError as exc:
                if exc.name not in _BROKER_DEPENDENCIES:
                    raise
                # The lean client install has no trio: say how to get the broker.
                print(f"portlease: `portlease serve` needs the broker's dependencies ({exc.name} "
                      "is missing): pip install 'portlease[broker]'", file=sys.stderr)
                return 1
        if args.command == "lease":
            return _lease(args)
        if args.command in ("renew", "release"):
            return _token_op(args)
        if args.command == "status":
            return _status(args)
        if args.command == "wait":
            return _wait(args)
        if args.command == "metrics":
            return _metrics(args)
    except (BrokerUnavailable, LeaseError) as exc:
        print(f"portlease: {exc}", file=sys.stderr)
        return EXIT_BROKER
    except (ConfigError, StartupError) as exc:
        print(f"portlease: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else 1
    except PortleaseError as exc:
        print(f"portlease: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.command)


# ---------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    import functools

    config = _serve_config(args)
    # A parent that blocked signals (as `portlease lease -- CMD` does while it
    # waits) must not leave the broker deaf to SIGTERM and SIGHUP.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    from . import logs

    # Priority prefixes for journald when stderr is the journal (logs.py).
    logs.setup(config.log_level)
    from .server import run

    # SIGHUP re-reads the file and applies the same flags on top again.
    reload = functools.partial(_serve_config, args) if args.config else None
    return run(config, reload=reload)


def _serve_config(args: argparse.Namespace) -> Config:
    """The config file (if any) with the command line's flags on top."""
    from .config import Config, load_file, parse_range

    config = load_file(args.config) if args.config else Config()
    if args.socket:
        config.socket = args.socket
    if not config.socket:
        from portlease.client.paths import explicit_socket, user_socket

        config.socket = explicit_socket() or user_socket()
    if args.range:
        config.port_min, config.port_max = parse_range(args.range)
    for attr in ("ttl", "state", "group", "portalloc_dir", "idle_exit", "log_level", "metrics_textfile"):
        value = getattr(args, attr)
        if value is not None:
            setattr(config, attr, value)
    if config.ttl <= 0:
        raise ConfigError("--ttl must be positive")
    return config


# ---------------------------------------------------------------- lease


def _check_count(count: int) -> None:
    if not 1 <= count <= _COUNT_MAX:
        raise ConfigError(f"-n {count}: COUNT must be 1 to {_COUNT_MAX} (consecutive ports)")


def _check_ttl(ttl: float | None) -> None:
    if ttl is None:
        return
    if math.isnan(ttl) or not p.MIN_TTL <= ttl <= p.MAX_TTL:
        raise ConfigError(
            f"--ttl {ttl:g}: SECONDS must be {p.MIN_TTL:g} to {p.MAX_TTL:g} "
            f"({p.MAX_TTL / 3600:g} h); renew the lease to keep it longer"
        )


def _parse_env(specs: list[str], count: int) -> dict[str, int]:
    out = {}
    for spec in specs:
        name, sep, offset = spec.partition("=")
        if not sep or not _SHELL_NAME.match(name):
            raise ConfigError(f"--env {spec!r}: expected NAME=OFFSET with NAME a shell variable "
                              "name (letters, digits, _; not starting with a digit), e.g. PGPORT=0")
        if name == "PATH" or name.startswith("PORTLEASE_"):
            raise ConfigError(f"--env {spec!r}: {name} is reserved (PATH finds CMD; PORTLEASE_* "
                              "are set by portlease); pick another name")
        try:
            off = int(offset)
        except ValueError:
            raise ConfigError(f"--env {spec!r}: OFFSET must be a whole number") from None
        out[name] = check_offset("--env", spec, off, count)
    return out


def _lease(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    _check_count(args.count)
    _check_ttl(args.ttl)
    env_offsets = _parse_env(args.env, args.count)
    listen = parse_listen(args.listen, args.count)
    hold = parse_hold(args.hold, args.count)
    if not (math.isfinite(args.hold_timeout) and args.hold_timeout > 0):
        raise ConfigError("--hold-timeout must be a positive number of seconds")
    if args.listen_host is not None:
        if not listen:
            raise ConfigError("--listen-host applies to --listen only")
        check_host(args.listen_host)
    both = {s.offset for s in listen if not s.udp} & set(hold)
    if both:
        raise ConfigError(f"--hold {min(both)}: that port is already bound by --listen")
    if args.detach:
        if cmd:
            raise ConfigError("--detach takes no command")
        if listen or hold:
            raise ConfigError("--listen and --hold need a command (-- CMD), not --detach")
        if args.json and args.export:
            raise ConfigError("--json and --export: pick one")
        return _detached(args, env_offsets)
    if args.json or args.export:
        raise ConfigError("--json and --export apply to --detach only (with -- CMD the ports are "
                          "in CMD's environment)")
    if not cmd:
        raise ConfigError("give a command after --, or --detach")
    if args.ttl is not None:
        raise ConfigError("--ttl applies to --detach leases only")
    from .wrapper import Plan, run

    note = args.note or " ".join([default_note() or "", shlex.join(cmd)]).strip()
    return run(Plan(cmd=cmd, count=args.count, socket=args.socket, note=note[:p.MAX_NOTE],
                    env_offsets=env_offsets, listen=listen, listen_host=args.listen_host,
                    hold=hold, hold_timeout=args.hold_timeout))


def _detached(args: argparse.Namespace, env_offsets: dict[str, int]) -> int:
    with _connect(args, autostart=True) as conn:
        lease = conn.lease(args.count, ttl=args.ttl, note=args.note or default_note(),
                           detach=True)
    if args.json:
        print(json.dumps({"ports": list(lease.ports), "token": lease.token,
                          "expires": lease.expires, "ttl": lease.ttl}))
    elif args.export:
        values = {"PORTLEASE_PORTS": " ".join(map(str, lease.ports)),
                  "PORTLEASE_PORT": str(lease.port), "PORTLEASE_TOKEN": lease.token}
        values.update({name: str(lease.ports[off]) for name, off in env_offsets.items()})
        for name, value in values.items():
            print(f"export {name}={shlex.quote(value)}")
    else:
        print(" ".join(map(str, lease.ports)))
        print(lease.token)
    return 0


# ---------------------------------------------------------------- renew / release / status / metrics


def _connect(args: argparse.Namespace, *, autostart: bool = False) -> Connection:
    # One request and gone: no reclaim thread. Only `lease` starts a broker when
    # none answers; a new broker has no lease to show, renew or release.
    return Connection(args.socket, reclaim=False, client="portlease-cli", autostart=autostart)


def _token_op(args: argparse.Namespace) -> int:
    if not 1 <= len(args.token) <= _TOKEN_MAX or not args.token.isprintable():
        raise ConfigError(f"TOKEN {args.token[:40]!r}: not a lease token (32 hex digits, as "
                          "`portlease lease --detach` prints it)")
    with _connect(args) as conn:
        if args.command == "renew":
            expires = conn.renew(args.token)
            if expires is not None:
                print(f"expires in {expires - time.time():.0f} s")
        else:
            conn.release(args.token)
    return 0


def _full_status(conn: Connection) -> p.StatusReply:
    """Every lease, following the broker's pages (``more``/``after``) when it has many."""
    reply = conn.status()
    while reply.more and reply.leases:
        after = reply.leases[-1].ports[-1]
        page = conn.status(after=after)
        if not page.leases or page.leases[0].ports[0] <= after:
            break  # a broker that does not page: never loop on the same leases
        reply.leases.extend(page.leases)
        reply.more = page.more
        reply.summary = page.summary
    return reply


def _status(args: argparse.Namespace) -> int:
    if args.squatters and (args.json or args.watch is not None):
        raise ConfigError("--squatters shows a table once; leave out --json and --watch")
    if args.watch is not None:
        if not (math.isfinite(args.watch) and args.watch > 0):
            raise ConfigError("--watch SECONDS must be a positive number")
        return _watch_status(args)
    with _connect(args) as conn:
        reply = _full_status(conn)
    if args.squatters:
        print(_squatters_table(reply))
    elif args.json:
        print(json.dumps(p.to_builtins(reply), indent=2))
    else:
        # One of the broker's clients was this command.
        print(render_status(reply, time.time(), self_clients=1))
    sys.stdout.flush()
    return 0


def _squatters_table(reply: p.StatusReply) -> str:
    from . import procnet
    from .procinfo import read_cmdline

    low, high = reply.summary.range
    found = procnet.squatters(low, high, [(i.ports[0], len(i.ports)) for i in reply.leases])
    owners = procnet.owners(s.inode for s in found)
    rows = []
    for s in found:
        pid = owners.get(s.inode)
        rows.append((s.proto + ("6" if s.family == 6 else ""), s.port, s.address, pid, s.uid,
                     read_cmdline(pid)))
    return render_squatters(rows)


def _watch_status(args: argparse.Namespace) -> int:
    """Redraw the status every ``args.watch`` seconds; wait out broker restarts.

    With ``--json`` each refresh is one JSON object on its own line instead.
    """
    conn: Connection | None = None
    try:
        while True:
            try:
                if conn is None:
                    conn = _connect(args)
                reply = _full_status(conn)
                text = (json.dumps(p.to_builtins(reply)) if args.json
                        else render_status(reply, time.time(), self_clients=1))
            except (BrokerUnavailable, ConnectionLost) as exc:
                # Watching is most useful exactly while the broker restarts.
                if conn is not None:
                    conn.close()
                    conn = None
                if args.json:
                    print(f"portlease: {exc}", file=sys.stderr)
                    text = ""
                else:
                    text = f"portlease: {exc}\n(retrying every {args.watch:g} s)"
            if args.json:
                if text:
                    sys.stdout.write(text + "\n")
            else:
                # Home the cursor and overwrite line by line (erasing each line's
                # tail and whatever is below) instead of clearing: no flicker.
                frame = "".join(f"{line}\x1b[K\n" for line in text.splitlines())
                sys.stdout.write("\x1b[H" + frame + "\x1b[J")
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    finally:
        if conn is not None:
            conn.close()


def _metrics(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        text = conn.metrics()
    sys.stdout.write(text)  # a closed pipe is main()'s business
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------- wait


WAIT_POLL = 0.05
"""Seconds between looks at the kernel's socket tables."""


def _wait(args: argparse.Namespace) -> int:
    """Exit 0 once every port has a TCP listener (of ``--pid``'s tree, if given); 1 on timeout."""
    from . import procnet

    for port in args.ports:
        if not 1 <= port <= 65535:
            raise ConfigError(f"PORT {port}: must be 1 to 65535")
    if not (math.isfinite(args.timeout) and args.timeout >= 0):
        raise ConfigError("--timeout must be a non-negative number of seconds")
    if args.pid is not None and args.pid < 1:
        raise ConfigError("--pid must be a process id")
    wanted = set(args.ports)
    deadline = time.monotonic() + args.timeout
    while True:
        missing = wanted - procnet.listening(wanted, args.pid)
        if not missing:
            return 0
        if args.pid is not None and not procnet.descendants(args.pid):
            print(f"portlease: process {args.pid} is not running; port "
                  f"{', '.join(map(str, sorted(missing)))} never got its listener", file=sys.stderr)
            return 1
        if time.monotonic() >= deadline:
            whose = f" by process {args.pid} or its descendants" if args.pid is not None else ""
            print(f"portlease: timed out after {args.timeout:g} s: nothing listens{whose} on "
                  f"port {', '.join(map(str, sorted(missing)))}", file=sys.stderr)
            return 1
        time.sleep(WAIT_POLL)

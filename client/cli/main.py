"""The ``portlease`` command's parser and dispatch, for every subcommand.

Every subcommand here but ``serve`` is a client: it needs msgspec only, never
trio. ``serve`` is handed in by the caller (:mod:`portlease.cli`), which alone
knows the broker, so nothing under :mod:`portlease.client` imports it.

Arguments are checked here, against the protocol's own bounds, before anything
is sent: a person who typed ``-n 70000`` gets a sentence and exit status 2, not
a broker's validation message and 69.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence

from portlease import __version__
from portlease.client import protocol as p
from portlease.client.protocol.errors import (
    BrokerUnavailable,
    ConfigError,
    LeaseError,
    PortleaseError,
    StartupError,
)

from .exitcodes import EXIT_BROKER, EXIT_CODES, EXIT_USAGE

__all__ = ["ServeCommand", "build_parser", "main"]

ServeCommand = Callable[[argparse.Namespace], int]
"""Runs ``portlease serve`` with its parsed arguments; given by :mod:`portlease.cli`."""

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
    parser.add_argument("--version", action="version", version=f"portlease {__version__}")
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
    serve.add_argument("--portserver", metavar="ADDR",
                       help="also answer Google portpicker (PORTSERVER_ADDRESS) on this socket: "
                       "a path, or @NAME for the abstract namespace (default: off)")

    lease = _sub(
        sub, "lease", "lease ports, run CMD with them, release them when CMD ends",
        usage="portlease lease [-n COUNT] [--env NAME=OFFSET]... [--listen OFFSET[/udp][=NAME]]...\n"
        "                       [--hold OFFSET]... [--note TEXT] -- CMD [ARG]...\n"
        "       portlease lease [-n COUNT] --detach [--ttl SECONDS] [--json | --export]",
    )
    _socket_arg(lease)
    lease.add_argument("-n", "--count", type=int, default=1,
                       help=f"consecutive ports, 1 to {p.MAX_COUNT} (default 1)")
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



def main(argv: Sequence[str] | None = None, *, serve: ServeCommand | None = None) -> int:
    """Run the ``portlease`` command; ``serve`` runs the broker (None: not installed here)."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args, serve)
    except BrokenPipeError:
        # `portlease status | head`: the reader is gone, nothing left to say. Point
        # stdout at /dev/null so the interpreter's final flush stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _dispatch(args: argparse.Namespace, serve: ServeCommand | None) -> int:
    # Each command's module is imported when it runs: `portlease lease -- true`
    # pays for the wrapper and the sync client, not for status tables.
    try:
        if args.command == "serve":
            if serve is None:
                raise ConfigError("`portlease serve` is not available from this entry point")
            return serve(args)
        if args.command == "lease":
            from . import lease

            return lease.run(args)
        if args.command in ("renew", "release"):
            from . import tokens

            return tokens.run(args)
        if args.command == "status":
            from . import status

            return status.run(args)
        if args.command == "wait":
            from . import wait

            return wait.run(args)
        if args.command == "metrics":
            from . import metrics

            return metrics.run(args)
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

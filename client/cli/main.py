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
import sys
from collections.abc import Callable, Sequence

from portlease import __version__
from portlease.client import protocol as p
from portlease.client.host.locations import CLIENT_RULE
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

_SERVE_SOCKET_NOTE = """
socket: --socket, else the config file's `socket`, else $PORTLEASE_SOCKET, else the
per-user socket $XDG_RUNTIME_DIR/portlease/portlease.sock, or
/tmp/portlease-$UID/portlease.sock without XDG_RUNTIME_DIR. The system socket
/run/portlease/portlease.sock is served only when named here or passed by systemd.
"""

_SOCKET_HELP = f"broker socket (default: {CLIENT_RULE.removeprefix('--socket, else ')})"
_SERVE_SOCKET_HELP = (
    "socket to listen on (default: $PORTLEASE_SOCKET, else the per-user socket "
    "$XDG_RUNTIME_DIR/portlease/portlease.sock, or /tmp/portlease-$UID/portlease.sock "
    "without XDG_RUNTIME_DIR; /run/portlease/portlease.sock is used only when given here "
    "or by the system service)"
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, reading the terminal width itself.

    argparse makes a formatter for every ``add_argument`` and, without a width,
    imports :mod:`shutil` (and with it bz2, lzma, fnmatch) to ask for the
    terminal's: a few milliseconds on every start of a command run once per CI
    step. :func:`os.get_terminal_size` is what shutil asks too.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _columns() - 2 if width is None else width)


def _columns() -> int:
    # shutil.get_terminal_size's rule: $COLUMNS, else stdout's terminal, else 80.
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


def _wrap(text: str, width: int = 84) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


_CLIENT_SOCKET_NOTE = "\n" + _wrap("socket: " + CLIENT_RULE + ".") + "\n"


def _socket_arg(parser: argparse.ArgumentParser, text: str = _SOCKET_HELP) -> None:
    parser.add_argument("--socket", metavar="PATH", help=text)


def _add_serve(serve: argparse.ArgumentParser) -> None:
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

_LEASE_USAGE = (
    "portlease lease [-n COUNT] [--env NAME=OFFSET]... [--listen OFFSET[/udp][=NAME]]...\n"
    "                       [--hold OFFSET]... [--note TEXT] -- CMD [ARG]...\n"
    "       portlease lease [-n COUNT] --detach [--ttl SECONDS] [--json | --export]"
)


def _add_lease(lease: argparse.ArgumentParser) -> None:
    _socket_arg(lease)
    lease.add_argument("-n", "--count", type=int, default=1,
                       help=f"consecutive ports (default 1); a broker grants at most its "
                       f"max_ports_per_request, {p.DEFAULT_PORTS_PER_REQUEST} unless configured")
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


def _add_token(cmd: argparse.ArgumentParser) -> None:
    _socket_arg(cmd)
    cmd.add_argument("token", metavar="TOKEN",
                     help="the lease's token, as `lease --detach` printed it "
                     "(e.g. \"$PORTLEASE_TOKEN\")")


def _add_status(status: argparse.ArgumentParser) -> None:
    _socket_arg(status)
    status.add_argument("--json", action="store_true",
                        help="machine-readable output (with --watch: one JSON object per line)")
    status.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                        help="refresh every SECONDS (default 2): in place on a terminal, "
                        "else one plain frame per refresh, separated by a blank line")
    status.add_argument("--squatters", action="store_true",
                        help="list sockets bound to ports in the range that no lease covers, "
                        "with pid and command where /proc shows them")


def _add_wait(wait: argparse.ArgumentParser) -> None:
    wait.add_argument("ports", metavar="PORT", nargs="+", type=int, help="TCP port to wait for")
    wait.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                      help="give up after this long, exit 1 (default 30)")
    wait.add_argument("--pid", type=int, metavar="PID",
                      help="count only listeners of PID or its descendants")


# Every subcommand, in --help's order: (help text, usage, what adds its arguments).
_COMMANDS: dict[str, tuple[str, str | None, Callable[[argparse.ArgumentParser], None]]] = {
    "serve": ("run the broker in the foreground", None, _add_serve),
    "lease": ("lease ports, run CMD with them, release them when CMD ends", _LEASE_USAGE,
              _add_lease),
    "renew": ("push a detached lease's expiry forward by its TTL", None, _add_token),
    "release": ("end a lease now; its ports can be granted again", None, _add_token),
    "status": ("show every lease and the free ports", None, _add_status),
    "metrics": ("print the broker's metrics (OpenMetrics text, for Prometheus)", None, _socket_arg),
    "wait": ("wait until each PORT has a listener", None, _add_wait),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``portlease`` parser; with ``command``, that subcommand's alone.

    Each subparser costs about a millisecond to build (argparse looks up a
    translation for every parser it makes), and a run uses one: :func:`main`
    builds only the subcommand named on the command line, from the same
    definitions, and every one for ``portlease --help`` or an unknown name.
    """
    parser = argparse.ArgumentParser(
        prog="portlease",
        description="Lease TCP/UDP ports from a shared broker, released when the holder exits.",
        epilog=EXIT_CODES + _CLIENT_SOCKET_NOTE,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"portlease {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, usage, add) in _COMMANDS.items():
        if command is not None and name != command:
            continue
        note = _SERVE_SOCKET_NOTE if name == "serve" else _CLIENT_SOCKET_NOTE
        add(sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                           epilog=EXIT_CODES + note, formatter_class=_Formatter, usage=usage))
    return parser


def _command_named(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names, if it names a known one: its first word not an option.

    The top-level parser has only ``-h`` and ``--version``, neither taking a value,
    so the first word that is not an option is the subcommand.
    """
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word if word in _COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None, *, serve: ServeCommand | None = None) -> int:
    """Run the ``portlease`` command; ``serve`` runs the broker (None: not installed here)."""
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(_command_named(argv)).parse_args(argv)
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

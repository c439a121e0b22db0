"""The ``portlease`` command: ``serve`` runs the broker; the rest are clients.

Only ``serve`` imports trio (lazily): ``portlease lease -- CMD`` starts in a
few tens of milliseconds because it loads nothing but the sync client.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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

if TYPE_CHECKING:
    from .config import Config

EXIT_USAGE = 2
EXIT_BROKER = 69  # EX_UNAVAILABLE: no broker, or it refused
EXIT_NOT_FOUND = 127


def _socket_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", metavar="PATH",
        help="broker socket (default: $PORTLEASE_SOCKET, /run/portlease/portlease.sock if it "
        "exists, else $XDG_RUNTIME_DIR/portlease/portlease.sock)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portlease",
        description="Lease TCP/UDP ports from a shared broker, released when the holder exits.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the broker in the foreground")
    _socket_arg(serve)
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

    lease = sub.add_parser(
        "lease", help="lease ports, run CMD with them, release them when CMD ends",
        usage="portlease lease [-n COUNT] [--env NAME=OFFSET]... [--note TEXT] -- CMD [ARG]...\n"
        "       portlease lease [-n COUNT] --detach [--ttl SECONDS] [--json]",
    )
    _socket_arg(lease)
    lease.add_argument("-n", "--count", type=int, default=1, help="consecutive ports (default 1)")
    lease.add_argument("--env", action="append", default=[], metavar="NAME=OFFSET",
                       help="set NAME to the port at OFFSET (0 = first) in CMD's environment")
    lease.add_argument("--note", help="shown by `portlease status` (default: the command line)")
    lease.add_argument("--detach", action="store_true",
                       help="print the ports and token and exit; the lease lives by its TTL")
    lease.add_argument("--ttl", type=float, metavar="SECONDS", help="TTL of a detached lease")
    lease.add_argument("--json", action="store_true", help="with --detach: print JSON")
    lease.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG]...")

    for name, text in (("renew", "push a detached lease's expiry forward"),
                       ("release", "end a lease now")):
        cmd = sub.add_parser(name, help=text)
        _socket_arg(cmd)
        cmd.add_argument("token")

    status = sub.add_parser("status", help="show every lease and the free ports")
    _socket_arg(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                        help="refresh in place every SECONDS (default 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "lease":
            return _lease(args)
        if args.command in ("renew", "release"):
            return _token_op(args)
        if args.command == "status":
            return _status(args)
    except BrokerUnavailable as exc:
        print(f"portlease: {exc}", file=sys.stderr)
        return EXIT_BROKER
    except LeaseError as exc:
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
    for attr in ("ttl", "state", "group", "portalloc_dir", "idle_exit", "log_level"):
        value = getattr(args, attr)
        if value is not None:
            setattr(config, attr, value)
    if config.ttl <= 0:
        raise ConfigError("--ttl must be positive")
    return config


# ---------------------------------------------------------------- lease


def _parse_env(specs: list[str], count: int) -> dict[str, int]:
    out = {}
    for spec in specs:
        name, sep, offset = spec.partition("=")
        if not sep or not name or not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise ConfigError(f"--env {spec!r}: expected NAME=OFFSET, e.g. PGPORT=0")
        try:
            off = int(offset)
        except ValueError:
            raise ConfigError(f"--env {spec!r}: OFFSET must be a whole number") from None
        if not 0 <= off < count:
            raise ConfigError(f"--env {spec!r}: OFFSET must be in 0..{count - 1} for -n {count}")
        out[name] = off
    return out


def _lease(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if args.count < 1:
        raise ConfigError("-n must be at least 1")
    env_offsets = _parse_env(args.env, args.count)
    if args.detach:
        if cmd:
            raise ConfigError("--detach takes no command")
        with Connection(args.socket, reclaim=False, client="portlease-cli") as conn:
            lease = conn.lease(args.count, ttl=args.ttl, note=args.note or default_note(),
                               detach=True)
        if args.json:
            print(json.dumps({"ports": list(lease.ports), "token": lease.token,
                              "expires": lease.expires, "ttl": lease.ttl}))
        else:
            print(" ".join(map(str, lease.ports)))
            print(lease.token)
        return 0
    if not cmd:
        raise ConfigError("give a command after --, or --detach")
    if args.ttl is not None:
        raise ConfigError("--ttl applies to --detach leases only")
    return _run_with_lease(args, cmd, env_offsets)


_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _run_with_lease(args: argparse.Namespace, cmd: list[str], env_offsets: dict[str, int]) -> int:
    # Block the signals we forward before any thread exists, so that every
    # thread inherits the mask and sigwaitinfo below is the one place they land.
    signal.pthread_sigmask(signal.SIG_BLOCK, (*_FORWARDED, signal.SIGCHLD))
    note = args.note or " ".join([default_note() or "", shlex.join(cmd)]).strip()
    with Connection(args.socket, client="portlease-cli") as conn:
        lease = conn.lease(args.count, note=note[:1024])
        env = dict(os.environ)
        env["PORTLEASE_PORTS"] = " ".join(map(str, lease.ports))
        env["PORTLEASE_PORT"] = str(lease.port)
        for name, offset in env_offsets.items():
            env[name] = str(lease.ports[offset])
        try:
            pid = os.posix_spawnp(cmd[0], cmd, env, setsigmask=())
        except OSError as exc:
            print(f"portlease: cannot run {cmd[0]}: {exc.strerror}", file=sys.stderr)
            return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else 126
        return _wait_forwarding(pid)


def _wait_forwarding(pid: int) -> int:
    """Wait for the child, passing on signals other processes send us."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return _exit_code(status)
        info = signal.sigwaitinfo((*_FORWARDED, signal.SIGCHLD))
        if info.si_signo == signal.SIGCHLD:
            continue
        # A terminal's ^C reaches the whole process group (the child included)
        # with si_pid 0; forwarding it would deliver it twice.
        if info.si_pid not in (0, pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, info.si_signo)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


# ---------------------------------------------------------------- renew / release / status


def _token_op(args: argparse.Namespace) -> int:
    with Connection(args.socket, reclaim=False, client="portlease-cli", autostart=False) as conn:
        if args.command == "renew":
            expires = conn.renew(args.token)
            if expires is not None:
                print(f"expires in {expires - time.time():.0f} s")
        else:
            conn.release(args.token)
    return 0


def _fmt_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _span(ports: list[int]) -> str:
    return str(ports[0]) if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"


def render_status(reply: p.StatusReply, now: float) -> str:
    s = reply.summary
    lines = []
    by_user: dict[str, list[p.LeaseInfo]] = {}
    for info in reply.leases:
        who = info.user or (f"uid {info.uid}" if info.uid is not None else "?")
        by_user.setdefault(who, []).append(info)
    for user in sorted(by_user):
        infos = by_user[user]
        held = sum(len(i.ports) for i in infos)
        lines.append(f"{user}: {len(infos)} leases, {held} ports")
        lines.append(f"  {'PORTS':<13} {'STATE':<9} {'PID':>7} {'AGE':>5} {'EXPIRES':>8}  NOTE / COMMAND")
        for i in infos:
            expires = "-" if i.expires is None else _fmt_age(i.expires - now)
            what = " | ".join(x for x in (i.note, i.cmdline) if x) or "-"
            lines.append(
                f"  {_span(i.ports):<13} {i.state:<9} {i.pid if i.pid else '-':>7} "
                f"{_fmt_age(now - i.granted):>5} {expires:>8}  {what[:100]}"
            )
    lines.append(
        f"{s.leases} leases, {s.ports_held} ports held, {s.ports_free} free of "
        f"{s.range[0]}-{s.range[1]}, largest free run {s.largest_free_run}, "
        f"{s.clients} clients, ttl {s.ttl:g}s"
    )
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    if args.watch is not None and not args.json:
        return _watch_status(args)
    with Connection(args.socket, reclaim=False, client="portlease-cli", autostart=False) as conn:
        if args.json:
            print(json.dumps(p.to_builtins(conn.status()), indent=2))
            return 0
        print(render_status(conn.status(), time.time()))
        return 0


def _watch_status(args: argparse.Namespace) -> int:
    """Redraw the status every ``args.watch`` seconds; wait out broker restarts."""
    conn: Connection | None = None
    try:
        while True:
            try:
                if conn is None:
                    conn = Connection(args.socket, reclaim=False, client="portlease-cli",
                                      autostart=False)
                text = render_status(conn.status(), time.time())
            except (BrokerUnavailable, ConnectionLost) as exc:
                # Watching is most useful exactly while the broker restarts.
                if conn is not None:
                    conn.close()
                    conn = None
                text = f"portlease: {exc}\n(retrying every {args.watch:g} s)"
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

"""``portlease lease``: run CMD with leased ports, or print a detached lease."""

from __future__ import annotations

import argparse
import math
import re
import shlex

from portlease.client import protocol as p
from portlease.client.protocol.errors import ConfigError
from portlease.client.session import default_note

from .dial import connect
from .handoff import check_host, check_offset, parse_hold, parse_listen

_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_count(count: int) -> None:
    if count < 1:
        raise ConfigError(f"-n {count}: COUNT is a number of consecutive ports, at least 1")
    if count > p.MAX_COUNT:
        # What the wire cannot carry; a broker's own limit is lower (`too-large`).
        raise ConfigError(f"-n {count}: too many ports; a broker grants at most its "
                          f"max_ports_per_request, {p.DEFAULT_PORTS_PER_REQUEST} unless configured")


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


def run(args: argparse.Namespace) -> int:
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
    from .wrapper import Plan, run_plan

    note = args.note or " ".join([default_note() or "", shlex.join(cmd)]).strip()
    return run_plan(Plan(cmd=cmd, port_count=args.count, socket=args.socket, note=note[:p.MAX_NOTE],
                    env_offsets=env_offsets, listen=listen, listen_host=args.listen_host,
                    hold=hold, hold_timeout=args.hold_timeout))


def _detached(args: argparse.Namespace, env_offsets: dict[str, int]) -> int:
    with connect(args, autostart=True) as conn:
        lease = conn.lease(args.count, ttl=args.ttl, note=args.note or default_note(),
                           detach=True)
    if args.json:
        import json  # --json only: `lease -- CMD`, run per CI step, never needs it

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

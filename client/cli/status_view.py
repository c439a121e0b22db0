"""How ``portlease status`` shows the broker's reply to a person.

Everything in a cell comes from other users (notes, command lines, user
names), so every cell is passed through :func:`escape` before it reaches the
terminal: a note must not be able to clear the operator's screen, move the
cursor or start a line that looks like another user's lease. ``--json`` prints
the reply unchanged; escaping is a property of the table only.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from portlease.client import protocol as p

# Programs people type by name; when /proc shows them as "INTERPRETER SCRIPT", the
# person typed only the script's name.
_ENTRY_POINTS = frozenset({"portlease", "pytest", "py.test"})
# ``python -m MODULE`` spellings of the same programs.
_MODULES = {"portlease": "portlease", "portlease.broker": "portlease", "pytest": "pytest"}
_INTERPRETER = re.compile(r"^(python|pypy)(\d+(\.\d+)*)?$")


def escape(text: str) -> str:
    """``text`` with everything that could steer a terminal made visible.

    C0 and C1 controls, DEL, Unicode format characters (bidi overrides among
    them) and line/paragraph separators become ``\\xNN``/``\\uNNNN``;
    a backslash is doubled so an escaped byte cannot be confused with a typed one.
    """
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or 0x7F <= code <= 0x9F:
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{code:02x}"))
        elif code > 0x9F and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Co", "Cs"):
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def typed_command(cmdline: str) -> str:
    """The command as a person typed it, from the space-joined ``/proc`` command line.

    ``/venv/bin/python3 /venv/bin/portlease lease -n 3 -- ./t.sh`` and
    ``python3 -m portlease lease -n 3 -- ./t.sh`` both read
    ``portlease lease -n 3 -- ./t.sh``. Anything else is shown as it is.
    """
    words = cmdline.split(" ")
    if len(words) >= 2 and _INTERPRETER.match(os.path.basename(words[0])):
        rest = words[1:]
        # Interpreter options before the script (-u, -X dev, -W error) are noise here.
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            takes_value = rest[0] in ("-X", "-W")
            rest = rest[2:] if takes_value else rest[1:]
        if len(rest) >= 2 and rest[0] == "-m" and rest[1] in _MODULES:
            return " ".join([_MODULES[rest[1]], *rest[2:]])
        if rest and os.path.basename(rest[0]) in _ENTRY_POINTS:
            return " ".join([os.path.basename(rest[0]), *rest[1:]])
        return cmdline
    if words and os.path.basename(words[0]) in _ENTRY_POINTS:
        return " ".join([os.path.basename(words[0]), *words[1:]])
    return cmdline


def plural(n: int, word: str) -> str:
    """``1 lease``, ``2 leases``, ``0 leases``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def fmt_age(seconds: float) -> str:
    """A short age or remaining time: ``42s``, ``17m``, ``5h``."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def span(ports: list[int]) -> str:
    """``20000`` or ``20000-20002``."""
    return str(ports[0]) if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"


def render_status(reply: p.StatusReply, now: float, *, self_clients: int = 0) -> str:
    """The table ``portlease status`` prints: leases grouped by user, then a summary line.

    ``self_clients`` is how many of the broker's clients are this ``status``
    call itself; they are left out of the count.
    """
    s = reply.summary
    lines = []
    by_user: dict[str, list[p.LeaseInfo]] = {}
    for info in reply.leases:
        who = info.user or (f"uid {info.uid}" if info.uid is not None else "?")
        by_user.setdefault(who, []).append(info)
    for user in sorted(by_user):
        infos = by_user[user]
        held = sum(len(i.ports) for i in infos)
        lines.append(f"{escape(user)}: {plural(len(infos), 'lease')}, {plural(held, 'port')}")
        lines.append(f"  {'PORTS':<13} {'STATE':<9} {'PID':>7} {'AGE':>5} {'EXPIRES':>8}  NOTE / COMMAND")
        for i in infos:
            expires = "-" if i.expires is None else fmt_age(i.expires - now)
            cmd = typed_command(i.cmdline) if i.cmdline else None
            what = " | ".join(escape(x) for x in (i.note, cmd) if x) or "-"
            lines.append(
                f"  {span(i.ports):<13} {escape(i.state):<9} {i.pid if i.pid else '-':>7} "
                f"{fmt_age(now - i.granted):>5} {expires:>8}  {what}"
            )
    if reply.more:
        lines.append("  … more leases than one reply carries; use --json for paging")
    clients = max(0, s.clients - self_clients)
    lines.append(
        f"{plural(s.leases, 'lease')}, {plural(s.ports_held, 'port')} held, {s.ports_free} free of "
        f"{s.range[0]}-{s.range[1]}, largest free run {s.largest_free_run}, "
        f"{plural(clients, 'client')}, ttl {s.ttl:g}s"
    )
    if s.notice:
        lines.append(f"note: {escape(s.notice)}")
    return "\n".join(lines)


def render_squatters(found: Iterable[tuple[str, int, str, int | None, int, str | None]]) -> str:
    """The ``status --squatters`` table from (proto, port, address, pid, uid, command) rows."""
    rows = list(found)
    if not rows:
        return "no squatters: every bound port in the range is leased"
    lines = [f"{'PORT':>5} {'PROTO':<5} {'ADDRESS':<26} {'UID':>6} {'PID':>7}  COMMAND"]
    for proto, port, address, pid, uid, command in rows:
        cmd = escape(typed_command(command)) if command else "-"
        lines.append(f"{port:>5} {proto:<5} {address:<26} {uid:>6} {pid if pid else '-':>7}  {cmd}")
    lines.append(f"{plural(len(rows), 'squatter')} (bound in the range, no lease)")
    return "\n".join(lines)


@dataclass
class ClaimRow:
    """A run of ports another broker on this host holds (its host-wide claims)."""

    ports: list[int]
    uid: int | None
    user: str | None
    pid: int | None
    """The claiming broker's pid, where /proc shows it."""
    command: str | None


def render_claims(rows: Iterable[ClaimRow]) -> str:
    """The table of ports in the range that other brokers on this host hold now."""
    rows = list(rows)
    held = sum(len(r.ports) for r in rows)
    lines = [f"{plural(held, 'port')} of the range held by other brokers on this host "
             "(never granted here while they hold them):",
             f"  {'PORTS':<13} {'UID':>6} {'USER':<16} {'PID':>7}  COMMAND"]
    for r in rows:
        uid = "?" if r.uid is None else str(r.uid)
        user = escape(r.user) if r.user else "-"
        cmd = escape(typed_command(r.command)) if r.command else "-"
        lines.append(f"  {span(r.ports):<13} {uid:>6} {user:<16} {r.pid if r.pid else '-':>7}  {cmd}")
    return "\n".join(lines)

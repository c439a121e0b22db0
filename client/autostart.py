"""Start a per-user broker on demand (placeholder until the clients issue lands)."""

from __future__ import annotations

import os


def enabled(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return os.environ.get("PORTLEASE_AUTOSTART", "1") not in ("0", "false", "no", "off")


def ensure_broker(path: str, *, timeout: float) -> None:
    raise OSError(f"autostart not implemented yet for {path}")

"""The ``portlease`` command: the one module that knows both the client and the broker.

Every subcommand but ``serve`` lives in :mod:`portlease.client.cli` and runs with
msgspec alone. ``serve`` is the broker, an optional extra (trio, sdnotify): it is
imported only when asked for, and its absence is reported as the missing extra.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from portlease.client.cli.main import main as client_main
from portlease.client.protocol.errors import AlreadyServing

__all__ = ["main"]

_BROKER_DEPENDENCIES = ("trio", "sdnotify")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``portlease`` with ``argv`` (default: the process's arguments); return the exit status."""
    return client_main(argv, serve=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        # Deferred: importing the broker is what needs the extra (not a cycle;
        # the broker imports nothing of this module).
        from portlease.broker.serve import serve
    except ModuleNotFoundError as exc:
        if exc.name not in _BROKER_DEPENDENCIES:
            raise
        print(f"portlease: `portlease serve` needs the broker's dependencies ({exc.name} "
              "is missing): pip install 'portlease[broker]'", file=sys.stderr)
        return 1
    try:
        return serve(args)
    except AlreadyServing as exc:
        print(f"portlease: {exc}", file=sys.stderr)
        return AlreadyServing.EXIT_STATUS

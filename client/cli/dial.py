"""The one way a CLI command connects to the broker."""

from __future__ import annotations

import argparse

from portlease.client.sync import Connection


def connect(args: argparse.Namespace, *, autostart: bool = False) -> Connection:
    # One request and gone: no reclaim thread. Only `lease` starts a broker when
    # none answers; a new broker has no lease to show, renew or release.
    return Connection(args.socket, reclaim=False, client="portlease-cli", autostart=autostart)

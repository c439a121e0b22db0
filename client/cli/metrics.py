"""``portlease metrics``: the broker's metrics in the OpenMetrics text format."""

from __future__ import annotations

import argparse
import sys

from .dial import connect


def run(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        text = conn.metrics()
    sys.stdout.write(text)  # a closed pipe is main()'s business
    sys.stdout.flush()
    return 0

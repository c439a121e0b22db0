"""Every bound of the wire protocol, as a named constant.

The broker enforces them, the clients and the CLI check them before sending,
and docs/protocol.md lists them: this file is the one place a number is written.
"""

from __future__ import annotations

from typing import Final

PROTOCOL_VERSION: Final = 1
"""The version a client names in ``hello``; the broker answers ``version`` to others."""

MAX_LINE: Final = 8192
"""Longest accepted request line in bytes, not counting the newline. The largest
valid request (a note of MAX_NOTE characters, every one escaped) fits well
within it; the bound is what a connection may make the broker buffer."""

MAX_REPLY_LINE: Final = 16 << 20
"""Longest reply line a client accepts (a ``status`` page is the largest reply)."""

TOKEN_BYTES: Final = 16
"""Random bytes in a lease token the broker makes (sent as 32 hex digits)."""
MAX_TOKEN: Final = 128
"""Longest token a request may carry."""

MAX_COUNT: Final = 65535
"""Most ports one ``lease`` request may name: what the wire accepts at all."""
DEFAULT_PORTS_PER_REQUEST: Final = 256
"""The broker's default ``max_ports_per_request``; above it the reply is ``too-large``."""

MIN_TTL: Final = 1.0
"""Shortest TTL a lease may ask for: below a second a detached lease would lapse
between two renewals of any real client."""
MAX_TTL: Final = 86400.0
"""Longest TTL: a day at most, so a detached lease cannot squat on ports for months."""
MAX_NOTE: Final = 1024
"""Longest note a client may attach to a lease."""
MAX_STATUS_LEASES: Final = 1000
"""Most leases one ``status`` reply carries; ask again with ``after`` for the rest."""
STATUS_TEXT_MAX: Final = 256
"""Characters of a command line or note that ``status`` shows; longer ones are cut,
ending in an ellipsis."""

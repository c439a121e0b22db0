"""Every error code a broker can answer with, in one enum (docs/protocol.md lists them)."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every error a broker can answer with. Stable: clients match on the value."""

    BAD_REQUEST = "bad-request"
    """The line is not JSON, not an object, or a field has the wrong type or value."""
    UNKNOWN_OP = "unknown-op"
    """The ``op`` field names no operation this broker knows."""
    VERSION = "version"
    """``hello`` named a protocol version this broker does not speak."""
    HELLO_REQUIRED = "hello-required"
    """An operation was sent before a successful ``hello``."""
    LINE_TOO_LONG = "line-too-long"
    """The line exceeded MAX_LINE bytes; the broker closes the connection after this."""
    TOO_LARGE = "too-large"
    """``count`` is above the per-request limit or larger than the whole port range."""
    EXHAUSTED = "exhausted"
    """No run of ``count`` free, bindable ports exists now; ``largest`` says what would fit."""
    QUOTA = "quota"
    """The caller's uid or connection already holds as much as the limits allow."""
    NOT_FOUND = "not-found"
    """No lease has this token (never granted, released, or expired)."""
    IN_USE = "in-use"
    """``reclaim`` of a lease that is still held by another live connection."""
    BUSY = "busy"
    """The broker is out of a resource (file descriptors) or stopping; try again."""
    INTERNAL = "internal"
    """A bug in the broker; the request was not carried out. Please report it."""

"""pytest plugin: the ``port_lease`` and ``free_port`` fixtures.

Registered through the ``pytest11`` entry point, so it is loaded by every
pytest run of everyone who installed portlease. It therefore imports nothing
at import time beyond pytest itself; the client is loaded the first time a
test asks for a port.

Fixtures:

``port_lease``
    A factory: ``ports = port_lease(3)`` leases 3 consecutive ports and
    returns a :class:`~portlease.client.Lease` (``ports[0]``, ``ports.port``,
    ``ports.ports``). Keyword arguments go to
    :meth:`~portlease.client.Connection.lease` (``note``, ``ttl``). Every
    lease it made is released when the test ends.
``free_port``
    One leased port, as an ``int``.
``leased_socket``
    A TCP socket already bound and listening on a leased port (dual-stack
    wildcard): hand it to the server under test, so that nothing else can
    take the port between the lease and the bind.
``portlease_connection``
    The session's :class:`~portlease.client.Connection` (one per xdist
    worker), for tests that want to call the broker themselves.

Options (command line, or the same name in the ini file):

``--portlease-socket PATH`` / ``portlease_socket``
    The broker's socket. Default: ``$PORTLEASE_SOCKET``, the system socket,
    else the per-user socket, where a broker is started on demand.
``--portlease-required=yes|no`` / ``portlease_required``
    What a test that needs ports does when no broker can be reached: fail
    (the default) or skip.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import socket

    from .grant import Lease
    from .sync import Connection

LeaseFactory = Callable[..., "Lease"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _yes_no(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("portlease", "portlease port leases")
    group.addoption(
        "--portlease-socket", dest="portlease_socket", metavar="PATH", default=None,
        help="socket of the portlease broker the port_lease/free_port fixtures use "
        "(default: $PORTLEASE_SOCKET, /run/portlease/portlease.sock, else a per-user broker "
        "started on demand)",
    )
    group.addoption(
        "--portlease-required", dest="portlease_required", metavar="yes|no", default=None,
        type=_yes_no,
        help="fail (yes, the default) or skip (no) tests that need ports when no portlease "
        "broker can be reached",
    )
    parser.addini("portlease_socket", "socket of the portlease broker (see --portlease-socket)")
    parser.addini(
        "portlease_required", "fail (true) or skip (false) tests needing ports with no broker",
        type="bool", default=True,
    )


def _socket_setting(config: pytest.Config) -> tuple[str | None, str | None]:
    """The configured socket and where it was configured (for error messages)."""
    option: str | None = config.getoption("portlease_socket")
    if option:
        return option, "--portlease-socket"
    ini: str = config.getini("portlease_socket") or ""
    if not ini:
        return None, None
    where = f"portlease_socket in {config.inipath}" if config.inipath else "portlease_socket"
    if os.path.isabs(ini) or config.inipath is None:
        return ini, where
    # Relative to the ini file, like pytest's own path settings.
    return os.path.normpath(config.inipath.parent / ini), where


def _required(config: pytest.Config) -> bool:
    option: bool | None = config.getoption("portlease_required")
    if option is not None:
        return option
    return bool(config.getini("portlease_required"))


def _note(nodeid: str) -> str:
    from .protocol import MAX_NOTE
    from .session import default_note

    ci = default_note()
    note = f"{nodeid} {ci}" if ci else nodeid
    return note[:MAX_NOTE]  # long parametrized ids get cut


@pytest.fixture(scope="session")
def portlease_connection(pytestconfig: pytest.Config) -> Iterator[Connection]:
    """One connection to the broker per test session (per xdist worker)."""
    from .protocol.errors import BrokerUnavailable
    from .sync import Connection

    path, where = _socket_setting(pytestconfig)
    try:
        conn = Connection(path, client="portlease-pytest")
    except BrokerUnavailable as exc:
        # The client's advice names $PORTLEASE_SOCKET only when the path came
        # from there; a path from our own option or ini key is named here.
        origin = f"\n(the socket {path} comes from {where}: fix it there)" if where else ""
        if _required(pytestconfig):
            pytest.fail(
                f"portlease: {exc}{origin}\n(set portlease_required = false in the ini file, or "
                "pass --portlease-required=no, to skip tests that need ports instead)",
                pytrace=False,
            )
        pytest.skip(f"portlease: {exc}{origin}")
    with conn:
        yield conn


@pytest.fixture
def port_lease(
    request: pytest.FixtureRequest, portlease_connection: Connection
) -> Iterator[LeaseFactory]:
    """Factory fixture: ``port_lease(n=1, **kw)`` leases ``n`` consecutive ports.

    Every lease made is released when the test ends. The lease's note (shown
    by ``portlease status``) defaults to the test's node id.
    """
    from .protocol.errors import PortleaseError

    conn = portlease_connection
    made: list[Lease] = []
    note = _note(request.node.nodeid)

    def make(n: int = 1, **kw: Any) -> Lease:
        kw.setdefault("note", note)
        held = conn.lease(n, **kw)
        made.append(held)
        return held

    yield make
    lost = [held.lost for held in made if held.lost is not None]
    for held in reversed(made):
        if held.released:
            continue
        # If this fails, the lease dies with the session's connection.
        with contextlib.suppress(PortleaseError):
            conn.release(held)
    if lost:
        pytest.fail(
            "portlease: "
            + "; ".join(str(exc) for exc in lost)
            + "\nthe test ran while its ports may have been granted to someone else",
            pytrace=False,
        )


@pytest.fixture
def free_port(port_lease: LeaseFactory) -> int:
    """One leased port, released when the test ends."""
    return port_lease(1).port


@pytest.fixture
def leased_socket(port_lease: LeaseFactory) -> socket.socket:
    """A TCP socket listening on a leased port; closed and released when the test ends.

    ``leased_socket.getsockname()[1]`` is the port. The socket belongs to the
    lease: pass it (or its ``fileno()``) to the server, don't close it yourself.
    """
    return port_lease(1).socket()

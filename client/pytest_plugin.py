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
``--portlease-no-fixtures`` / ``portlease_fixtures = auto|true|false``
    Whether the port fixtures of other plugins are served by leases (below).

The ecosystem's port fixtures, leased. The fixtures existing suites already use
return leased ports instead of "bind port 0, close and hope", with the same
names, types and scopes: pytest-asyncio's ``unused_tcp_port``,
``unused_udp_port`` (function scope, an ``int``) and
``unused_tcp_port_factory``, ``unused_udp_port_factory`` (session scope, a new
lease per call, all released at the session's end); anyio's ``free_tcp_port``,
``free_udp_port`` and ``free_tcp_port_factory``, ``free_udp_port_factory``
(``factory(family=None) -> int``); aiohttp's ``aiohttp_unused_port`` (function
scope, a callable). A leased port is free for TCP and UDP alike. They are
registered as a plugin of their own at the session's start, after every
installed plugin, so pytest resolves the names to them whatever order it
loaded the plugins in; a fixture of the same name in a ``conftest.py`` still
wins, as it would over any plugin. ``auto`` (the default) turns them on where
a broker is configured (``--portlease-socket``, ``portlease_socket``,
``$PORTLEASE_SOCKET``) or the host has a system deployment; ``true`` turns
them on everywhere (a per-user broker is started on demand), ``false`` or
``--portlease-no-fixtures`` off.
"""

from __future__ import annotations

import contextlib
import os
import socket as _socket
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
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
    group.addoption(
        "--portlease-no-fixtures", dest="portlease_no_fixtures", action="store_true", default=False,
        help="leave other plugins' port fixtures (unused_tcp_port, free_tcp_port, "
        "aiohttp_unused_port, ...) alone instead of serving them from leases",
    )
    parser.addini("portlease_socket", "socket of the portlease broker (see --portlease-socket)")
    parser.addini(
        "portlease_fixtures",
        "serve pytest-asyncio's, anyio's and aiohttp's port fixtures from leases: auto (where a "
        "broker is configured or a system deployment exists), true or false",
        default="auto",
    )
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


_RUN: str | None = None
"""On an xdist worker, the run it belongs to: the controller's pid and command line
(a worker's own is execnet's ``python -c ...``, which tells no run from another)."""


def _note(nodeid: str) -> str:
    from .protocol import MAX_NOTE
    from .session import default_note

    parts = [nodeid, _RUN, default_note()]
    note = " ".join(part for part in parts if part)
    return note[:MAX_NOTE]  # long parametrized ids get cut


def _run_of_worker(config: pytest.Config) -> str | None:
    """``[run PID: pytest ARGS]`` on an xdist worker, from the controller's argv xdist passes."""
    workerinput = getattr(config, "workerinput", None)
    if not isinstance(workerinput, dict):
        return None
    argv = workerinput.get("mainargv")
    if not isinstance(argv, list) or not argv:
        return None
    # `python -m pytest` leaves pytest/__main__.py in argv[0]; either way the run is "pytest".
    words = ["pytest", *(str(arg) for arg in argv[1:])]
    # The workers are the controller's children (execnet's popen gateway).
    return f"[run {os.getppid()}: {' '.join(words)}]"


def pytest_configure(config: pytest.Config) -> None:
    global _RUN
    _RUN = _run_of_worker(config)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    if _fixtures_on(config) and not config.pluginmanager.has_plugin(_OVERRIDES):
        # Registered now, after every plugin pytest loaded (entry points, -p, the
        # conftests' pytest_plugins): for one name at the same level, pytest
        # takes the definition registered last.
        config.pluginmanager.register(ecosystem_fixtures(), _OVERRIDES)


def _fixtures_on(config: pytest.Config) -> bool:
    if config.getoption("portlease_no_fixtures", False):
        return False
    setting = str(config.getini("portlease_fixtures") or "auto").strip().lower()
    if setting == "auto":
        from .host.locations import explicit_socket, system_deployment

        configured, _ = _socket_setting(config)
        return bool(configured or explicit_socket() or system_deployment())
    try:
        return _yes_no(setting)
    except ValueError:
        raise pytest.UsageError(
            f"portlease_fixtures = {setting!r}: expected auto, true or false"
        ) from None


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
def leased_socket(port_lease: LeaseFactory) -> _socket.socket:
    """A TCP socket listening on a leased port; closed and released when the test ends.

    ``leased_socket.getsockname()[1]`` is the port. The socket belongs to the
    lease: pass it (or its ``fileno()``) to the server, don't close it yourself.
    """
    return port_lease(1).socket()


# ---------------------------------------------------------------- other plugins' fixtures, leased

_OVERRIDES = "portlease-ecosystem-fixtures"


class LeasedPortFactory:
    """A callable giving a new leased port per call, held until the session ends.

    Stands in for pytest-asyncio's ``unused_*_port_factory`` (called with no
    argument) and anyio's ``FreePortFactory`` (``factory(family=None)``, with
    its ``kind``). A lease is free for TCP and UDP on IPv4 and IPv6, so
    ``family`` changes nothing.
    """

    def __init__(self, lease: Callable[[], int], kind: _socket.SocketKind) -> None:
        self._lease = lease
        self._kind = kind

    @property
    def kind(self) -> _socket.SocketKind:
        """The socket type the port is for (anyio's factories have it)."""
        return self._kind

    def __call__(self, family: _socket.AddressFamily | None = None) -> int:
        return self._lease()


def _current_test() -> str:
    return _CURRENT or "session"


_CURRENT: str | None = None
"""The node id of the running test: the note of a session factory's lease."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    global _CURRENT
    _CURRENT = item.nodeid
    try:
        return (yield)
    finally:
        _CURRENT = None


def _session_factory(conn: Connection, kind: _socket.SocketKind) -> Iterator[LeasedPortFactory]:
    from .protocol.errors import PortleaseError

    made: list[Lease] = []

    def lease() -> int:
        held = conn.lease(1, note=_note(_current_test()))
        made.append(held)
        return held.port

    yield LeasedPortFactory(lease, kind)
    for held in reversed(made):
        if not held.released:
            with contextlib.suppress(PortleaseError):
                conn.release(held)


def _leased_port(port_lease: LeaseFactory) -> int:
    return port_lease(1).port


def _unused_tcp_port(port_lease: LeaseFactory) -> int:
    """A leased port (portlease, in place of pytest-asyncio's), released after the test."""
    return _leased_port(port_lease)


def _unused_udp_port(port_lease: LeaseFactory) -> int:
    """A leased port for UDP (portlease, in place of pytest-asyncio's), released after the test."""
    return _leased_port(port_lease)


def _unused_tcp_port_factory(portlease_connection: Connection) -> Iterator[LeasedPortFactory]:
    """``factory()``: a new leased port per call (portlease, in place of pytest-asyncio's);
    all released when the session ends."""
    yield from _session_factory(portlease_connection, _socket.SOCK_STREAM)


def _unused_udp_port_factory(portlease_connection: Connection) -> Iterator[LeasedPortFactory]:
    """``factory()``: a new leased UDP port per call (portlease, in place of pytest-asyncio's);
    all released when the session ends."""
    yield from _session_factory(portlease_connection, _socket.SOCK_DGRAM)


def _free_tcp_port(port_lease: LeaseFactory) -> int:
    """A leased port (portlease, in place of anyio's), released after the test."""
    return _leased_port(port_lease)


def _free_udp_port(port_lease: LeaseFactory) -> int:
    """A leased port for UDP (portlease, in place of anyio's), released after the test."""
    return _leased_port(port_lease)


def _free_tcp_port_factory(portlease_connection: Connection) -> Iterator[LeasedPortFactory]:
    """``factory(family=None)``: a new leased port per call (portlease, in place of anyio's);
    all released when the session ends."""
    yield from _session_factory(portlease_connection, _socket.SOCK_STREAM)


def _free_udp_port_factory(portlease_connection: Connection) -> Iterator[LeasedPortFactory]:
    """``factory(family=None)``: a new leased UDP port per call (portlease, in place of
    anyio's); all released when the session ends."""
    yield from _session_factory(portlease_connection, _socket.SOCK_DGRAM)


def _aiohttp_unused_port(port_lease: LeaseFactory) -> Callable[[], int]:
    """``aiohttp_unused_port()``: a new leased port per call (portlease, in place of
    aiohttp's); all released after the test."""

    def unused_port() -> int:
        return _leased_port(port_lease)

    return unused_port


_FUNCTION_SCOPED = (_unused_tcp_port, _unused_udp_port, _free_tcp_port, _free_udp_port,
                    _aiohttp_unused_port)
_SESSION_SCOPED = (_unused_tcp_port_factory, _unused_udp_port_factory, _free_tcp_port_factory,
                   _free_udp_port_factory)
FIXTURE_NAMES = tuple(f.__name__[1:] for f in (*_FUNCTION_SCOPED, *_SESSION_SCOPED))
"""The other plugins' fixture names served here."""


def ecosystem_fixtures() -> types.ModuleType:
    """The plugin object holding the leased fixtures, under the other plugins' names.

    Made only when registered (:func:`pytest_sessionstart`): defined at module
    level, they would belong to this plugin, registered before the plugins
    they replace.
    """
    fixtures: dict[str, Any] = {}
    for func in _FUNCTION_SCOPED:
        fixtures[func.__name__] = pytest.fixture(func, name=func.__name__[1:])
    for factory in _SESSION_SCOPED:
        fixtures[factory.__name__] = pytest.fixture(factory, name=factory.__name__[1:], scope="session")
    # A module object: pytest reads a plugin's fixtures off a module (or a class),
    # not off the instance of a plain object.
    holder = types.ModuleType(f"{__name__}.ecosystem", "pytest-asyncio's, anyio's and aiohttp's "
                              "port fixtures, served by portlease leases")
    holder.__dict__.update(fixtures)
    return holder

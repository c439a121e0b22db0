"""The blocking and the async client offer the same methods with the same signatures.

They may differ only in being coroutines: every public method of
:class:`Connection` is a coroutine function on :class:`AsyncConnection` with
the same parameters and defaults (``close`` stays synchronous on both, so that
it runs in a cancelled task's ``finally``), every property is a property on
both, and the blocking ``with Connection(...)`` is ``async with connect(...)``,
which takes ``__init__``'s parameters.
"""

from __future__ import annotations

import inspect
from typing import Any

from portlease.client.aio import AsyncConnection, connect
from portlease.client.sync import Connection

SYNC_ON_BOTH = {"close", "fileno"}
"""Methods that do no I/O wait, and so are plain functions on both."""


def public(cls: type) -> dict[str, Any]:
    return {name: value for name, value in vars(cls).items() if not name.startswith("_")}


def params(func: Any) -> list[tuple[str, Any, Any]]:
    sig = inspect.signature(func)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_the_same_public_names() -> None:
    assert sorted(public(Connection)) == sorted(public(AsyncConnection))


def test_each_method_has_the_same_parameters_and_defaults_and_differs_only_in_being_a_coroutine() -> None:
    for name, sync_member in public(Connection).items():
        async_member = vars(AsyncConnection)[name]
        if isinstance(sync_member, property):
            assert isinstance(async_member, property), name
            continue
        assert callable(sync_member) and callable(async_member), name
        assert params(sync_member) == params(async_member), name
        assert not inspect.iscoroutinefunction(sync_member), name
        assert inspect.iscoroutinefunction(async_member) is (name not in SYNC_ON_BOTH), name


def test_the_constructors_and_the_context_managers_agree() -> None:
    assert params(Connection.__init__) == params(AsyncConnection.__init__)
    # with Connection(...) as conn  <->  async with connect(...) as conn
    assert [p for p in params(connect)] == params(Connection.__init__)[1:]
    assert hasattr(Connection, "__enter__") and hasattr(Connection, "__exit__")
    assert inspect.isasyncgenfunction(inspect.unwrap(connect))

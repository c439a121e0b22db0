"""The tree tells the truth: imports run one way, and nothing dodges a cycle.

These read the source (every import, at module level or inside a function) and
check the arrows CONTRIBUTING.md draws. A new import that runs the wrong way, or
a function-level import that closes a cycle, fails here with its file and line.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    # client/_pkg/x is portlease.x; client/x is portlease.client.x; broker/x, portlease.broker.x.
    parts = ["portlease", *parts[2:]] if parts[:2] == ["client", "_pkg"] else ["portlease", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> Iterator[tuple[str, Path]]:
    for path in sorted([*ROOT.glob("client/**/*.py"), *ROOT.glob("broker/**/*.py")]):
        if "rust" not in path.relative_to(ROOT).parts:
            yield _module_name(path), path


MODULES = dict(_sources())


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every portlease module ``module`` imports, wherever the import statement stands."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            # `from . import x` names a module x when there is one.
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target
                       for a in node.names]
        for target in targets:
            if target == "portlease" or target.startswith("portlease."):
                yield target, node.lineno


def _edges() -> list[tuple[str, str, str]]:
    out = []
    for module, path in MODULES.items():
        for target, line in _imports(module, path):
            # An import of a package runs its __init__; of a name, its module.
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != module:
                out.append((module, target, f"{path.relative_to(ROOT)}:{line}"))
    return out


EDGES = _edges()


def _within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


# (room, what it may import of portlease besides itself)
RULES = [
    ("portlease.client.protocol", ()),
    ("portlease.client.host", ()),
    ("portlease.broker", ("portlease.client.protocol", "portlease.client.host", "portlease")),
    ("portlease.client.cli", ("portlease.client", "portlease")),
]


@pytest.mark.parametrize(("room", "allowed"), RULES, ids=[r for r, _ in RULES])
def test_each_room_imports_only_the_rooms_below_it(room: str, allowed: tuple[str, ...]) -> None:
    wrong = []
    for source, target, where in EDGES:
        if not _within(source, room) or _within(target, room):
            continue
        ok = any(target == a if a == "portlease" else _within(target, a) for a in allowed)
        # The client library may not reach into its own commands.
        if room == "portlease.client.cli" and _within(target, "portlease.broker", "portlease.cli"):
            ok = False
        if not ok:
            wrong.append(f"{where}: {source} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_client_library_imports_neither_the_broker_nor_the_commands() -> None:
    library = [m for m in MODULES if _within(m, "portlease.client")
               and not _within(m, "portlease.client.cli")]
    wrong = [f"{where}: {s} imports {t}" for s, t, where in EDGES
             if s in library and _within(t, "portlease.broker", "portlease.client.cli", "portlease.cli")]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_even_through_function_level_imports() -> None:
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for source, target, at in EDGES:
        # A package's __init__ re-exporting its own modules is not a cycle of rooms.
        if target.startswith(source + "."):
            continue
        graph.setdefault(source, set()).add(target)
        where[(source, target)] = at
    cycles: list[str] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                loop = [*stack[stack.index(nxt):], nxt]
                cycles.append(" -> ".join(f"{a} ({where[(a, b)]})" for a, b in itertools.pairwise(loop)))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_the_tree() -> None:
    # Guards the guard: an empty module list or edge list would pass everything.
    assert "portlease.client.protocol.messages" in MODULES
    assert "portlease.broker.server" in MODULES
    assert ("portlease.broker.core", "portlease.client.protocol") in {(s, t) for s, t, _ in EDGES} or any(
        s == "portlease.broker.core" and t.startswith("portlease.client.protocol") for s, t, _ in EDGES)

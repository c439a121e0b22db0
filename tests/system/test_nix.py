"""The Nix checks (nix/tests/check.sh) as part of the test suite.

check.sh parses every .nix file, evaluates nix/module.nix and
nix/github-runner.nix against the stand-in in nix/tests/stub-lib.nix, and
checks the result with nix/tests/check_eval.py: unit settings, runners, the
rendered config read back by ``portlease.broker.config.load_file``, and
agreement with systemd/portlease.{socket,service}; it replays how nixpkgs'
pytestCheckHook turns package.nix's attributes into pytest's argv and lets
pytest collect with it (nix/tests/check_pytest_hook.py); then it type-checks
the VM test's script (nix/tests/check_vm_script.py). The tests on a copy of the tree
put back each defect those checks exist for and prove the checks catch it.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = Path("nix") / "tests" / "check.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("nix-instantiate") is None, reason="nix-instantiate not installed (nix-bin)"
)


def run_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(root / CHECK)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )


def copy_tree(tmp_path: Path) -> Path:
    """The parts of the repository the checks read, outside git."""
    root = tmp_path / "repo"
    for name in ("nix", "systemd", "client", "broker", "tests", "bench", "docs"):
        shutil.copytree(ROOT / name, root / name,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("flake.nix", "pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, root / name)
    return root


def nix_eval(attr: str) -> Any:
    """One attribute of nix/tests/eval.nix, evaluated as check.sh does (no store, no daemon)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NIX_STATE_DIR": f"{tmp}/state", "NIX_LOG_DIR": f"{tmp}/log",
               "NIX_CONF_DIR": f"{tmp}/conf", "XDG_CACHE_HOME": f"{tmp}/cache",
               "HOME": f"{tmp}/home", "NIX_PATH": ""}
        os.makedirs(f"{tmp}/conf")
        os.makedirs(f"{tmp}/home")
        result = subprocess.run(
            ["nix-instantiate", "--store", "dummy://", "--eval", "--strict", "--json",
             str(ROOT / "nix" / "tests" / "eval.nix"), "-A", attr],
            capture_output=True, text=True, timeout=120, env=env,
        )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def top_level_names_in(path: Path, entries: set[str]) -> set[str]:
    """Top-level repository entries a test file names in a string ("bench", "systemd/x")."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings and not any(c.isspace() for c in node.value)):
            first = node.value.split("/")[0]
            if first in entries:
                found.add(first)
    return found


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_nix_checks_pass() -> None:
    result = run_check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nix evaluation checks passed" in result.stdout


def test_hardening_drift_in_the_module_fails(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    edit(root / "nix" / "module.nix", "MemoryDenyWriteExecute = true;",
         "MemoryDenyWriteExecute = false;")
    result = run_check(root)
    assert result.returncode != 0
    assert "MemoryDenyWriteExecute= differs" in result.stderr


def test_hardening_added_to_the_unit_file_only_fails(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    edit(root / "systemd" / "portlease.service", "LockPersonality=yes\n",
         "LockPersonality=yes\nProtectProc=invisible\n")
    result = run_check(root)
    assert result.returncode != 0
    assert "ProtectProc= is in the unit file but not in module.nix" in result.stderr


def test_a_setting_the_broker_does_not_know_fails(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    edit(root / "nix" / "github-runner.nix", "ttl = 300;", "ttl = 300;\n      tll = 5;")
    result = run_check(root)
    assert result.returncode != 0
    assert "tll" in result.stderr


def test_a_parse_error_fails(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    edit(root / "nix" / "package.nix", "pname = ", "pname = undefinedName + ")
    result = run_check(root)
    assert result.returncode != 0
    assert "package.nix does not parse" in result.stderr


def test_the_fileset_holds_what_the_build_and_the_check_phase_read() -> None:
    package = nix_eval("package")
    fileset = {Path(src).relative_to(ROOT).parts[0] for src in package["srcFiles"]}
    disabled = [ROOT / path for path in package["disabledTestPaths"]]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    entries = {name.split("/")[0] for name in tracked} | {p.name for p in ROOT.iterdir()
                                                          if not p.name.startswith(".")}
    named: dict[str, set[str]] = {}
    for test_file in sorted((ROOT / "tests").rglob("*.py")):
        if any(test_file.is_relative_to(d) for d in disabled):
            continue
        for name in top_level_names_in(test_file, entries):
            named.setdefault(name, set()).add(str(test_file.relative_to(ROOT)))
    # The scan is not vacuous: tests/process/test_chaos_short.py runs bench/*.py.
    assert "bench" in named, named
    missing = {name: files for name, files in named.items() if name not in fileset}
    assert not missing, f"the check phase's tests read what package.nix leaves out: {missing}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    build_reads = {project["readme"], *project.get("license-files", [])}
    assert build_reads <= fileset, f"the build reads {build_reads - fileset}, not in the fileset"


def test_the_check_phase_skips_tests_needing_root_systemd_or_nix() -> None:
    package = nix_eval("package")
    assert "tests/system" in package["disabledTestPaths"]
    # Everything there needs one of them; nothing that does lives elsewhere.
    for test_file in (ROOT / "tests" / "system").glob("test_*.py"):
        text = test_file.read_text()
        assert any(word in text for word in ("nix-instantiate", "systemd", "geteuid", "nspawn")), test_file
    for test_file in (ROOT / "tests").rglob("test_*.py"):
        if test_file.is_relative_to(ROOT / "tests" / "system"):
            continue
        text = test_file.read_text()
        assert "nix-instantiate" not in text and "systemd-nspawn" not in text, test_file


needs_mypy = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import mypy"], capture_output=True).returncode != 0,
    reason="mypy not installed (the dev extra): the VM test script cannot be type-checked",
)


@needs_mypy
def test_the_vm_script_type_checks() -> None:
    result = run_check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "VM test script type-checks (mypy --strict)" in result.stdout


@needs_mypy
def test_the_vm_script_with_an_optional_match_fails(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    vm = root / "nix" / "tests" / "vm.nix"
    edit(vm, "assert float(found.group(1)) <=", "assert float(re.search('x', out).group(1)) <=")
    result = run_check(root)
    assert result.returncode != 0
    assert 'Item "None" of "Match[str] | None" has no attribute "group"' in result.stderr


@needs_mypy
def test_a_driver_method_that_does_not_exist_fails(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    edit(root / "nix" / "tests" / "vm.nix", 'machine.wait_for_unit("sockets.target")',
         'machine.wait_for_units("sockets.target")')
    result = run_check(root)
    assert result.returncode != 0
    assert '"Machine" has no attribute "wait_for_units"' in result.stderr


# Each defect the module once had, or could regress to, put back into a copy of the
# tree: (file, text now, text of the defect, what the check must then say).
DEFECTS = {
    "a plain runner UMask conflicts with the operator's": (
        "module.nix", 'UMask = lib.mkOverride 900 "0007";', 'UMask = "0007";',
        "serviceConfig.UMask has conflicting definitions"),
    "the store path on a runner's PATH": (
        "module.nix", "path = lib.mkAfter [ systemProfile ];", "path = [ cfg.package ];",
        "the unit names the portlease store path"),
    "a broker that stops its socket on change": (
        "module.nix", "stopIfChanged = false;", "", "stopIfChanged is not false"),
    # The units came from the option's list: a name that is no runner got a unit without ExecStart.
    "units defined for names that are not runners": (
        "module.nix",
        "joined = lib.filterAttrs (name: _: joinAll || lib.elem name namedRunners) enabledRunners;",
        "joined = lib.genAttrs namedRunners (_: { });",
        "units defined for names that are not runners: ['github-runner-a'"),
    "a warning that does not list the runners there are": (
        "module.nix", "The enabled runners are ${showNames (lib.attrNames enabledRunners)}:",
        "Enable them:", "the warning for names that are not runners does not list the runners"),
    'githubRunners = "all" joining nothing': (
        "module.nix", "(name: _: joinAll || lib.elem name namedRunners)",
        "(name: _: lib.elem name namedRunners)", 'githubRunners = "all" joined []'),
    # systemd keeps the operator's later Environment= line.
    "an old serviceOverrides.Environment silently winning": (
        "module.nix", "++ lib.optional (overridden ? ${var}) {", "++ lib.optional false {",
        "an operator's serviceOverrides.Environment FM_PORTALLOC_DATA_DIR is not refused"),
    # NixOS's own "conflicting definition values", naming neither option to change.
    "an extraEnvironment clash left to NixOS's error": (
        "module.nix", "lib.optional (extra ? ${var} && toString extra.${var} != ours) {",
        "lib.optional false {", "an extraEnvironment FM_PORTALLOC_DATA_DIR clash is not explained"),
    "a portalloc_dir under /home the broker cannot see": (
        "module.nix", "assertion = portallocHidden == [ ];", "assertion = true;",
        "a portalloc_dir under /home is not refused"),
    "a portserver socket passed to no service": (
        "module.nix", 'Service = "portlease.service";', "", "full: portserver Service None"),
    "runners without PORTSERVER_ADDRESS": (
        "module.nix", "// lib.optionalAttrs portserver {", "// lib.optionalAttrs false {",
        "the runner's process gets PORTSERVER_ADDRESS=None"),
    "a runner ReadWritePaths without the dash": (
        "module.nix", 'ReadWritePaths = [ "-${portallocDir}" ];', "ReadWritePaths = [ portallocDir ];",
        "want -/var/lib/fm-portalloc"),
    "the broker named after its group": (
        "module.nix", 'User = "portlease-broker";', "", "User None"),
    "a metrics file the broker cannot write": (
        "module.nix", 'lib.optional (textfile != null) "-${dirOf textfile}"',
        'lib.optional false "-${dirOf textfile}"', "cannot write the metrics file's directory"),
    # The hook expands pytestFlagsArray with `eval`: "not slow" becomes two words.
    "a marker expression in pytestFlagsArray": (
        "package.nix", '  pytestImportMode = "prepend";\n',
        '  pytestImportMode = "prepend";\n'
        '  pytestFlagsArray = [ "-m" "not slow" "-p" "no:cacheprovider" ];\n',
        "ERROR: file or directory not found: slow"),
    # The hook's default import mode leaves tests/ off sys.path.
    "the hook's importlib import mode": (
        "package.nix", '  pytestImportMode = "prepend";\n', "", "No module named 'brokerproc'"),
    "an import check of a module that does not exist": (
        "package.nix", '"portlease.client.aio"', '"portlease.client.aoi"',
        "pythonImportsCheck portlease.client.aoi"),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_known_defect_put_back_fails_the_check(tmp_path: Path, defect: str) -> None:
    name, now, bad, message = DEFECTS[defect]
    root = copy_tree(tmp_path)
    edit(root / "nix" / name, now, bad)
    result = run_check(root)
    assert result.returncode != 0
    assert message in result.stderr

"""The Nix checks (nix/tests/check.sh) as part of the test suite.

check.sh parses every .nix file, evaluates nix/module.nix and
nix/github-runner.nix against the stand-in in nix/tests/stub-lib.nix, and
checks the result with nix/tests/check_eval.py: unit settings, runners, the
rendered config read back by ``portlease.broker.config.load_file``, and
agreement with systemd/portlease.{socket,service}. The tests on a copy of the
tree prove those checks fail when the module and the unit file drift apart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    for name in ("nix", "systemd", "client", "broker", "tests"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("flake.nix", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, root / name)
    return root


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

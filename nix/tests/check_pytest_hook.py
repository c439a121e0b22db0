"""Replay the package's check phase command line and let pytest collect with it.

Usage: python3 check_pytest_hook.py EVAL.json   (check.sh runs it)

eval.nix hands over package.nix's pytestCheckHook attributes. They go into the
environment as a derivation without __structuredAttrs passes them (a list is
its elements joined by spaces), and pytest-hook.sh builds pytest's argv from
them the way nixpkgs' hook does, then runs ``pytest --collect-only -q`` from
the repository root. The check fails when pytest cannot collect (a flag the
hook mangles, a disabled path that matches nothing, an import the hook's
import mode breaks) or when it collects tests the check phase must not run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# The attributes the hook reads.
HOOK_ATTRIBUTES = (
    "enabledTestPaths", "disabledTestPaths", "enabledTests", "disabledTests",
    "enabledTestMarks", "disabledTestMarks", "pytestFlagsArray", "pytestFlags",
    "pytestImportMode", "dontAddPytestImportMode",
)


def as_environment(value: Any) -> str:
    """A derivation attribute as Nix puts it into the builder's environment."""
    if value is None or value is False:
        return ""
    if value is True:
        return "1"
    if isinstance(value, list):
        return " ".join(as_environment(item) for item in value)
    return str(value)


def main() -> int:
    package = json.loads(Path(sys.argv[1]).read_text())["package"]
    env = {key: value for key, value in os.environ.items() if key not in HOOK_ATTRIBUTES}
    env["PYTHON"] = os.environ.get("PYTHON", sys.executable)
    for name in HOOK_ATTRIBUTES:
        if package.get(name) is not None:
            env[name] = as_environment(package[name])
    result = subprocess.run(
        ["bash", str(HERE / "pytest-hook.sh")], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )
    out = result.stdout + result.stderr
    tail = "\n".join(out.strip().splitlines()[-15:])
    failures = []
    if result.returncode != 0:
        failures.append(f"the check phase's pytest (nixpkgs' pytestCheckHook, replayed by "
                        f"nix/tests/pytest-hook.sh) exits {result.returncode}:\n{tail}")
    else:
        collected = re.search(r"^(\d+)(?:/\d+)? tests? collected", result.stdout, re.MULTILINE)
        if collected is None or int(collected.group(1)) == 0:
            failures.append(f"the check phase's pytest collects nothing:\n{tail}")
        ids = [line for line in result.stdout.splitlines() if "::" in line]
        system = [line for line in ids if line.startswith("tests/system/")]
        if system:
            failures.append(f"the check phase would run tests/system: {system[:3]}")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if failures:
        return 1
    print(f"the check phase's pytest collects {collected.group(1) if collected else '?'} tests "
          f"(pytestCheckHook replayed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

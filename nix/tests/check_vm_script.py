"""Type-check the VM test's script as nixpkgs' test driver does, but with mypy --strict.

Usage: python3 check_vm_script.py EVAL.json   (check.sh runs it)

nixpkgs runs mypy on ``testScript`` before it boots anything, with a header
that declares the driver's globals (``start_all``, ``subtest``, one
``Machine`` per node); a type error fails the build. eval.nix hands over the
script as Nix interpolates it; this prepends the same kind of header, typed
against nix/tests/driver_stub (the driver's Machine API), and runs mypy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The globals nixos/lib/testing's driver declares for the script (one Machine
# per node: this test has one, `machine`).
HEADER = """\
from typing import Callable, ContextManager
from test_driver.machine import Machine

start_all: Callable[[], None]
subtest: Callable[[str], ContextManager[None]]
join_all: Callable[[], None]
machines: list[Machine]
machine: Machine
"""


def main() -> int:
    script = json.loads(Path(sys.argv[1]).read_text())["vm"]["testScript"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vm_test_script.py"
        path.write_text(HEADER + "\n" + script)
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
             "--cache-dir", os.path.join(tmp, "cache"), "--no-error-summary",
             "--hide-error-context", str(path)],
            env={**os.environ, "MYPYPATH": str(HERE / "driver_stub")},
            capture_output=True, text=True,
        )
    if result.returncode != 0:
        header_lines = HEADER.count("\n") + 1
        print(f"FAIL: nix/tests/vm.nix testScript does not type-check (script line = "
              f"reported line - {header_lines}):", file=sys.stderr)
        print(result.stdout + result.stderr, file=sys.stderr, end="")
        return 1
    print("VM test script type-checks (mypy --strict)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

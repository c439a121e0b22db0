#!/bin/sh
# Checks the Nix files where nixpkgs cannot be had (needs only Debian's nix-bin):
#   1. every .nix file parses (nix-instantiate --parse; also catches undefined
#      names outside `with` scopes, hence no `with lib;` anywhere);
#   2. nix/module.nix and nix/github-runner.nix evaluate against the stand-in
#      nix/tests/stub-lib.nix (eval.nix);
#   3. check_eval.py checks the result: unit settings, runners, the rendered
#      config read by portlease's own reader, agreement with systemd/*;
#   4. check_pytest_hook.py replays how nixpkgs' pytestCheckHook turns
#      package.nix's attributes into pytest's argv (pytest-hook.sh) and lets
#      pytest collect with it;
#   5. check_vm_script.py type-checks the VM test's script (mypy --strict).
# The VM test (nix/tests/vm.nix) covers what evaluation cannot; see docs/nixos.md.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-python3}

if ! command -v nix-instantiate >/dev/null 2>&1; then
    echo "check.sh: nix-instantiate not found (apt-get install nix-bin)" >&2
    exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

# No daemon and no writes under /nix: nothing here builds or copies into the
# store, so a dummy store and throwaway state/cache directories suffice, as
# any user and without nix.conf.
export NIX_STATE_DIR="$tmp/state" NIX_LOG_DIR="$tmp/log" NIX_CONF_DIR="$tmp/conf"
export XDG_CACHE_HOME="$tmp/cache" HOME="$tmp/home"
export NIX_PATH=""
mkdir -p "$NIX_CONF_DIR" "$HOME"
nix() { nix-instantiate --store dummy:// "$@"; }

count=0
for file in $(cd "$root" && git ls-files -co --exclude-standard -- '*.nix' 2>/dev/null || find . -name '*.nix' -not -path './.git/*'); do
    if ! nix --parse "$root/$file" >/dev/null; then
        echo "check.sh: $file does not parse" >&2
        exit 1
    fi
    if grep -n 'with lib;' "$root/$file" >/dev/null; then
        echo "check.sh: $file uses 'with lib;' (hides undefined names from --parse)" >&2
        exit 1
    fi
    count=$((count + 1))
done
if [ "$count" -lt 7 ]; then
    echo "check.sh: found only $count .nix files" >&2
    exit 1
fi
echo "parsed $count .nix files"

nix --eval --strict --json "$here/eval.nix" >"$tmp/eval.json"
"$python" "$here/check_eval.py" "$tmp/eval.json"
"$python" "$here/check_pytest_hook.py" "$tmp/eval.json"
# nixpkgs' driver type-checks the VM test's script; so does this, with mypy
# (the dev extra). Without it the step is skipped, loudly: the VM test's own
# mypy run would then be the first to see a type error.
if "$python" -c 'import mypy' 2>/dev/null; then
    "$python" "$here/check_vm_script.py" "$tmp/eval.json"
else
    echo "check.sh: mypy not installed: the VM test script was NOT type-checked" >&2
fi

#!/usr/bin/env bash
# A replay of how nixpkgs' pytestCheckHook builds pytest's command line from
# the derivation's attributes (pkgs/development/interpreters/python/hooks/
# pytest-check-hook.sh, read December 2026), ending in pytest's collection
# (`--collect-only -q`) instead of the run. It is a copy of the hook's
# argument handling, not the hook: no stdenv, no build, no sandbox.
#
# Usage: run from the package's source root, with the attributes in the
# environment as a derivation without __structuredAttrs passes them (a list
# is its elements joined by single spaces) and PYTHON naming an interpreter
# that has pytest and the package. check_pytest_hook.py does this from
# eval.nix's `package`.
#
# Left out: pytest-xdist's hook (it adds --numprocesses=$NIX_BUILD_CORES,
# which --collect-only ignores) and the pythonImportsCheck phase.
set -eu

python=${PYTHON:-python3}

# stdenv's concatTo and concatStringsSep for plain (non-array) variables: the
# value is split on whitespace, unquoted, as stdenv does.
words() {
    # shellcheck disable=SC2086
    eval "_words=( \${$1-} )"
}
concatStringsSep() {
    local value=${!2-}
    printf '%s' "${value// /$1}"
}
includeExcludeExpr() {
    local include exclude
    if [[ -n "${!1-}" ]]; then
        include="(($(concatStringsSep ") or (" "$1")))"
    fi
    if [[ -n "${!2-}" ]]; then
        exclude="${include:+ and }not ($(concatStringsSep ") and not (" "$2"))"
    fi
    printf '%s' "${include-}${exclude-}"
}
# The hook's expand-glob.py: a path glob must match something.
globMatches() {
    "$python" -c 'import glob, sys; sys.exit(0 if next(glob.iglob(sys.argv[1]), None) else 1)' "$1"
}

flagsArray=()

# pytestFlags (or, failing that, pyproject.toml's addopts) may choose the
# import mode; otherwise the hook uses importlib, not pytest's own prepend.
if [[ -z "${pytestImportMode-}" ]]; then
    words pytestFlags
    for flag in ${_words[@]+"${_words[@]}"}; do
        if [[ "$flag" =~ ^--import-mode[=\ ](.+)$ ]]; then
            pytestImportMode="${BASH_REMATCH[1]}"
            dontAddPytestImportMode=1
        fi
    done
fi
if [[ -z "${pytestImportMode-}" ]]; then
    addopts=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb")).get("tool", {}).get("pytest", {}).get("ini_options", {}).get("addopts", ""))')
    for flag in $addopts; do
        if [[ "$flag" =~ ^--import-mode[=\ ](.*)$ ]]; then
            pytestImportMode="${BASH_REMATCH[1]}"
            dontAddPytestImportMode=1
        fi
    done
fi
: "${pytestImportMode:=importlib}"
if [[ -z "${dontAddPytestImportMode-}" ]]; then
    flagsArray+=(--import-mode="$pytestImportMode")
fi

words enabledTestPaths
for path in ${_words[@]+"${_words[@]}"}; do
    if [[ "$path" =~ "::" ]]; then
        flagsArray+=("$path")
    elif globMatches "$path"; then
        flagsArray+=("$path")
    else
        echo "pytest-hook.sh: Enabled test path glob \"$path\" does not match any paths. Aborting" >&2
        exit 1
    fi
done

words disabledTestPaths
for path in ${_words[@]+"${_words[@]}"}; do
    if [[ "$path" =~ "::" ]]; then
        flagsArray+=("--deselect=$path")
    elif globMatches "$path"; then
        flagsArray+=("--ignore-glob=$path")
    else
        echo "pytest-hook.sh: Disabled test path glob \"$path\" does not match any paths. Aborting" >&2
        exit 1
    fi
done

if [[ -n "${enabledTests-}" ]] || [[ -n "${disabledTests-}" ]]; then
    flagsArray+=(-k "$(includeExcludeExpr enabledTests disabledTests)")
fi
if [[ -n "${enabledTestMarks-}" ]] || [[ -n "${disabledTestMarks-}" ]]; then
    flagsArray+=(-m "$(includeExcludeExpr enabledTestMarks disabledTestMarks)")
fi

# The hook's "compatibility layer to the obsolete pytestFlagsArray", verbatim:
# each element is word-split (and unquoted) again.
eval "flagsArray+=(${pytestFlagsArray[*]-})"

words pytestFlags
flagsArray+=(${_words[@]+"${_words[@]}"})

printf 'pytest flags:'
printf ' %q' "${flagsArray[@]}"
printf '\n'
# The hook runs the `pytest` script, which does not put the working directory
# on sys.path; `python -P -m pytest` does not either.
exec "$python" -P -m pytest "${flagsArray[@]}" --collect-only -q

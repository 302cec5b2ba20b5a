#!/usr/bin/env bash
# Create (once) and print the path of the project's Python environment.
#
# The environment lives outside the checkout, keyed on the hash of
# requirements/*.lock, so a fresh clone (CI) reuses the same multi-GB torch
# install as long as the pins are unchanged. Override with FORGETCORE_ENV=DIR.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$root/requirements/dev.lock"
nodeps="$root/requirements/no-deps.lock"
key="$(cat "$lock" "$nodeps" | sha256sum | cut -c1-16)"
env_dir="${FORGETCORE_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/forgetcore/env-$key}"
python="${PYTHON:-python3.11}"
if [ ! -x "$env_dir/bin/python" ] || [ ! -f "$env_dir/.complete" ]; then
    echo "forgetcore: creating Python environment in $env_dir (first run downloads torch, ~3 GB)" >&2
    rm -rf "$env_dir"
    mkdir -p "$(dirname "$env_dir")"
    "$python" -m venv "$env_dir"
    "$env_dir/bin/python" -m pip install --quiet --upgrade pip >&2
    "$env_dir/bin/python" -m pip install --quiet -r "$lock" >&2
    "$env_dir/bin/python" -m pip install --quiet --no-deps -r "$nodeps" >&2
    touch "$env_dir/.complete"
fi
echo "$env_dir"

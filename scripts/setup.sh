#!/usr/bin/env bash
# Makes ./.venv with Python >= 3.12 (jax 0.11 needs it) and installs convrot-jax into it.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test   (EXTRAS: test, cuda12, "test,cuda12")
# Python: the first of python3.13, python3.12, python3 that is >= 3.12; else the newest 3.12+ that
# pyenv holds (PYENV_VERSION=3.12.x python3); else it stops and says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

is_312() { "$@" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  for candidate in python3.13 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && is_312 "$candidate"; then echo "$candidate"; return 0; fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local version
    version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])(\.[0-9]+)?$' | sort -V | tail -n 1 || true)
    if [ -n "$version" ] && is_312 env PYENV_VERSION="$version" python3; then
      echo "env PYENV_VERSION=$version python3"; return 0
    fi
  fi
  return 1
}

if [ -x .venv/bin/python ] && ! is_312 .venv/bin/python; then
  echo "setup: .venv is not Python >= 3.12; recreating it" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  if ! python=$(find_python); then
    echo "setup: Python >= 3.12 not found (jax >= 0.11 needs it): install python3.12, or 'pyenv install 3.12'" >&2
    exit 1
  fi
  echo "setup: creating .venv with $($python --version 2>&1) ($python)"
  $python -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
spec="."
[ -n "$extras" ] && spec=".[$extras]"
echo "setup: pip install -e '$spec' (the first time, the test extras download torch: ~3 GB)"
.venv/bin/python -m pip install --quiet --editable "$spec"

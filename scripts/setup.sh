#!/usr/bin/env bash
# Makes ./.venv with Python >= 3.12 (jax 0.11 needs it) and installs convrot-jax into it.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test   (EXTRAS: test, cuda12, cuda13, "test,cuda12")
# Python 3.12 preferred (the GPU machine's): python3.12, else python3 if >= 3.12, else pyenv's newest
# 3.12.x (PYENV_VERSION=3.12.x python3), else python3.13 / pyenv's 3.13+; else it says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

is_312() { "$@" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  local candidate version
  for candidate in python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && is_312 "$candidate"; then echo "$candidate"; return 0; fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for pattern in '^3\.12(\.[0-9]+)?$' '^3\.(1[3-9])(\.[0-9]+)?$'; do
      version=$(pyenv versions --bare 2>/dev/null | grep -E "$pattern" | sort -V | tail -n 1 || true)
      if [ -n "$version" ] && is_312 env PYENV_VERSION="$version" python3; then
        echo "env PYENV_VERSION=$version python3"; return 0
      fi
    done
  fi
  if command -v python3.13 >/dev/null 2>&1 && is_312 python3.13; then echo python3.13; return 0; fi
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
echo "setup: pip install -e '$spec' -c constraints.txt (the first time, torch is a ~3 GB download)"
# constraints.txt pins every package to the version the test suite passed with.
.venv/bin/python -m pip install --quiet --constraint constraints.txt --editable "$spec"

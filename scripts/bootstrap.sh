#!/usr/bin/env bash
# Prepares this checkout to run: the Debian packages in the list files given as arguments
# (default scripts/debian-packages.txt; installed when run as root, otherwise named in a clear
# message) and a .venv with fleetgate installed.
# Re-running is cheap: the venv is rebuilt only when pyproject.toml or the lock changes.
set -euo pipefail
cd "$(dirname "$0")/.."

lists=("$@")
[ ${#lists[@]} -gt 0 ] || lists=(scripts/debian-packages.txt)
mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^[[:space:]]*$/d' "${lists[@]}")
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing Debian packages: ${missing[*]}" >&2
    echo "bootstrap: install them with: sudo apt-get install ${missing[*]}  (or run this as root)" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: fleetgate needs Python 3.11 or newer; '$PY' is $("$PY" --version 2>&1)" >&2
  exit 1
fi

# The venv is built only from the lock: first what builds things (requirements/build.txt), then
# every dependency with its hash (requirements/dev.txt), both without build isolation so that no
# unpinned package is fetched, then fleetgate itself (editable, no dependencies of its own).
stamp=.venv/.fleetgate-installed
want="$(cat pyproject.toml requirements/build.txt requirements/dev.txt | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: preparing .venv from requirements/dev.txt"
  rm -rf .venv
  "$PY" -m venv .venv
  pip=(.venv/bin/python -m pip install -q --require-hashes --no-deps --no-build-isolation)
  "${pip[@]}" -r requirements/build.txt
  "${pip[@]}" -r requirements/dev.txt
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  .venv/bin/python -m pip check -q >/dev/null || { .venv/bin/python -m pip check; exit 1; }
  echo "$want" > "$stamp"
fi

#!/usr/bin/env bash
# `make test-latest`: ruff, mypy and pytest against the newest release of every dependency (not the
# lock), in a throw-away venv. Not part of CI: it answers "would `make lock --upgrade` break us?".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
"$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
echo "test-latest: newest releases:"
"$venv/bin/python" -m pip freeze --exclude-editable | sed 's/^/  /'
export PATH="$venv/bin:$PATH"
"$venv/bin/ruff" check fleetgate enrollment broker device_sdk firmware_sim tests scripts
"$venv/bin/mypy"
"$venv/bin/python" -m pytest "$@"

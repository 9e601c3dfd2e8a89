#!/usr/bin/env bash
# `make lock`: refreshes the dependency lock on purpose (never run by bootstrap or CI).
#   requirements/build.txt  what the venv is built with (pip, setuptools, the sdists' build tools)
#   requirements/dev.txt    fleetgate's runtime and dev dependencies, every extra, with hashes
# Both are resolved for this machine's Python (3.11, Linux) by pip-tools, and dev.txt is
# constrained by build.txt so the two agree on shared packages. dev.txt's header records a digest
# of the inputs; scripts/check_lock.py (run by `make lint`, so by CI) refuses a stale lock.
# Extra arguments go to pip-compile, e.g. `make lock ARGS="--upgrade-package cryptography"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tool=$(mktemp -d)
trap 'rm -rf "$tool"' EXIT
"$PY" -m venv "$tool"
"$tool/bin/python" -m pip install -q -r requirements/tools.txt
compile=("$tool/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras
  --no-emit-index-url --no-emit-find-links "$@")
CUSTOM_COMPILE_COMMAND="make lock" "${compile[@]}" --output-file requirements/build.txt \
  requirements/build.in
CUSTOM_COMPILE_COMMAND="make lock" "${compile[@]}" --all-extras --constraint requirements/build.txt \
  --output-file requirements/dev.txt pyproject.toml
"$tool/bin/python" scripts/check_lock.py --stamp
echo "lock: requirements/build.txt and requirements/dev.txt refreshed; review 'git diff requirements/'"

#!/usr/bin/env bash
# `make test`: set up, then the whole suite on two lanes (tests/conftest.py says which);
# ends with the wall time, setup included, and pytest's 20 slowest tests above it.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
finish() { printf '\nmake test: %s after %d s wall (setup included)\n' "$1" "$(( $(date +%s) - started ))"; }
bash scripts/setup.sh || { finish "setup FAILED"; exit 1; }
.venv/bin/pytest -n 2 --dist loadscope --no-loadscope-reorder "$@" tests/unit tests/dags tests/integration
status=$?
if [ "$status" -eq 0 ]; then finish "passed"; else finish "FAILED (pytest exit $status)"; fi
exit "$status"

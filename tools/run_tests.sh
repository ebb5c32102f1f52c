#!/usr/bin/env bash
# Set up the environment (see tools/setup_env.sh) and run the linters and the test suite.
#
#   bash tools/run_tests.sh                    megatron-core as pip resolves it, in .venv
#   MCORE=0.19.2 bash tools/run_tests.sh .venv-mcore019
#   bash tools/run_tests.sh .venv -k packing   extra arguments go to pytest
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv}"
shift || true
python="$(bash "$repo/tools/setup_env.sh" "$venv" | tail -n 1)"
cd "$repo"
"$python" -m ruff check .
"$python" -m ruff format --check .
"$python" -m pytest -q "$@"

#!/usr/bin/env bash
# Set up .venv with the test extra and run the whole test suite (CPU only, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh test
exec .venv/bin/python -m pytest "$@"

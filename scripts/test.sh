#!/usr/bin/env bash
# Set up .venv with the test extra and run the whole test suite (CPU only, offline).
# Two pytest workers (TEST_WORKERS to change): nearly every test runs the job as a subprocess, and
# a job's start (importing torch) is most of its cost; a test file stays on one worker, so its
# module fixtures (a reference run, a built image) are made once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh test
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"

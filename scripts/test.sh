#!/usr/bin/env bash
# Set up .venv with the test extra (and Azurite, with npm), lint, and run the tests (CPU only; the
# tests themselves reach no network).
#
#   scripts/test.sh              ruff + mypy, then every suite (what CI runs)
#   scripts/test.sh unit         tests/unit: in process, about a minute: the inner loop
#   scripts/test.sh job          tests/job: the job as a real subprocess (signals, exit codes, S3)
#   scripts/test.sh deploy       tests/deploy: manifests, Dockerfiles, the image test
#   scripts/test.sh lint         ruff and mypy over job/ and scripts/ only
#
# Anything after the suite's name goes to pytest (e.g. `scripts/test.sh unit -k lease`).
# Two pytest workers (TEST_WORKERS to change): a test file stays on one worker, so its module
# fixtures (a reference run, a built image) are made once.
set -euo pipefail
cd "$(dirname "$0")/.."
suite=all
case "${1:-}" in
  unit | job | deploy | lint | all) suite=$1; shift ;;
esac
bash scripts/setup-venv.sh test
case $suite in
  unit | job | all) bash scripts/setup-azurite.sh ;;  # the Azure Blob emulator (tests/azurite.py)
esac

lint() {
  echo "[test] ruff check job scripts"
  .venv/bin/ruff check job scripts
  echo "[test] mypy (job scripts; settings in pyproject.toml)"
  .venv/bin/mypy
}

case $suite in
  lint) lint ;;
  all)
    lint
    exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile tests "$@"
    ;;
  *) exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "tests/$suite" "$@" ;;
esac

#!/usr/bin/env bash
# Create .venv (if missing) and install trainjob with the given extras, e.g. `test` or `stage`.
# torch/torchvision are pinned to the builds our machines serve from local disk; override with
# TORCH_SPEC (e.g. TORCH_SPEC="torch torchvision" to take the newest from your index).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

pip_install() {  # quiet on success, the whole log on failure
  local log
  log=$(mktemp)
  if ! .venv/bin/pip install --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
}

[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC2086
pip_install ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
pip_install -c scripts/constraints.txt -e ".${extras:+[$extras]}"
.venv/bin/python -c "import job, torch, torchvision; print('trainjob', job.__version__, 'torch', torch.__version__)"

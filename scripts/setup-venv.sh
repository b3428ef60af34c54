#!/usr/bin/env bash
# Create .venv (if missing) and install trainjob with the given extras, e.g. `test` or `stage`.
# torch/torchvision are pinned to the builds our machines serve from local disk; override with
# TORCH_SPEC (e.g. TORCH_SPEC="torch torchvision" to take the newest from your index).
# Prints a line per step and a heartbeat while pip works: the first install takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

say() { echo "[setup $(date +%H:%M:%S)] $*"; }

pip_install() {  # quiet on success (a heartbeat meanwhile), the whole log on failure
  local log heartbeat start=$SECONDS
  log=$(mktemp)
  (while sleep 15; do say "  ... still installing ($((SECONDS - start)) s)"; done) &
  heartbeat=$!
  if ! .venv/bin/pip install --disable-pip-version-check "$@" >"$log" 2>&1; then
    kill "$heartbeat" 2>/dev/null || true
    grep -v "^WARNING: Location" "$log" >&2
    rm -f "$log"
    exit 1
  fi
  kill "$heartbeat" 2>/dev/null || true
  say "  done in $((SECONDS - start)) s"
  rm -f "$log"
}

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
torch_spec="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
# Nothing to install when none of what decides the install changed since the last one: the
# dependency lists, the torch builds, the extras and this checkout's path (the editable install
# points here). A stamp in .venv records each install (test and stage extras side by side); pip
# alone takes 30-40 s to find nothing to do.
stamp=.venv/.trainjob-installed
want=$(cat pyproject.toml scripts/constraints.txt <(echo "$torch_spec|$extras|$PWD") | sha256sum | cut -c1-16)
if grep -qsx "$want" "$stamp" && .venv/bin/python -c "import job, torch, torchvision" 2>/dev/null; then
  say "nothing to install: pyproject.toml, scripts/constraints.txt, the torch builds and extras are as installed ($want)"
  exit 0
fi
say "installing $torch_spec (a few minutes the first time; nothing to do the next)"
# shellcheck disable=SC2086
pip_install $torch_spec
say "installing trainjob${extras:+ with [$extras]} and its dependencies"
pip_install -c scripts/constraints.txt -e ".${extras:+[$extras]}"
.venv/bin/python -c "import job, torch, torchvision; print('[setup] ready: trainjob', job.__version__, 'torch', torch.__version__)"
echo "$want" >>"$stamp"

#!/usr/bin/env bash
# Install Azurite, Microsoft's Azure Blob Storage emulator, into .cache/azurite (ignored by git) for
# the Azure end-to-end tests (tests/azurite.py starts it). Needs Node.js and npm: installs Debian's
# when they are missing (as root with apt-get). Nothing to do when the pinned version is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
# 3.35.0: the newest release that still runs on Node 18 and 20 (3.36 requires Node 21, 3.37 Node 22;
# Debian 12 ships Node 18)
version=3.35.0
prefix=.cache/azurite
say() { echo "[setup $(date +%H:%M:%S)] $*"; }

if [ "$(cat "$prefix/.version" 2>/dev/null)" = "$version" ] && [ -x "$prefix/node_modules/.bin/azurite-blob" ]; then
  say "Azurite $version already installed in $prefix"
  exit 0
fi
if ! command -v npm >/dev/null; then
  # a fresh Debian machine (CI's) has no Node.js: install Debian's when we may, else say how
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian's nodejs and npm (apt-get) for Azurite"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  else
    echo "setup-azurite: npm not found; install Node.js >= 18 and npm (Debian: apt-get install nodejs npm)" >&2
    exit 1
  fi
fi
say "installing Azurite $version into $prefix (npm)"
npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "azurite@$version" >&2
echo "$version" >"$prefix/.version"
say "Azurite ready: $prefix/node_modules/.bin/azurite-blob"

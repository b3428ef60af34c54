#!/usr/bin/env bash
# Prepare this machine for the image test (tests/deploy/test_image.py): a Docker engine, a stand-in for
# the python base image and a wheelhouse of the torch wheels, all without a container registry.
# Idempotent: a second run finds dockerd up and reuses the cached tarball and wheelhouse.
# Prints the variables the image test reads, as `export` lines for eval (and keeps them in
# $cache/image-test.env, where the test finds them when they are not set).
# Why each step: ../shared/INFRA.md "Containers for real".
set -euo pipefail
cache="${TRAINJOB_CI_CACHE:-/var/cache/trainjob-ci}"  # kept between runs on the same machine, never in the repo
torch_spec=(torch==2.14.1 torchvision==0.29.1)        # the builds scripts/setup-venv.sh installs
standin=trainjob-ci/python:3.11-slim-bookworm-standin
log() { echo "prepare-docker: $*" >&2; }
mkdir -p "$cache"

# 1. The engine: Debian's docker.io (dockerd 20.10), started by hand (CI has no systemd).
if ! command -v dockerd >/dev/null || ! command -v mmdebstrap >/dev/null; then
  log "installing docker.io and mmdebstrap"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io mmdebstrap >&2
fi
if ! timeout 20 docker info >/dev/null 2>&1; then
  log "starting dockerd (log: /var/log/trainjob-ci-dockerd.log)"
  nohup dockerd --storage-driver=overlay2 >/var/log/trainjob-ci-dockerd.log 2>&1 &
  deadline=$((SECONDS + 90))
  until timeout 20 docker info >/dev/null 2>&1; do
    if [ $SECONDS -gt $deadline ]; then
      tail -20 /var/log/trainjob-ci-dockerd.log >&2
      log "dockerd did not answer within 90 s"
      exit 1
    fi
    sleep 1
  done
fi
# Images left dangling by earlier runs' rebuilds (the image test removes its own old images; this
# catches the rest, e.g. build stages), once they are a week old.
docker image prune -f --filter until=168h >/dev/null

# 2. A stand-in for python:3.11-slim-bookworm (registries are unreachable): Debian's Python 3.11
# linked where the real image has it. The stand-in alone trusts this machine's egress CA (copied in
# from the host) so that pip inside a build reaches PyPI; the project's Dockerfiles never do that.
# The tarball is rebuilt when this recipe changes or after a week (security updates).
recipe="minbase python3,python3-venv,ca-certificates,netbase,tzdata bookworm bookworm-updates bookworm-security docker-clean v3"
tarball="$cache/python-standin-$(echo "$recipe" | sha256sum | cut -c1-12).tar"
if [ -f "$tarball" ] && [ -n "$(find "$tarball" -mtime +7)" ]; then
  log "stand-in tarball is over a week old: rebuilding"
  rm -f "$tarball"
  docker rmi "$standin" >/dev/null 2>&1 || true
fi
if [ ! -f "$tarball" ]; then
  # apt keeps no package caches in the image, as in Docker's official Debian images
  export docker_clean='DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";'
  log "building the stand-in base with mmdebstrap (a minute or two)"
  rm -f "$cache"/python-standin-*.tar
  # shellcheck disable=SC2016  # the hooks' $1 (the new root) is expanded by mmdebstrap, not here
  mmdebstrap --quiet --format=tar --variant=minbase --include=python3,python3-venv,ca-certificates,netbase,tzdata \
    --customize-hook='ln -sf /usr/bin/python3 "$1/usr/local/bin/python"; ln -sf /usr/bin/python3 "$1/usr/local/bin/python3"' \
    --customize-hook='if [ -d /usr/local/share/ca-certificates ]; then cp -r /usr/local/share/ca-certificates/. "$1/usr/local/share/ca-certificates/"; fi' \
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null 2>&1' \
    --customize-hook='printf "%s\n" "$docker_clean" >"$1/etc/apt/apt.conf.d/docker-clean"' \
    --customize-hook='rm -f "$1"/var/cache/apt/*.bin' \
    bookworm "${tarball%.tar}.partial.tar" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" >&2
  mv "${tarball%.tar}.partial.tar" "$tarball"
  docker rmi "$standin" >/dev/null 2>&1 || true
fi
if ! docker image inspect "$standin" >/dev/null 2>&1; then
  log "importing $tarball as $standin"
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    "$tarball" "$standin" >/dev/null
fi

# 3. The torch wheels as a PEP 503 index (the PyTorch wheel index is unreachable); the image test
# serves it on 127.0.0.1 and builds with --network host --build-arg TORCH_INDEX_URL=...
wheelhouse="$cache/wheelhouse-$(echo "${torch_spec[*]}" | tr ' =' '-_')"
if [ ! -f "$wheelhouse/simple/index.html" ]; then
  log "downloading ${torch_spec[*]} and their dependencies into $wheelhouse (about 3 GB)"
  rm -rf "$wheelhouse.tmp"
  if ! python3 -m pip download --quiet --disable-pip-version-check -d "$wheelhouse.tmp" "${torch_spec[@]}" \
      >"$cache/pip-download.log" 2>&1; then
    grep -v "^WARNING: Location" "$cache/pip-download.log" >&2
    exit 1
  fi
  python3 - "$wheelhouse.tmp" <<'PY'
import html, os, re, sys
root = sys.argv[1]
projects = {}
for name in sorted(os.listdir(root)):
    if name.endswith((".whl", ".tar.gz", ".zip")):
        project = re.sub(r"[-_.]+", "-", name.split("-")[0]).lower()  # PEP 503 normalised name
        projects.setdefault(project, []).append(name)
os.makedirs(os.path.join(root, "simple"))
with open(os.path.join(root, "simple", "index.html"), "w") as f:
    f.writelines(f'<a href="{p}/">{p}</a>\n' for p in sorted(projects))
for project, files in projects.items():
    os.makedirs(os.path.join(root, "simple", project))
    with open(os.path.join(root, "simple", project, "index.html"), "w") as f:
        f.writelines(f'<a href="../../{html.escape(n)}">{html.escape(n)}</a>\n' for n in files)
PY
  mv "$wheelhouse.tmp" "$wheelhouse"
fi

# For eval by the caller, and kept where tests/deploy/test_image.py looks when the variables are not set
# (a later `scripts/test.sh` on this machine builds from the same inputs).
printf 'export TRAINJOB_IMAGE_BASE=%s\nexport TRAINJOB_IMAGE_WHEELHOUSE=%s\n' "$standin" "$wheelhouse" | tee "$cache/image-test.env"

# shellcheck shell=bash
# Sourced by scripts/smoke.sh and scripts/smoke-docker.sh: start a local S3-compatible server
# (moto, as the test suite runs it) on a free port, point the AWS variables at it, wait for it,
# make the buckets `data` and `runs`, and stop it when the calling script exits. Needs .venv with
# the test extra (scripts/setup-venv.sh test). Sets $py to the venv's python.
py=.venv/bin/python
port=$($py -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
$py -m moto.server -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null' EXIT
export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ACCESS_KEY_ID=smoke AWS_SECRET_ACCESS_KEY=smoke AWS_DEFAULT_REGION=us-east-1
$py - <<'PY'
import os, time, urllib.request
import s3fs
deadline = time.time() + 30
while True:
    try:
        urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"] + "/moto-api/", timeout=1)
        break
    except OSError:
        if time.time() > deadline:
            raise SystemExit("local-s3.sh: the local S3 server did not start within 30 s")
        time.sleep(0.1)
fs = s3fs.S3FileSystem()
fs.mkdir("data")
fs.mkdir("runs")
PY

#!/usr/bin/env bash
# Build the image and run the job's smoke mode in a container exactly as docs/deploy.md's "Run in
# Docker" shows (read-only root, tmpfs /tmp and /cache, non-root, settings by environment).
# tests/deploy/test_image.py builds and smoke-runs through this script, so this is the path CI checks.
#   scripts/smoke-docker.sh                    CPU image; a local S3 server (moto) with a small dataset
#   scripts/smoke-docker.sh --gpu              CUDA image, run with --gpus all
#   scripts/smoke-docker.sh --build-arg TORCH_INDEX_URL=https://pypi.example.com/torch-cpu/simple
#   JOB_DATA_URI=s3://bucket/data JOB_OUTPUT_URI=s3://bucket/runs scripts/smoke-docker.sh
#                                              your own store and data (AWS_* and JOB_* passed in)
# Options:
#   --gpu                    docker/Dockerfile.gpu, run with --gpus all (default: Dockerfile.cpu)
#   --tag IMAGE              image name (default trainjob:smoke-cpu or trainjob:smoke-gpu)
#   --build-arg NAME=VALUE   passed to docker build; repeat it (TORCH_INDEX_URL, PYTHON_IMAGE, ...)
#   --network MODE           network of the build and the run (default host: the local S3 server
#                            and a wheel index on 127.0.0.1 are reachable only from the host's network)
#   --build-only             build, do not run
set -euo pipefail
cd "$(dirname "$0")/.."

# The documented flags; tests/deploy/test_deploy.py checks that they are docs/deploy.md's.
run_flags=(--rm --read-only --tmpfs /tmp:exec --tmpfs /cache:exec --shm-size 2g --stop-timeout 40)

flavour=cpu tag="" network=host build_only=false
build_args=() gpu_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) flavour=gpu; gpu_args=(--gpus all) ;;
    --tag) tag="$2"; shift ;;
    --build-arg) build_args+=(--build-arg "$2"); shift ;;
    --network) network="$2"; shift ;;
    --build-only) build_only=true ;;
    *) echo "smoke-docker.sh: unknown argument $1 (see the comment at the top of $0)" >&2; exit 2 ;;
  esac
  shift
done
image="${tag:-trainjob:smoke-$flavour}"

docker build --force-rm --network "$network" "${build_args[@]}" -f "docker/Dockerfile.$flavour" -t "$image" .
echo "smoke-docker.sh: built $image"
$build_only && exit 0

if [ -z "${JOB_DATA_URI:-}" ]; then  # no store given: a local S3-compatible server, as scripts/smoke.sh
  bash scripts/setup-venv.sh test >/dev/null
  # shellcheck source=scripts/local-s3.sh
  source scripts/local-s3.sh
  $py scripts/stage_dataset.py digits s3://data/digits >/dev/null
  export JOB_DATA_URI=s3://data/digits JOB_OUTPUT_URI=s3://runs JOB_RUN_NAME=smoke-docker
fi

# Every JOB_* variable and the standard AWS ones, by name only (docker reads the values from this
# environment, so secrets stay off the command line).
env_args=(-e JOB_SMOKE=true)
for name in $(compgen -e); do
  case "$name" in
    JOB_SMOKE) ;;
    JOB_*|AWS_ENDPOINT_URL|AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|AWS_DEFAULT_REGION|AWS_REGION)
      env_args+=(-e "$name") ;;
  esac
done
code=0
docker run "${run_flags[@]}" --network "$network" "${gpu_args[@]}" "${env_args[@]}" "$image" || code=$?
echo "smoke-docker.sh: $image exited $code; outputs under $JOB_OUTPUT_URI/${JOB_RUN_NAME:-<run name>}/smoke"
exit $code

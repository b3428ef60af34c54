#!/usr/bin/env bash
# For machines with a Docker engine: build the image, stage a tiny dataset, run the job in the
# container exactly as a cluster would (read-only root, non-root user, settings by environment),
# and print where the outputs went.
#   scripts/smoke-docker.sh          CPU image
#   scripts/smoke-docker.sh --gpu    CUDA image, run with --gpus all
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=cpu
gpu_args=()
if [ "${1:-}" = "--gpu" ]; then
  flavour=gpu
  gpu_args=(--gpus all)
fi
image="trainjob:smoke-$flavour"
docker build -f "docker/Dockerfile.$flavour" -t "$image" .

bash scripts/setup-venv.sh stage >/dev/null
work="$(pwd)/runs/smoke-docker"
mkdir -p "$work/data" "$work/out"
.venv/bin/python scripts/stage_dataset.py digits "$work/data" >/dev/null
chmod -R a+rwX "$work"  # the container runs as uid 10001

docker run --rm "${gpu_args[@]}" \
  --read-only --tmpfs /tmp --tmpfs /cache --shm-size 1g \
  -v "$work/data:/data:ro" -v "$work/out:/out" \
  -e JOB_DATA_URI=/data -e JOB_OUTPUT_URI=/out -e JOB_RUN_NAME=smoke \
  -e JOB_EPOCHS=3 -e JOB_OPTIMIZER=adam -e JOB_LR=0.01 \
  "$image"
echo
echo "outputs: $work/out/smoke (summary.json, history.jsonl, checkpoints/, plots/)"

#!/usr/bin/env bash
# The whole path in one command, no Docker: start a local S3-compatible server (moto, as the test
# suite does), stage a small dataset into it, and run the job's smoke mode against it.
#   scripts/smoke.sh            MNIST-format digits
#   scripts/smoke.sh images     a generated image folder with resnet18 (random weights)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh test >/dev/null
# shellcheck source=scripts/local-s3.sh
source scripts/local-s3.sh

if [ "${1:-digits}" = "images" ]; then
  $py scripts/stage_dataset.py images s3://data/flowers --per-class 16
  # random but seeded weights: a given random backbone can put the first loss far from ln(classes)
  $py -c "import io, s3fs, torch, torchvision; torch.manual_seed(0); b = io.BytesIO(); torch.save(torchvision.models.resnet18().state_dict(), b); s3fs.S3FileSystem().pipe('data/resnet18.pt', b.getvalue())"
  export JOB_DATA_URI=s3://data/flowers JOB_MODEL=resnet18 JOB_PRETRAINED=s3://data/resnet18.pt JOB_IMAGE_SIZE=64 \
         JOB_FREEZE=all JOB_OPTIMIZER=adam JOB_LR=0.001 JOB_BATCH_SIZE=16
else
  $py scripts/stage_dataset.py digits s3://data/digits >/dev/null
  export JOB_DATA_URI=s3://data/digits
fi
JOB_SMOKE=true JOB_OUTPUT_URI=s3://runs JOB_RUN_NAME=smoke-demo $py -m job

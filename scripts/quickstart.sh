#!/usr/bin/env bash
# From a fresh clone: install, stage scikit-learn's bundled handwritten digits as an MNIST-format
# dataset in ./data/digits (no download), train on it, then use the model it exports: classify a
# folder of digit images with it, and say where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh stage
.venv/bin/python scripts/stage_dataset.py digits ./data/digits
export JOB_DATA_URI="${JOB_DATA_URI:-./data/digits}"
export JOB_OUTPUT_URI="${JOB_OUTPUT_URI:-./runs}"
export JOB_RUN_NAME="${JOB_RUN_NAME:-quickstart}"
# The small digits set learns faster with Adam than with the MNIST recipe's SGD lr 0.5.
export JOB_OPTIMIZER="${JOB_OPTIMIZER:-adam}" JOB_LR="${JOB_LR:-0.01}" JOB_EPOCHS="${JOB_EPOCHS:-10}"
.venv/bin/python -m job
run="$JOB_OUTPUT_URI/$JOB_RUN_NAME"
echo
echo "the exported model classifies new images: the digits' test set as PNG files, in ./data/digit-images"
.venv/bin/python scripts/stage_dataset.py digit-images ./data/digit-images
.venv/bin/python -m job predict "$run" ./data/digit-images --output "$run/predictions/digit-images.jsonl"
echo
echo "outputs:"
echo "  model       $run/model/ (model.safetensors, model.onnx, config.json)"
echo "  predictions $run/predictions/digit-images.jsonl"
echo "  checkpoint  $run/checkpoints/best.pt (and last.pt, latest.json)"
echo "  history     $run/history.jsonl"
echo "  summary     $run/summary.json"
echo "  plots       $run/plots/ (accuracy, loss, confusion matrices)"

"""The GPU acceptance check's CPU branch, as CI runs it: `python scripts/gpu_check.py --quick`
runs every check that applies on this machine through the real job and reports the GPU-only ones
as skipped; the report is one JSON file whose figures are there and plausible."""

import json
import subprocess
import sys

import torch

from conftest import ROOT

GPU_ONLY = {"decode_parity", "amp", "channels_last"}
EVERYWHERE = {"environment", "compile", "ddp_stop_resume", "export_on_device", "throughput"}


def test_the_gpu_check_runs_its_cpu_branch_and_reports_every_check(tmp_path):
    out = tmp_path / "gpu-check.json"
    result = subprocess.run([sys.executable, "scripts/gpu_check.py", "--quick", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:]
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert set(checks) == GPU_ONLY | EVERYWHERE and report["passed"] is True
    assert all(checks[name]["status"] == "passed" for name in EVERYWHERE), checks
    if not torch.cuda.is_available():
        assert all(checks[name]["status"] == "skipped" and "needs a GPU" in checks[name]["reason"]
                   for name in GPU_ONLY)
    assert checks["environment"]["default_workers_per_process"] >= 0 and checks["environment"]["cpus"]
    assert checks["compile"]["max_val_accuracy_gap"] <= 0.02
    assert checks["ddp_stop_resume"]["resumed_to_epoch"] == checks["ddp_stop_resume"]["stopped_at_epoch"] + 1
    assert any("ONNX verified" in line for line in checks["export_on_device"]["export_lines"])
    figures = checks["throughput"]
    assert figures["mlp_train_samples_per_second"] > 0 and figures["resnet_synthetic"]["images_per_second"] > 0
    assert {"workers", "device"} <= set(figures["shards"]) and figures["shards"]["device_over_workers"] > 0

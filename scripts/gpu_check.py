#!/usr/bin/env python
"""The GPU acceptance check: every CUDA path of the job in one command, one JSON report.

  python scripts/gpu_check.py [--out gpu-check.json] [--quick]

On a machine with GPUs it runs, each as a check with its figures:
  environment       torch, CUDA, driver, GPUs and capability, the container's CPUs and the default
                    workers and threads the job picks
  decode_parity     shards' device decode (nvjpeg, the job's own decoder) against the CPU decode of
                    the same JPEGs over many batches while a model trains on the same GPU (the H100's
                    JPEG engine ignores stream order: corrupted batches show as large differences)
  amp               bf16 (where native) and fp16 with a gradient scaler against fp32: the same steps
                    from the same weights end at nearby losses, none NaN
  compile           the job with JOB_COMPILE=true against eager: the same history within tolerance,
                    and the cold and warm (cache reused) compile time
  channels_last     a ResNet's outputs in channels-last against contiguous memory
  ddp_stop_resume   the job under `python -m job.launch` on every local GPU (nccl; gloo on the CPU):
                    SIGTERM after two epochs exits 143 with a checkpoint, the rerun resumes
  export_on_device  a transfer-learning run exporting ONNX and verifying it on the training device
  throughput        MLP samples/s (the job's history), ResNet-50 images/s on synthetic tensors (amp,
                    channels-last), and a sharded JPEG dataset with worker decode and device decode
On the CPU the same command runs the checks that apply there (smaller) and reports the GPU-only
ones as skipped; CI runs that branch (tests/job/test_gpu_check.py). Exit 0 when every check that
ran passed, 1 otherwise. The JSON goes to --out and to stdout.
"""

import argparse
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

import numpy as np
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import stage_dataset  # noqa: E402

from job import runtime as rt  # noqa: E402

GPU = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if GPU else 0


class Skipped(Exception):
    """A check that does not apply on this machine (the reason is reported)."""


class Failed(Exception):
    """A check that ran and found a problem; its figures are reported with it."""

    def __init__(self, message: str, **figures):
        super().__init__(message)
        self.figures = figures


def job_env(**settings) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOB_")}
    env.update({f"JOB_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def run_job(*args, timeout: float = 900, launcher: list[str] | None = None, **settings) -> tuple[int, str, float]:
    """`python -m job` (or the launcher) as a subprocess: (exit code, output, seconds)."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", *(launcher or ["job"]), *args], env=job_env(**settings), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return result.returncode, result.stdout, time.monotonic() - started


def history(run: str) -> list[dict]:
    path = os.path.join(run, "history.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def expect(ok: bool, message: str, output: str = "", /, **figures: Any) -> None:
    if not ok:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise Failed(message + (f"; the job's last lines:\n{tail}" if tail else ""), **figures)


# --- the checks ------------------------------------------------------------------------------


def environment(ctx) -> dict:
    cpus = rt.cpus_available()
    share = max(1, cpus.count // max(1, GPUS))
    workers, threads = rt.default_workers_and_threads(share, "resnet50", on_gpu=GPU)
    figures: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "driver": rt.driver_version(),
        "cpus": cpus.describe(),
        "default_workers_per_process": workers,
        "default_threads_per_process": threads,
        "gpus": [],
    }
    for i in range(GPUS):
        props = torch.cuda.get_device_properties(i)
        figures["gpus"].append({
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False) if i == 0 else None,
        })
    problem = rt.unusable_gpu(figures["driver"], torch.version.cuda) if not GPU else None
    expect(problem is None, f"a GPU is present but unusable: {problem}")
    return figures


def decode_parity(ctx) -> dict:
    if not GPU:
        raise Skipped("needs a GPU (the CPU has no device decode to compare)")
    from torchvision.io import ImageReadMode, decode_jpeg

    from job.data import stream

    device = torch.device("cuda", 0)
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):  # photo-like JPEGs of a few sizes
        h, w = int(rng.integers(200, 400)), int(rng.integers(200, 500))
        low = rng.normal(0, 50, (-(-h // 8), -(-w // 8), 3))
        pixels = np.clip(128 + np.kron(low, np.ones((8, 8, 1)))[:h, :w] + rng.normal(0, 25, (h, w, 3)), 0, 255)
        buffer = io.BytesIO()
        from PIL import Image

        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        blobs.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    reference = [decode_jpeg(b, mode=ImageReadMode.RGB) for b in blobs]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3),
                                torch.nn.Flatten(), torch.nn.LazyLinear(10)).to(device)
    x = torch.randn(32, 3, 128, 128, device=device)
    model(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    guarded = stream.cuda_jpeg_decoder(device)  # the job's own device decode, stream discipline included

    def unguarded(blobs):  # torchvision's call as the job made it before: for comparison only
        return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)

    batches = 50 if ctx.quick else 300
    figures: dict = {"batches": batches, "images": batches * 16}
    for name, decoder in (("job", guarded), ("unguarded_torchvision", unguarded)):
        worst, corrupted = 0.0, 0
        for _ in range(batches):
            loss = model(x).square().mean()  # queued on the training stream while the next batch decodes
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            picks = [int(i) for i in rng.integers(0, len(blobs), 16)]
            decoded = decoder([blobs[i] for i in picks])
            for i, image in zip(picks, decoded, strict=True):
                diff = (image.cpu().float() - reference[i].float()).abs()
                worst = max(worst, float(diff.max()))
                # nvjpeg and libjpeg-turbo differ by a few levels (IDCT, upsampling); corruption by far more
                corrupted += int(float(diff.mean()) > 4.0)
        figures[name] = {"corrupted_images": corrupted, "max_abs_diff": worst}
    bad = figures["job"]["corrupted_images"]
    expect(bad == 0, f"{bad} of {batches * 16} device-decoded images differ from the CPU decode", **figures)
    return figures


def train_step(model, optimizer, scaler, dtype, x, y) -> torch.Tensor:
    """One step as the job takes it: autocast to `dtype` (None: fp32), a scaler for fp16."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def amp(ctx) -> dict:
    if not GPU:
        raise Skipped("needs a GPU (the job uses no mixed precision on the CPU)")
    import torchvision

    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    start = torchvision.models.resnet18(num_classes=10).to(device).state_dict()
    data = torch.randn(8, 32, 3, 64, 64, device=device)
    labels = torch.randint(0, 10, (8, 32), device=device)
    dtypes = {"fp32": None, "fp16": torch.float16}
    if torch.cuda.is_bf16_supported(including_emulation=False):
        dtypes["bf16"] = torch.bfloat16
    losses = {}
    for name, dtype in dtypes.items():
        model = torchvision.models.resnet18(num_classes=10).to(device)
        model.load_state_dict(start)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        for _ in range(5):
            for xb, yb in zip(data, labels, strict=True):
                loss = train_step(model, optimizer, scaler, dtype, xb, yb)
        losses[name] = float(loss)
    figures = {"final_loss": losses}
    for name, value in losses.items():
        expect(np.isfinite(value) and abs(value - losses["fp32"]) <= 0.25 * max(losses["fp32"], 0.05),
               f"{name} ended at loss {value:.4f} against fp32's {losses['fp32']:.4f}", **figures)
    return figures


def compile_check(ctx) -> dict:
    data = os.path.join(ctx.tmp, "digits")
    common: dict[str, Any] = dict(
        data_uri=data, output_uri=os.path.join(ctx.tmp, "compile"), epochs=2, optimizer="adam", lr=0.01,
        cache_dir=os.path.join(ctx.tmp, "compile-cache"), export="off", threads=1, checkpoint_min_seconds=0,
    )
    code, eager_out, eager_s = run_job(run_name="eager", compile="false", **common)
    expect(code == 0, f"the eager run exited {code}", eager_out)
    code, cold_out, cold_s = run_job(run_name="cold", compile="true", **common)
    expect(code == 0, f"the compiled run exited {code}", cold_out)
    code, warm_out, warm_s = run_job(run_name="warm", compile="true", **common)
    expect(code == 0, f"the second compiled run exited {code}", warm_out)
    eager, cold = history(os.path.join(ctx.tmp, "compile", "eager")), history(os.path.join(ctx.tmp, "compile", "cold"))
    gap = max(abs(a["val_accuracy"] - b["val_accuracy"]) for a, b in zip(eager, cold, strict=True))
    figures = {"eager_run_seconds": round(eager_s, 1), "cold_compiled_run_seconds": round(cold_s, 1),
               "warm_compiled_run_seconds": round(warm_s, 1), "max_val_accuracy_gap": round(gap, 4)}
    expect(len(eager) == len(cold) == 2 and gap <= 0.02, "compiled and eager histories differ", **figures)
    return figures


def channels_last(ctx) -> dict:
    if not GPU:
        raise Skipped("needs a GPU (the job uses channels-last on CUDA only)")
    import torchvision

    device = torch.device("cuda", 0)
    torch.backends.cudnn.allow_tf32 = False  # compare layouts, not TF32 against FP32
    model = torchvision.models.resnet50().to(device).eval()
    x = torch.randn(16, 3, 224, 224, device=device)
    with torch.no_grad():
        plain = model(x)
        last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    gap = float((plain - last).abs().max() / plain.abs().max())
    torch.backends.cudnn.allow_tf32 = True
    expect(gap < 1e-3, f"channels-last outputs differ by {gap:.2e} (relative)", relative_gap=gap)
    return {"relative_gap": gap}


def ddp_stop_resume(ctx) -> dict:
    procs = GPUS if GPUS > 1 else (1 if GPU else 2)
    run = os.path.join(ctx.tmp, "ddp")
    settings: dict[str, Any] = dict(data_uri=os.path.join(ctx.tmp, "digits"), output_uri=run, run_name="r", epochs=200,
                    optimizer="adam", lr=0.01, export="off", checkpoint_min_seconds=0, threads=1,
                    cache_dir=os.path.join(ctx.tmp, "ddp-cache"))
    launcher = ["job.launch", "--standalone", f"--nproc-per-node={procs}"]
    proc = subprocess.Popen([sys.executable, "-m", *launcher], env=job_env(**settings), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while len(history(os.path.join(run, "r"))) < 2:
        expect(proc.poll() is None and time.monotonic() < deadline, "the distributed run ended or hung before 2 epochs",
               proc.stdout.read() if proc.stdout and proc.poll() is not None else "")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    expect(proc.returncode == 143, f"SIGTERM gave exit {proc.returncode}, not 143", out)
    latest = json.load(open(os.path.join(run, "r", "checkpoints", "latest.json")))
    code, rerun, _ = run_job(launcher=launcher, **{**settings, "epochs": latest["epoch"] + 1})
    expect(code == 0, f"the resumed run exited {code}", rerun)
    epochs = [row["epoch"] for row in history(os.path.join(run, "r"))]
    expect(epochs == list(range(1, latest["epoch"] + 2)), f"the resumed history has epochs {epochs}", rerun)
    return {"processes": procs, "backend": "nccl" if GPU else "gloo", "stopped_at_epoch": latest["epoch"],
            "resumed_to_epoch": epochs[-1]}


def export_on_device(ctx) -> dict:
    images = os.path.join(ctx.tmp, "images")
    code, out, seconds = run_job(data_uri=images, output_uri=os.path.join(ctx.tmp, "export"), run_name="e",
                                 model="resnet18", pretrained="none", freeze="none", image_size=64, epochs=1,
                                 batch_size=16, export="onnx", cache_dir=os.path.join(ctx.tmp, "export-cache"))
    expect(code == 0, f"the run exited {code}", out)
    model = os.path.join(ctx.tmp, "export", "e", "model")
    expect(os.path.exists(os.path.join(model, "model.onnx")) and os.path.exists(os.path.join(model, "config.json")),
           "no model.onnx and config.json in model/", out)
    return {"run_seconds": round(seconds, 1), "device": "cuda" if GPU else "cpu",
            "export_lines": [line.split(" ", 2)[-1][:200] for line in out.splitlines()
                             if any(w in line for w in ("exporting", "exported", "ONNX"))][:8]}


def throughput(ctx) -> dict:
    figures: dict = {}
    # the MLP, from the job's own history
    code, out, _ = run_job(data_uri=os.path.join(ctx.tmp, "digits"), output_uri=os.path.join(ctx.tmp, "tp"),
                           run_name="mlp", epochs=3, export="off", threads=1, checkpoint_min_seconds=0,
                           cache_dir=os.path.join(ctx.tmp, "tp-cache"))
    expect(code == 0, f"the MLP run exited {code}", out)
    rows = history(os.path.join(ctx.tmp, "tp", "mlp"))
    figures["mlp_train_samples_per_second"] = round(float(np.median([r["train_samples_per_second"] for r in rows])), 1)
    figures["resnet_synthetic"] = resnet_synthetic(ctx)
    figures["shards"] = shards(ctx)
    return figures


def resnet_synthetic(ctx) -> dict:
    """Training steps of a ResNet on tensors already on the device: the model's own ceiling."""
    import torchvision

    device = torch.device("cuda", 0) if GPU else torch.device("cpu")
    name, size, batch, steps = ("resnet50", 224, 128, 50) if GPU else ("resnet18", 64, 16, 4 if ctx.quick else 10)
    model = getattr(torchvision.models, name)(num_classes=100).to(device)
    dtype = None
    if GPU:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if GPU:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device)
    if GPU:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16) if GPU else None

    def step():
        train_step(model, optimizer, scaler, dtype, x, y)

    for _ in range(2 if not GPU else 10):
        step()
    if GPU:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if GPU:
        torch.cuda.synchronize()
    return {"model": name, "image_size": size, "batch_size": batch, "amp": str(dtype).replace("torch.", ""),
            "images_per_second": round(batch * steps / (time.perf_counter() - started), 1)}


def shards(ctx) -> dict:
    """The same JPEGs prepared as shards, trained from with worker decode and with device decode."""
    images = os.path.join(ctx.tmp, "images")
    prepared = os.path.join(ctx.tmp, "shards")
    code, out, _ = run_job("prepare", images, prepared, cache_dir=os.path.join(ctx.tmp, "prep-cache"))
    expect(code == 0, f"prepare exited {code}", out)
    result = {}
    for decode in ("workers", "device"):
        code, out, _ = run_job(data_uri=prepared, output_uri=os.path.join(ctx.tmp, "sh"), run_name=decode,
                               model="resnet18", pretrained="none", freeze="none", image_size=64 if not GPU else 224,
                               epochs=2, batch_size=16 if not GPU else 128, decode=decode, export="off",
                               cache_dir=os.path.join(ctx.tmp, f"sh-cache-{decode}"))
        expect(code == 0, f"the shards run with JOB_DECODE={decode} exited {code}", out)
        rows = history(os.path.join(ctx.tmp, "sh", decode))
        result[decode] = {"train_samples_per_second": rows[-1]["train_samples_per_second"],
                          "val_accuracy": rows[-1]["val_accuracy"]}
    result["device_over_workers"] = round(result["device"]["train_samples_per_second"]
                                          / result["workers"]["train_samples_per_second"], 2)
    return result


CHECKS = {
    "environment": environment,
    "decode_parity": decode_parity,
    "amp": amp,
    "compile": compile_check,
    "channels_last": channels_last,
    "ddp_stop_resume": ddp_stop_resume,
    "export_on_device": export_on_device,
    "throughput": throughput,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check.json", help="where the JSON report goes (also printed)")
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer steps (the CI branch)")
    parser.add_argument("--only", nargs="*", choices=sorted(CHECKS), help="run these checks only")
    args = parser.parse_args()
    report: dict = {"gpu": GPU, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "checks": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = argparse.Namespace(tmp=tmp, quick=args.quick)
        stage_dataset.stage(stage_dataset.digits(), os.path.join(tmp, "digits"))
        per_class = 24 if args.quick else (400 if GPU else 60)
        stage_dataset.synthetic_images(os.path.join(tmp, "images"), per_class=per_class, size=96 if not GPU else 256)
        for name, check in CHECKS.items():
            if args.only and name not in args.only:
                continue
            started = time.monotonic()
            try:
                entry = {"status": "passed", **check(ctx)}
            except Skipped as skip:
                entry = {"status": "skipped", "reason": str(skip)}
            except Failed as failure:
                entry = {"status": "failed", "error": str(failure), **failure.figures}
            except Exception as exc:  # a check's own crash is reported, and the others still run
                entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()[-2000:]}
            entry["seconds"] = round(time.monotonic() - started, 1)
            report["checks"][name] = entry
            print(f"gpu-check: {name}: {entry['status']} ({entry['seconds']} s)", file=sys.stderr, flush=True)
    report["passed"] = all(c["status"] != "failed" for c in report["checks"].values())
    text = json.dumps(report, indent=1)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    print(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

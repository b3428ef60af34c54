#!/usr/bin/env python
"""The sharded data path against today's per-item path, measured in one run (these machines are
noisy: only ratios measured side by side mean anything). Prints JSON.

  throughput   images/s per core delivering augmented 224 px training batches from the same
               flowers-like 500x375 JPEGs: the image-folder path (PIL per item in a DataLoader
               worker: rotation, random resized crop, flip, ToTensor, Normalize) against shards
               (prepared with the shorter side at 256 px; libjpeg-turbo decode and uint8 crop/flip/rotation in the
               worker, normalisation per batch). One worker each; target >= 10x.
  startup      seconds from `python -m job` to its first training step on 10k and 40k small
               images, sharded and as an image folder (target: sharded 40k/10k <= 1.2)
  cache        the most bytes of shards on disk, polled every 20 ms while a run trains on a
               sharded dataset 4x larger than JOB_SHARD_CACHE_BYTES (target: never above it)

  python scripts/bench_loader.py [--images 512] [--skip startup]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from job.data.dataset import load_images, load_shards  # noqa: E402
from job.data.index import find_index  # noqa: E402
from job.runtime import Runtime  # noqa: E402
from job.settings import Settings  # noqa: E402


def flowers(root: str, n: int, size=(500, 375), seed=0, quality=90) -> None:
    """n photos-to-be in train/ (3 classes) and a few in valid/: a class colour under textured
    noise, the entropy of a real photo rather than a flat colour (which decodes far faster)."""
    rng = np.random.default_rng(seed)
    colours = [(230, 230, 60), (200, 30, 40), (120, 40, 200)]
    for split, count in (("train", n), ("valid", max(3, n // 10))):
        for i in range(count):
            c = i % 3
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            w, h = size
            low = rng.normal(0, 50, (-(-h // 8), -(-w // 8), 3))  # blotches, then fine noise: like foliage
            texture = np.kron(low, np.ones((8, 8, 1)))[:h, :w] + rng.normal(0, 25, (h, w, 3))
            Image.fromarray(np.clip(np.array(colours[c]) + texture, 0, 255).astype(np.uint8)).save(
                os.path.join(folder, f"{i:06d}.jpg"), quality=quality)


def job(*args, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("JOB_")}
    full.update({f"JOB_{k.upper()}": str(v) for k, v in env.items()})
    return subprocess.run([sys.executable, "-m", "job", *args], env=full, cwd=ROOT, capture_output=True, text=True)


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and all its descendants (the DataLoader's
    workers, its forkserver), read from /proc: "per core" counts every process that works."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(pid)], times[int(pid)] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    total = sum(times[p] for p in tree)
    return total / os.sysconf("SC_CLK_TCK")


def rate(batches, warmup: int = 2) -> tuple[float, float]:
    """(images per wall second, images per CPU second of every process) over the batches after
    the first `warmup` (worker start-up excluded)."""
    count, start, cpu = 0, 0.0, 0.0
    for i, (x, _) in enumerate(batches):
        if i == warmup:
            start, cpu = time.perf_counter(), cpu_seconds()
        elif i > warmup:
            count += len(x)
    return count / (time.perf_counter() - start), count / (cpu_seconds() - cpu)


def throughput(tmp: str, n: int) -> dict:
    flowers(os.path.join(tmp, "photos"), n)
    prepared = job("prepare", os.path.join(tmp, "photos"), os.path.join(tmp, "photo-shards"), shard_bytes=8 << 20,
                   cache_dir=os.path.join(tmp, "cache"))
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    settings = Settings(data_uri=os.path.join(tmp, "photos"), image_size=224, augment=True, num_workers=1,
                        cache_dir=os.path.join(tmp, "cache"), model="resnet18")
    runtime = Runtime(torch.device("cpu"), threads=1, workers=1, scan_threads=2)
    folder = load_images(os.path.join(tmp, "photos"), settings, runtime, normalize=True)
    index = find_index(os.path.join(tmp, "photo-shards"))
    assert index is not None, "prepare wrote no index.json"
    sharded = load_shards(settings.model_copy(update={"data_uri": os.path.join(tmp, "photo-shards")}),
                                   runtime, index, normalize=True)
    train = torch.arange(n)
    results: dict[str, list] = {"per_item": [], "shards": []}
    for _ in range(3):  # alternate, so drift in machine load hits both alike
        results["per_item"].append(rate(folder.samples.batches(train, 32, train=True)))
        results["shards"].append(rate(sharded.samples.batches(train, 32, train=True, epoch=len(results["shards"]))))
    wall = {k: float(np.median([r[0] for r in v])) for k, v in results.items()}
    cpu = {k: float(np.median([r[1] for r in v])) for k, v in results.items()}
    photo = os.path.join(tmp, "photos", "train", "class0", "000000.jpg")
    return {"images": n, "source_jpeg_bytes": os.path.getsize(photo), "source_size": "500x375",
            "shard_jpeg_short_side": 256, "workers": 1, "batch": 32,
            "images_per_wall_second": {k: round(v, 1) for k, v in wall.items()},
            "images_per_cpu_second": {k: round(v, 1) for k, v in cpu.items()},
            "shards_over_per_item_per_cpu_second": round(cpu["shards"] / cpu["per_item"], 2),
            "shards_over_per_item_wall": round(wall["shards"] / wall["per_item"], 2), "target": ">= 10 per core"}


def startup(tmp: str) -> dict:
    """Seconds to the first training step (the debug line each epoch starts with)."""
    out = {}
    for n in (10_000, 40_000):
        source = os.path.join(tmp, f"small-{n}")
        flowers(source, n, size=(64, 48), seed=n, quality=85)
        prepared = job("prepare", source, source + "-shards", shard_bytes=32 << 20,
                       cache_dir=os.path.join(tmp, "cache"))
        assert prepared.returncode == 0, prepared.stdout + prepared.stderr
        for name, uri in (("image_folder", source), ("sharded", source + "-shards")):
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "job"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={
                    **{k: v for k, v in os.environ.items() if not k.startswith("JOB_")},
                    "JOB_DATA_URI": uri,
                    "JOB_OUTPUT_URI": os.path.join(tmp, "runs"),
                    "JOB_RUN_NAME": f"{name}-{n}",
                    "JOB_MODEL": "mlp",
                    "JOB_IMAGE_SIZE": "32",
                    "JOB_EPOCHS": "1",
                    "JOB_LIMIT_TRAIN_BATCHES": "1",
                    "JOB_LIMIT_VAL_BATCHES": "1",
                    "JOB_EXPORT": "off",
                    "JOB_LOG_LEVEL": "debug",
                    "JOB_NUM_WORKERS": "1",
                    "JOB_CACHE_DIR": os.path.join(tmp, f"cache-{name}-{n}"),
                },
            )
            first_step = None
            for line in proc.stdout or ():
                if first_step is None and " epoch 1 from sample 0 shard " in line:
                    first_step = time.perf_counter() - start
            proc.wait()
            assert proc.returncode == 0 and first_step, f"{name} {n} failed"
            out[f"{name}_{n}"] = round(first_step, 2)
    return {
        "seconds_to_first_step": out,
        "sharded_40k_over_10k": round(out["sharded_40000"] / out["sharded_10000"], 2),
        "image_folder_40k_over_10k": round(out["image_folder_40000"] / out["image_folder_10000"], 2),
        "target": "sharded_40k_over_10k <= 1.2",
    }


def cache_bound(tmp: str) -> dict:
    source = os.path.join(tmp, "bound")
    flowers(source, 1200, size=(96, 72), seed=7)
    prepared = job("prepare", source, source + "-shards", shard_bytes=64 << 10, cache_dir=os.path.join(tmp, "cache"))
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    index = json.load(open(os.path.join(source + "-shards", "index.json")))
    total = sum(s["bytes"] for split in index["splits"].values() for s in split)
    limit = total // 4
    folder = os.path.join(tmp, "cache-bound")
    peak, stop = [0], threading.Event()

    def poll():
        while not stop.is_set():
            size = 0
            for here, _, files in os.walk(folder):
                for f in files:
                    try:
                        size += os.path.getsize(os.path.join(here, f))
                    except OSError:
                        pass
            peak[0] = max(peak[0], size)
            time.sleep(0.02)

    threading.Thread(target=poll, daemon=True).start()
    result = job(
        data_uri=source + "-shards",
        output_uri=os.path.join(tmp, "runs"),
        run_name="bound",
        model="mlp",
        image_size=32,
        epochs=2,
        batch_size=16,
        num_workers=1,
        shard_cache_bytes=limit,
        cache_dir=folder,
        export="off",
    )
    stop.set()
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        "dataset_bytes": total,
        "limit_bytes": limit,
        "most_bytes_on_disk": peak[0],
        "within_limit": peak[0] <= limit,
        "dataset_over_limit": round(total / limit, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="photos for the throughput measurement")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "startup", "cache"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        if "throughput" not in args.skip:
            result["throughput"] = throughput(tmp, args.images)
        if "cache" not in args.skip:
            result["cache"] = cache_bound(tmp)
        if "startup" not in args.skip:
            result["startup"] = startup(tmp)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

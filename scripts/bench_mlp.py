#!/usr/bin/env python
"""Training throughput of the MNIST MLP on CPU as users run it, against what the hardware allows.

On the seed recipe (real MNIST t10k split 8,000 / 2,000, MLP 784-32-10, SGD lr 0.5, batch 100,
10 epochs, 1 thread) each round measures, in a new random order:

  job       `python -m job` as a subprocess with the recipe's settings and nothing else; its own
            history.jsonl gives train_samples_per_second per epoch (median of epochs 2-10), and
            the process's wall time is recorded (start-up, pull, every epoch, test, outputs)
  loop      the job's train_one_epoch in this process, on tensors (median of 10 epochs)
  floor     a bare forward/backward/step loop over batches prepared in advance (median of 10)
  tutorial  a per-item Dataset with ToTensor, SubsetRandomSampler and a DataLoader (one epoch)

and prints JSON: samples/s of each, and job/floor, loop/floor and job/tutorial as medians of
per-round ratios with their range (targets: job/floor >= 0.8, job/tutorial >= 5).

--publishing adds a second measurement: epochs of a few seconds (hidden layers 1024,1024), the
job run as users run it (checkpoints at most every 30 s), with a checkpoint and all reports
after every epoch (JOB_CHECKPOINT_MIN_SECONDS=0), and with none until the end; the ratios say
what publishing costs the training loop (target: the default within 2%).

  python scripts/bench_mlp.py [--data ../shared/data/mnist-t10k] [--rounds 5] [--publishing]
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from stage_dataset import from_idx, stage  # noqa: E402

from job import loop  # noqa: E402
from job.data import Data  # noqa: E402
from job.data import sources as data  # noqa: E402
from job.models import build_model  # noqa: E402
from job.optim import build_optimizer  # noqa: E402
from job.runtime import Runtime  # noqa: E402
from job.settings import Settings  # noqa: E402

EPOCHS = 10


def make_model(settings):
    torch.manual_seed(0)
    return build_model(settings, (1, 28, 28), 10)[0]


def run_job(data_dir: str, out: str, name: str, **settings) -> tuple[list[dict], float]:
    """`python -m job` as users run it; (history rows, process wall seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOB_")}
    env.update(
        {
            "JOB_DATA_URI": data_dir,
            "JOB_OUTPUT_URI": out,
            "JOB_RUN_NAME": name,
            "JOB_CACHE_DIR": os.path.join(out, "cache"),
            **{f"JOB_{k.upper()}": str(v) for k, v in settings.items()},
        }
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "job"], env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"the job failed (exit {result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    with open(os.path.join(out, name, "history.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()], wall


def steady(history: list[dict]) -> float:
    """Median train samples/s of epochs 2.. (epoch 1 pays one-time costs)."""
    return statistics.median(row["train_samples_per_second"] for row in history[1:])


def loop_epochs(settings, digits: Data, train_idx, val_idx) -> float:
    module = make_model(settings)
    model = loop.Model(module, module, head=str(len(module) - 1))
    state = loop.TrainState(build_optimizer(settings, module.parameters()), None, train_idx, val_idx)
    rt = Runtime(torch.device("cpu"), threads=torch.get_num_threads())
    rates = []
    for _ in range(EPOCHS):
        rates.append(loop.train_one_epoch(settings, rt, model, digits, state, ckpt=None)[2])
        state.progress = loop.Progress(epoch=state.progress.epoch + 1, global_step=state.progress.global_step)
    return statistics.median(rates[1:])


def floor_epochs(settings, x, y, train_idx) -> float:
    model = make_model(settings)
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr)
    rates = []
    for epoch in range(EPOCHS):
        order = data.epoch_order(train_idx, 0, epoch)
        batches = [(x[order[i : i + 100]], y[order[i : i + 100]]) for i in range(0, len(order), 100)]
        start = time.perf_counter()
        for xb, yb in batches:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(len(train_idx) / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def tutorial_epoch(settings, images, labels, train_idx) -> float:
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler
    from torchvision.transforms import ToTensor

    class MNISTItems(Dataset):  # what torchvision.datasets.MNIST does per item
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return ToTensor()(Image.fromarray(images[i], mode="L")), int(labels[i])

    loader = DataLoader(MNISTItems(), batch_size=100, sampler=SubsetRandomSampler(train_idx.tolist()))
    model = make_model(settings)
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr)
    start = time.perf_counter()
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return len(train_idx) / (time.perf_counter() - start)


def summarise(values: list[float], digits: int = 3) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def seed_recipe(args, arrays, data_dir: str, out: str) -> dict:
    images, labels = arrays["train_images"], arrays["train_labels"]
    settings = Settings(data_uri=data_dir, batch_size=100, lr=0.5, hidden_sizes=[32], lr_schedule="constant")
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255)
    y = torch.from_numpy(labels.astype(np.int64))
    train_idx, val_idx = data.split_indices(len(x), settings.val_fraction, settings.seed)
    digits = Data(data.TensorSource(x, y), None, [str(i) for i in range(10)], "bench")
    results: dict[str, list] = {"job": [], "job_wall_seconds": [], "loop": [], "floor": [], "tutorial": []}

    def job():
        history, wall = run_job(data_dir, out, f"r{len(results['job'])}")
        results["job"].append(steady(history))
        results["job_wall_seconds"].append(wall)

    methods = {
        "job": job,
        "loop": lambda: results["loop"].append(loop_epochs(settings, digits, train_idx, val_idx)),
        "floor": lambda: results["floor"].append(floor_epochs(settings, x, y, train_idx)),
        "tutorial": lambda: results["tutorial"].append(tutorial_epoch(settings, images, labels, train_idx)),
    }
    order = random.Random(0)
    for _ in range(args.rounds):  # interleaved: drift in machine load hits every method alike
        for name in order.sample(list(methods), len(methods)):
            methods[name]()

    def ratio(a, b):
        return summarise([p / q for p, q in zip(results[a], results[b], strict=True)])

    return {
        "recipe": "real MNIST t10k, 8,000 train / 2,000 val, mlp 784-32-10, sgd lr 0.5, batch 100, 10 epochs, 1 thread",
        "rounds": args.rounds,
        "train_samples_per_second": {
            k: round(statistics.median(results[k])) for k in ("job", "loop", "floor", "tutorial")
        },
        "job_wall_seconds": summarise(results["job_wall_seconds"], 2),
        "job_over_floor": ratio("job", "floor"),
        "loop_over_floor": ratio("loop", "floor"),
        "job_over_tutorial": ratio("job", "tutorial"),
        "targets": {"job_over_floor": ">= 0.8", "job_over_tutorial": ">= 5"},
    }


def publishing(args, data_dir: str, out: str) -> dict:
    """What checkpoints and reports cost the loop once epochs last a few seconds."""
    recipe = dict(hidden_sizes="1024,1024", epochs=6, lr_schedule="constant", keep_checkpoints=2)
    configs = {
        "default": {},
        "every_epoch": {"checkpoint_min_seconds": 0},
        "at_end_only": {"checkpoint_min_seconds": 86400},
    }
    rates: dict[str, list] = {k: [] for k in configs}
    epoch_seconds: list[float] = []
    order = random.Random(1)
    for r in range(args.rounds):
        for name in order.sample(list(configs), len(configs)):
            history, _ = run_job(data_dir, out, f"p-{name}-{r}", **recipe, **configs[name])
            rates[name].append(steady(history))
            epoch_seconds += [row["epoch_seconds"] for row in history[1:]]
    return {
        "recipe": "as above with hidden 1024,1024 and 6 epochs",
        "epoch_seconds_median": round(statistics.median(epoch_seconds), 2),
        "train_samples_per_second": {k: round(statistics.median(v)) for k, v in rates.items()},
        "default_over_at_end_only": summarise(
            [a / b for a, b in zip(rates["default"], rates["at_end_only"], strict=True)]
        ),
        "every_epoch_over_at_end_only": summarise(
            [a / b for a, b in zip(rates["every_epoch"], rates["at_end_only"], strict=True)]
        ),
        "target": "default_over_at_end_only >= 0.98",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "mnist-t10k"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--publishing", action="store_true", help="also measure what publishing costs few-second epochs"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    arrays = from_idx(args.data, t10k_as_train=True)
    with tempfile.TemporaryDirectory(prefix="bench-mlp-") as tmp:
        data_dir = os.path.join(tmp, "mnist")
        stage({k: v for k, v in arrays.items() if k.startswith("train")}, data_dir)
        result = {
            "data": os.path.abspath(args.data),
            "seed_recipe": seed_recipe(args, arrays, data_dir, os.path.join(tmp, "runs")),
        }
        if args.publishing:
            result["publishing"] = publishing(args, data_dir, os.path.join(tmp, "runs"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

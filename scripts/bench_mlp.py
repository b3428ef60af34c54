#!/usr/bin/env python
"""Training throughput of the MNIST MLP on CPU, three ways, in one process on the same data:

  tutorial  a per-item Dataset with ToTensor, SubsetRandomSampler and a DataLoader (batch 100)
  job       the job's own train_one_epoch (tensors in memory, batches gathered by index)
  floor     a bare forward/backward/step loop over batches prepared in advance

Prints JSON with samples/second for each (medians) and the ratios job/floor and job/tutorial
(targets: >= 0.8 and >= 5) as the median and quartiles of per-round ratios. Each round runs one
epoch of every method, in a new random order, since these machines are noisy.

  python scripts/bench_mlp.py [--data ../shared/data/mnist-t10k] [--epochs 25] [--threads 1]
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from job import checkpoint, data, train  # noqa: E402
from job.models import build_model  # noqa: E402
from job.optim import build_optimizer  # noqa: E402
from job.runtime import Runtime  # noqa: E402
from job.settings import Settings  # noqa: E402
from stage_dataset import from_idx  # noqa: E402


def make_model(settings):
    torch.manual_seed(0)
    return build_model(settings, (1, 28, 28), 10)[0]


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


def job_epoch(settings, tensors, train_idx, val_idx) -> float:
    model = make_model(settings)
    optimizer = build_optimizer(settings, model.parameters())
    runtime = Runtime(device=torch.device("cpu"), threads=torch.get_num_threads())
    job = train.Job(settings, runtime, "memory://bench", tensors, train_idx, val_idx, model, model, optimizer,
                    checkpoint.Uploader("memory://bench"))
    start = time.perf_counter()
    train.train_one_epoch(job)
    return len(train_idx) / (time.perf_counter() - start)


def floor_epoch(settings, tensors, train_idx) -> float:
    order = data.epoch_order(train_idx, 0, 0)
    batches = [(tensors.x[order[i:i + 100]], tensors.y[order[i:i + 100]]) for i in range(0, len(order), 100)]
    model = make_model(settings)
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr)
    start = time.perf_counter()
    for xb, yb in batches:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return len(train_idx) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist-t10k"))
    parser.add_argument("--epochs", type=int, default=25, help="rounds: one epoch of each method per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arrays = from_idx(args.data, t10k_as_train=True)
    images, labels = arrays["train_images"], arrays["train_labels"]
    settings = Settings(data_uri=args.data, batch_size=100, lr=0.5, hidden_sizes=[32], lr_schedule="constant")
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255)
    tensors = data.Data(x, torch.from_numpy(labels.astype(np.int64)), None, None, [str(i) for i in range(10)], "bench")
    train_idx, val_idx = data.split_indices(len(x), settings.val_fraction, settings.seed)

    methods = {
        "tutorial": lambda: tutorial_epoch(settings, images, labels, train_idx),
        "job": lambda: job_epoch(settings, tensors, train_idx, val_idx),
        "floor": lambda: floor_epoch(settings, tensors, train_idx),
    }
    results = {name: [] for name in methods}
    order = random.Random(0)
    for _ in range(args.epochs):
        # Interleaved, so drift in machine load hits all three alike, and in a new order each
        # round: whichever runs right after the tutorial (which churns ~100 MB of small
        # allocations) starts with colder caches.
        for name in order.sample(list(methods), len(methods)):
            results[name].append(methods[name]())
    median = {k: statistics.median(v) for k, v in results.items()}

    def ratio(a: str, b: str) -> dict:
        # Per round, a and b ran back to back: the ratio of a pair is less exposed to the
        # machine's drift than the ratio of two medians. Quartiles show how noisy the run was.
        per_round = sorted(x / y for x, y in zip(results[a], results[b]))
        q1, q2, q3 = statistics.quantiles(per_round, n=4)
        return {"median": round(q2, 3), "quartiles": [round(q1, 3), round(q3, 3)]}

    print(json.dumps({
        "data": os.path.abspath(args.data), "train_samples": len(train_idx), "threads": args.threads,
        "rounds": args.epochs, "batch_size": 100, "model": "mlp 784-32-10",
        "train_samples_per_second": {k: round(v) for k, v in median.items()},
        "job_over_floor": ratio("job", "floor"),
        "job_over_tutorial": ratio("job", "tutorial"),
        "targets": {"job_over_floor": ">= 0.8", "job_over_tutorial": ">= 5"},
    }, indent=2))

if __name__ == "__main__":
    main()

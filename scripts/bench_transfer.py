#!/usr/bin/env python
"""Transfer learning with a frozen backbone on CPU: the tutorial's way against the job's feature
cache, in one process on the same generated images, same model, same head optimiser.

  tutorial  every epoch: the full resnet forward over per-item transforms in a DataLoader,
            backward through the head only (backbone frozen), then validation the same way
  job       epoch 1 computes the backbone features once (the job's own features module), then
            every epoch trains and validates the head on them (the job's train_one_epoch/evaluate)

Prints JSON with seconds per epoch and the ratios (targets: epochs 2..N >= 10x faster than the
tutorial's, epoch 1 no slower than 1.1x).

  python scripts/bench_transfer.py [--images-per-class 100] [--image-size 64] [--epochs 5]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from stage_dataset import synthetic_images  # noqa: E402

from job import loop, models, run  # noqa: E402
from job.data import Data  # noqa: E402
from job.data.dataset import load_images  # noqa: E402
from job.data.sources import FileSource  # noqa: E402
from job.runtime import Runtime  # noqa: E402
from job.settings import Settings  # noqa: E402


class ByIndex(torch.utils.data.Dataset):
    """The tutorial's dataset[i]: our items take (i, augmentation seed)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[(i, i)]


def tutorial(settings, dataset: Data, epochs: int) -> list[float]:
    torch.manual_seed(0)
    model, head = models.build_model(settings, (3, settings.image_size, settings.image_size), dataset.num_classes)
    models.freeze(model, head, "all")
    optimizer = torch.optim.Adam(model.get_submodule(head).parameters(), lr=settings.lr)
    assert dataset.split is not None and isinstance(dataset.samples, FileSource)  # train/ and valid/ folders
    train_idx, val_idx = dataset.split
    items = dataset.samples.items
    train_loader = torch.utils.data.DataLoader(
        ByIndex(items.loader(True, 1, 0, False)[0].dataset),
        batch_size=settings.batch_size,
        sampler=torch.utils.data.SubsetRandomSampler(train_idx.tolist()),
    )
    val_loader = torch.utils.data.DataLoader(
        ByIndex(items.loader(False, 1, 0, False)[0].dataset), batch_size=settings.batch_size, sampler=val_idx.tolist()
    )
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for x, y in val_loader:
                F.cross_entropy(model(x), y)
        seconds.append(time.perf_counter() - start)
    return seconds


def job_way(settings, dataset: Data, epochs: int, run_uri: str) -> list[float]:
    torch.manual_seed(0)
    runtime = Runtime(torch.device("cpu"), threads=torch.get_num_threads())
    start = time.perf_counter()
    model, features, state, _ = run.prepare(settings, runtime, run_uri, dataset, None, start)  # computes the features
    seconds = []
    for _ in range(epochs):
        loop.train_one_epoch(settings, runtime, model, features, state, ckpt=None)
        loop.evaluate(settings, runtime, model, features.samples, state.val_idx, features.num_classes)
        state.progress = loop.Progress(epoch=state.progress.epoch + 1, global_step=state.progress.global_step)
        seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-class", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_images(os.path.join(tmp, "data"), args.images_per_class, size=args.image_size * 2)
        settings = Settings(
            data_uri=os.path.join(tmp, "data"),
            output_uri=os.path.join(tmp, "runs"),
            model="resnet18",
            image_size=args.image_size,
            freeze="all",
            optimizer="adam",
            lr=0.001,
            batch_size=32,
            num_workers=0,
            epochs=args.epochs,
            cache_dir=os.path.join(tmp, "cache"),
        )
        runtime = Runtime(torch.device("cpu"), threads=args.threads)
        dataset = load_images(os.path.join(tmp, "data"), settings, runtime, normalize=True)
        assert dataset.split is not None  # the generated tree has train/ and valid/
        train_images, val_images = len(dataset.split[0]), len(dataset.split[1])
        tutorial_s = tutorial(settings, dataset, args.epochs)
        job_s = job_way(settings, dataset, args.epochs, os.path.join(tmp, "runs", "bench"))

    def later(s):
        return statistics.median(s[1:])

    print(
        json.dumps(
            {
                "model": "resnet18 (frozen backbone)",
                "image_size": args.image_size,
                "threads": args.threads,
                "train_images": train_images,
                "val_images": val_images,
                "epochs": args.epochs,
                "epoch_seconds": {"tutorial": [round(s, 3) for s in tutorial_s], "job": [round(s, 3) for s in job_s]},
                "epoch1_job_over_tutorial": round(job_s[0] / tutorial_s[0], 3),
                "later_epochs_speedup": round(later(tutorial_s) / later(job_s), 1),
                "targets": {"epoch1_job_over_tutorial": "<= 1.1", "later_epochs_speedup": ">= 10"},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

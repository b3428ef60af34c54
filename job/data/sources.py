"""Data sources: "this rank's batches, in this order, on the device", whatever holds the samples.

A source is asked for an epoch's order and for batches of given sample indices, and the loop
never looks inside it. Three implement it: samples held as tensors (MNIST-format data, cached
backbone features), gathered by index with no per-item work; image files decoded by DataLoader
workers; and shards streamed from object storage (job.data.stream). Also here: the seeded train/val
split, the default epoch order and each rank's share of it.
"""

import math
import multiprocessing
from typing import Iterable, Iterator, Protocol

import torch
from torch.utils.data import DataLoader

from job.data.augment import sample_seed
from job.errors import DataError

GATHER_BYTES = 2 << 20  # gather this much at a time: one op for several batches, and the chunk stays in cache
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


class Source(Protocol):
    labels: torch.Tensor  # int64, one per sample, on the CPU or the device
    sample_shape: tuple[int, ...]  # one model input
    in_memory: bool  # True when a sample costs nothing to read again (no decode per epoch)
    eval_batch_size: int | None  # evaluation batch size (None: the training one)

    def __len__(self) -> int: ...

    def order(self, indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        """`indices` in this epoch's training order, a function of (seed, epoch) alone."""

    def batches(self, indices: torch.Tensor, batch_size: int, train: bool, epoch: int = 0) -> Batches:
        """(x, y) on the device for the samples `indices`, in that order; `train` selects the
        training transform where there is one (its randomness may depend on the epoch)."""


class TensorSource:
    """Samples held as tensors on the device (images as float in [0, 1], (N, C, H, W)); batches
    are gathered by index: no per-item Dataset, no host-to-device copy per step."""

    in_memory = True
    eval_batch_size: int | None = 1000  # evaluation keeps no activations for backward, so bigger batches are free

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.labels = x, y
        self.sample_shape: tuple[int, ...] = tuple(x.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def order(self, indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        return epoch_order(indices, seed, epoch)

    def batches(self, indices: torch.Tensor, batch_size: int, train: bool, epoch: int = 0) -> Batches:
        return index_batches(self.x, self.labels, indices.to(self.x.device), batch_size)


class FileSource:
    """Image files, decoded and transformed by a DataLoader's worker processes (one loader per
    kind of read, its workers alive for a pass), copied to the device from pinned memory on CUDA."""

    in_memory = False
    eval_batch_size: int | None = None  # decoded images cost memory per item: keep the training batch size

    def __init__(self, items, image_size: int, workers: int, device: torch.device, seed: int = 0):
        self.items, self.workers, self.device, self.seed = items, workers, device, seed
        self.labels = torch.tensor([y for _, y in items.items], dtype=torch.int64)
        self.sample_shape: tuple[int, ...] = (3, image_size, image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def order(self, indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        return epoch_order(indices, seed, epoch)

    def batches(self, indices: torch.Tensor, batch_size: int, train: bool, epoch: int = 0) -> Batches:
        loader, sampler = self.items.loader(train, batch_size, self.workers, pin_memory=self.device.type == "cuda")
        sampler.give([(i, sample_seed(self.seed, epoch, i)) for i in indices.tolist()], len(indices))
        for xb, yb in loader:
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)


def index_batches(x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int) -> Batches:
    """Yield (x, y) batches in `order`.

    Rows are gathered a chunk of batches at a time into one buffer reused for every chunk, so a
    yielded x is valid until the next batch is asked for (each step is done with it by then).
    On CPU the gather is a memory copy that costs the MNIST MLP ~12% of a bare loop's throughput
    (scripts/bench_mlp.py); fresh chunks cost ~4% more (page faults), as did per-batch gathers.
    """
    rows = x.view(len(x), -1)  # index_select on 2-D rows is ~2x faster than on (N, C, H, W)
    row_bytes = rows.shape[1] * rows.element_size()
    chunk = max(1, GATHER_BYTES // (row_bytes * batch_size)) * batch_size
    buffer = rows.new_empty((min(chunk, len(order)), rows.shape[1]))
    for lo in range(0, len(order), chunk):
        idx = order[lo:lo + chunk]
        xc = torch.index_select(rows, 0, idx, out=buffer[:len(idx)]).view(len(idx), *x.shape[1:])
        yc = y.index_select(0, idx)  # fresh: callers may keep targets past the next chunk
        yield from zip(xc.split(batch_size), yc.split(batch_size), strict=True)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (train, val) split of range(n) as in the tutorial's split_indices, but seeded."""
    n_val = int(val_fraction * n)
    if n_val < 1 or n - n_val < 1:
        raise DataError(f"JOB_VAL_FRACTION={val_fraction} leaves an empty split of {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def epoch_order(train_idx: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The training indices in this epoch's order: a fresh shuffle per epoch that depends only on
    (seed, epoch), so a resumed run replays exactly the order an uninterrupted run would use."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return train_idx[torch.randperm(len(train_idx), generator=g)]


def shard(order: torch.Tensor, batch_size: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of `order`, such that step k of every rank takes the k-th block of
    batch_size * world_size samples, split into disjoint batches. A short last block is padded by
    wrapping around (as DistributedSampler does) so every rank takes the same number of steps."""
    if world_size == 1:
        return order
    block = batch_size * world_size
    full = len(order) // block * block
    head = order[:full].view(-1, world_size, batch_size)[:, rank].reshape(-1)
    tail = order[full:]
    if len(tail):
        per = math.ceil(len(tail) / world_size)
        tail = torch.cat([tail, order[:per * world_size - len(tail)]]).view(world_size, per)[rank]
    return torch.cat([head, tail])


class Feed(torch.utils.data.Sampler):
    """A DataLoader's sampler that yields whatever it was last given (indices, or items of known
    length): one DataLoader serves every epoch's freshly shuffled and sharded order."""

    def __init__(self):
        self.items: Iterable = ()
        self.length = 0

    def give(self, items: Iterable, length: int) -> None:
        self.items, self.length = items, length

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return self.length


# What a DataLoader worker imports to unpickle its dataset and collate function (torch with them),
# imported once by the forkserver, which every worker is then forked from.
WORKER_MODULES = ["job.data.images", "job.data.stream"]


def fed_loader(dataset, batch_size: int, workers: int, pin_memory: bool, collate_fn=None) -> tuple[DataLoader, Feed]:
    """A DataLoader that reads what its Feed is given, in that order (the caller shuffles and
    shards). Workers start with forkserver: fsspec's event loop is not fork-safe (fsspec/s3fs#914).

    Workers live for one pass and end with it, so one worker set is alive at a time. Persistent
    ones kept a set per loader alive all run long (train, val, test, the feature pass: four sets of
    ~0.38 GB processes on a GPU node). A new set is cheap because the forkserver has imported what
    workers need: measured with 2 workers on our 2 cores, a worker's first batch in 0.07 s with
    10 MB of its own memory, against 3.5 s and 290 MB for a worker that imports torch itself.
    What remains per pass is sending each worker the dataset: seconds for an image folder of a
    million files (its list of paths), against minutes of reading them."""
    feed = Feed()
    context = None
    if workers:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(WORKER_MODULES)  # read when the forkserver starts, at the first worker
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=feed,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=False,
        multiprocessing_context=context,
    ), feed

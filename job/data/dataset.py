"""The front door for training and --check: find and validate what JOB_DATA_URI points at and
load it as data sources (job.data.sources).

A sharded dataset (its index.json) is streamed through a bounded cache; MNIST-format data (IDX
files) is small enough to live as tensors on the device; an image folder is pulled into the local
mirror, checked file by file and read through DataLoader workers.
"""

import hashlib
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from job import storage
from job.data import idx, images, layout, mirror
from job.data.cache import ShardCache, cache_folder
from job.data.index import INDEX, find_index, split_shards
from job.data.sources import FileSource, Source, TensorSource
from job.data.stream import ShardSource
from job.errors import DataError

log = logging.getLogger("job")

@dataclass
class Data:
    """A dataset, validated: the samples to train and validate on (split by index), the test
    samples if any, and what identifies them."""

    samples: Source
    test: Source | None
    class_names: list[str]
    fingerprint: str  # sha256 over the data files' names and contents
    split: tuple[torch.Tensor, torch.Tensor] | None = None  # (train, val) when the layout defines it
    bad_files: list = field(default_factory=list)  # (file, reason) skipped before training
    files: int = 0  # files found, bad ones included

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def file_digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


def fingerprint(paths: list[str], digests: dict[str, bytes] | None = None, names: dict[str, str] | None = None) -> str:
    """sha256 over the files' names (default: folder/file) and contents; `digests` holds per-file
    sha256s already computed (the image scan reads every file once anyway)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        name = names[path] if names else os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
        content = digests[path] if digests is not None else file_digest(path)
        digest.update(os.fsencode(name) + b"\0" + content)  # a name's own bytes, UTF-8 or not
    return digest.hexdigest()


def load_mnist(root: str, device: torch.device, max_bytes: int) -> Data:
    train = idx.read_split(root, "train", True, max_bytes)
    assert train is not None  # required: read_split raised otherwise
    test = idx.read_split(root, "test", False, max_bytes)
    num_classes = idx.num_classes(train, test)

    def source(images, labels):
        # One copy to the device, then float in [0, 1] as torchvision's ToTensor gives.
        x = torch.from_numpy(images.copy()).to(device).unsqueeze(1).float().div_(255)
        return TensorSource(x, torch.from_numpy(labels.astype(np.int64)).to(device))

    files = train[2] + (test[2] if test else [])
    return Data(
        source(train[0], train[1]),
        source(test[0], test[1]) if test else None,
        [str(i) for i in range(num_classes)],
        fingerprint(files),
    )


def load_images(root: str, settings, runtime, normalize: bool) -> Data:
    """An image-folder dataset, checked file by file (bad files are skipped and named, by rank 0
    alone). Messages name JOB_DATA_URI, never the local mirror `root`."""
    shown = storage.redact_uri(settings.data_uri).rstrip("/")
    found = images.scan(
        root,
        threads=runtime.scan_threads,
        max_bytes=settings.max_file_bytes,
        max_pixels=settings.max_image_pixels,
        log_every=settings.log_every_seconds,
        shown=shown,
        name_bad=runtime.is_main,
    )
    bad_fraction = len(found["bad"]) / max(found["files"], 1)
    if bad_fraction > settings.max_bad_fraction:
        first, why = found["bad"][0]
        raise DataError(
            f"{len(found['bad'])} of {found['files']} files in {shown} are not readable images "
            f"({bad_fraction:.1%} > JOB_MAX_BAD_FRACTION={settings.max_bad_fraction}); first: "
            f"{images.user_name(shown, first)}: {why}"
        )
    if not found["train"]:
        raise DataError(f"no readable image in {shown}/train")
    transform = images.ImageTransform(settings.image_size, settings.augment, normalize)
    items = found["train"] + (found["val"] or [])
    split = None
    if found["val"] is not None:  # the layout's own validation folder
        n = len(found["train"])
        split = (torch.arange(n), torch.arange(n, len(items)))
    test = found["test"]

    def source(pairs) -> FileSource:
        decoded = images.ImageItems(pairs, transform, max_pixels=settings.max_image_pixels)
        return FileSource(decoded, settings.image_size, runtime.workers, runtime.device, settings.seed)

    return Data(
        source(items),
        source(test) if test else None,
        found["classes"],
        fingerprint([p for p, _ in items + (test or [])], found["digests"], found["names"]),
        split,
        found["bad"],
        found["files"],
    )


def load(settings, runtime, normalize: bool = False, include=None) -> Data:
    """A sharded dataset (its index.json) is streamed; any other is pulled (or the files
    `include` selects: a smoke run's sample, which takes one shard per split of a sharded one)
    into the local cache and loaded. Every problem is a DataError (exit 3), but a file given
    as JOB_DATA_URI: a setting to fix (exit 2)."""
    with storage.errors(settings.data_uri, DataError, "read dataset"):
        layout.refuse_file(settings.data_uri, "JOB_DATA_URI")
        index = find_index(settings.data_uri)
        if index is not None:
            return load_shards(settings, runtime, index, normalize, limit=1 if include else 0)
        root = mirror.pull(settings.data_uri, settings.cache_dir, include)
    names = sorted(n for n in os.listdir(root) if not n.startswith("."))
    found = layout.kind_of(names)
    if settings.data_format not in ("auto", found or settings.data_format):
        raise DataError(f"{storage.redact_uri(settings.data_uri)} holds {found} data, not "
                        f"JOB_DATA_FORMAT={settings.data_format}; set JOB_DATA_FORMAT=auto or {found}")
    fmt = layout.detect(names, settings.data_uri) if settings.data_format == "auto" else settings.data_format
    if fmt == "imagefolder":
        return load_images(root, settings, runtime, normalize)
    return load_mnist(root, runtime.device, settings.max_file_bytes)


def load_shards(settings, runtime, index: dict, normalize: bool, limit: int = 0) -> Data:
    """A sharded dataset from its index alone (no listing, no scan, no hash: start-up does not
    grow with the dataset): train and val shards as one source, test shards as another, one
    bounded cache for all."""
    uri = settings.data_uri
    train, val, test = (split_shards(index, split, limit) for split in ("train", "val", "test"))
    if not train or not val:
        raise DataError(f"{storage.redact_uri(uri)}/{INDEX} lists no train or no val shards")
    samples, test_source = shard_sources(settings, runtime, index, [train + val, test], normalize)
    n_train, n_val = (sum(s["samples"] for s in parts) for parts in (train, val))
    log.info(
        f"sharded dataset {storage.redact_uri(uri)}: {len(train) + len(val) + len(test)} shards, streamed through "
        f"at most {settings.shard_cache_bytes / 1e6:,.1f} MB of local cache"
    )
    return Data(
        samples,
        test_source,
        index["class_names"],
        index["fingerprint"],
        (torch.arange(n_train), torch.arange(n_train, n_train + n_val)),
        [tuple(b) for b in index["bad_files"]],
        index["files"],
    )


def shard_sources(settings, runtime, index: dict, parts: list[list[dict]], normalize: bool) -> list:
    """A ShardSource (None for no shards) over each list of `parts`, of the dataset at
    JOB_DATA_URI, all through one bounded cache."""
    uri = settings.data_uri
    every = [s for part in parts for s in part]
    cache = ShardCache(uri, cache_folder(settings, uri, runtime.local_rank), settings.shard_cache_bytes, every,
                       len(index["class_names"]))
    return [
        ShardSource(part, cache, index["kind"], settings.image_size, normalize, runtime.workers, runtime.device,
                    settings.seed, settings.max_image_pixels, settings.augment, settings.decode) if part else None
        for part in parts
    ]

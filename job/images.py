"""Photos laid out as class folders: scan, check, transform and load them.

<root>/train/<class>/*  and optionally  <root>/valid/<class>/* (or val/)  and  <root>/test/<class>/*
Class names are the sorted folder names of train/. Every file is decoded once before training:
corrupt, truncated or non-image files are skipped and named, and too many of them fail the job.
"""

import hashlib
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from job.errors import DataError

log = logging.getLogger("job")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VAL_DIRS = ("valid", "val")


class ImageItems(Dataset):
    """(path, label) pairs read as RGB images through a transform. Grayscale, CMYK, palette and
    RGBA images are converted, not rejected."""

    def __init__(self, items: list[tuple[str, int]], train_transform, eval_transform, train: bool = False):
        self.items, self.train_transform, self.eval_transform, self.train = items, train_transform, eval_transform, train
        self._loaders = {}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        with Image.open(path) as img:
            transform = self.train_transform if self.train else self.eval_transform
            return transform(img.convert("RGB")), label

    def loader(self, train: bool, batch_size: int, workers: int, pin_memory: bool):
        """The (DataLoader, sampler) for training or evaluation reads, made once and kept."""
        key = (train, batch_size)
        if key not in self._loaders:
            view = ImageItems(self.items, self.train_transform, self.eval_transform, train)
            self._loaders[key] = loader(view, batch_size, workers, pin_memory)
        return self._loaders[key]


def transforms(image_size: int, augment: bool, normalize: bool):
    """(train, eval) transforms as in the flowers tutorial: resize + centre crop for evaluation;
    random rotation (20 degrees), random resized crop and flip for training when augmenting.
    Normalised with ImageNet's mean/std, the statistics torchvision's pretrained weights expect."""
    tail = [T.ToTensor()] + ([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize else [])
    eval_t = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), *tail])
    if not augment:
        return eval_t, eval_t
    train_t = T.Compose([T.RandomRotation(20), T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *tail])
    return train_t, eval_t


def _class_dirs(root: str, split: str) -> dict[str, list[str]]:
    folder = os.path.join(root, split)
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    return {c: sorted(os.path.join(folder, c, f) for f in os.listdir(os.path.join(folder, c))
                      if not f.startswith(".")) for c in classes}


def _check(path: str) -> tuple[str | None, bytes]:
    """(None if the file decodes as an image, else why not; the file's sha256), from one read."""
    with open(path, "rb") as f:
        blob = f.read()
    digest = hashlib.sha256(blob).digest()
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()  # a full decode: verify() misses truncated JPEGs
        return None, digest
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"{exc.__class__.__name__}: {str(exc)[:120]}", digest


def scan(root: str, threads: int) -> dict:
    """Find the splits and their images, decode each once, and sort out the bad ones.

    Returns {"classes", "train", "val" (or None), "test" (or None), "bad", "files", "digests"};
    each split is a list of (path, label); digests maps each path to its sha256. Raises DataError for a layout that cannot be trained on."""
    train_dirs = _class_dirs(root, "train")
    classes = list(train_dirs)
    if len(classes) < 2:
        raise DataError(f"{root}/train holds {len(classes)} class folder(s); a classifier needs at least 2")
    empty = [c for c, files in train_dirs.items() if not files]
    if empty:
        raise DataError(f"empty class folder(s) in {root}/train: {', '.join(empty)}; add images or remove the folder")
    splits = {"train": train_dirs}
    for name, key in [(d, "val") for d in VAL_DIRS] + [("test", "test")]:
        if key not in splits and os.path.isdir(os.path.join(root, name)):
            found = _class_dirs(root, name)
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise DataError(f"{root}/{name} has classes that train/ lacks: {', '.join(unknown[:10])}")
            splits[key] = found
    items = {k: [(p, classes.index(c)) for c, files in v.items() for p in files] for k, v in splits.items()}
    every = [p for split in items.values() for p, _ in split]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # PIL decodes without the GIL
        checked = dict(zip(every, pool.map(_check, every), strict=True))
    reasons = {p: reason for p, (reason, _) in checked.items()}
    bad = [(p, r) for p, r in reasons.items() if r]
    for path, reason in bad:
        log.warning(f"skipping {os.path.relpath(path, root)}: {reason}")
    good = {k: [(p, y) for p, y in v if not reasons[p]] for k, v in items.items()}
    return {"classes": classes, "train": good["train"], "val": good.get("val"), "test": good.get("test"),
            "bad": [(os.path.relpath(p, root), r) for p, r in bad], "files": len(every),
            "digests": {p: digest for p, (_, digest) in checked.items()}}


class IndexSampler(torch.utils.data.Sampler):
    """Yields whatever indices it was last given: one DataLoader (and its persistent workers)
    serves every epoch's freshly shuffled and sharded order."""

    def __init__(self):
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def loader(dataset: ImageItems, batch_size: int, workers: int, pin_memory: bool) -> tuple[DataLoader, IndexSampler]:
    """A DataLoader that reads the indices its sampler holds, in that order (the caller shuffles
    and shards). Workers persist across epochs and start with forkserver: fsspec's event loop is
    not fork-safe (fsspec/s3fs#914)."""
    sampler = IndexSampler()
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      multiprocessing_context="forkserver" if workers else None), sampler

"""Datasets: find and validate what the job was pointed at, and hold small ones as tensors.

MNIST-format data (four IDX files, gzip or raw) is small enough to live as tensors on the
device: batches are taken by index, with no per-item Dataset/DataLoader on the hot path.
"""

import gzip
import hashlib
import math
import os
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from job import images, storage
from job.errors import DataError

# role -> file stem; each may be stored raw or with .gz
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08  # the IDX type code for unsigned bytes, the only one MNIST uses


@dataclass
class Data:
    """A dataset: `x` is either a tensor held in memory (images as float in [0, 1], shape
    (N, C, H, W), batched by index: the fast path) or image files read through a DataLoader.
    Labels are int64 tensors."""

    x: "torch.Tensor | images.ImageItems"
    y: torch.Tensor
    test_x: "torch.Tensor | images.ImageItems | None"
    test_y: torch.Tensor | None
    class_names: list[str]
    fingerprint: str  # sha256 over the data files' names and contents
    split: tuple[torch.Tensor, torch.Tensor] | None = None  # (train, val) when the layout defines it
    bad_files: list = field(default_factory=list)  # (file, reason) skipped before training
    files: int = 0  # files found, bad ones included

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def input_shape(self, image_size: int) -> tuple[int, ...]:
        """The shape of one model input: a tensor row, or an RGB crop of image_size."""
        return tuple(self.x.shape[1:]) if isinstance(self.x, torch.Tensor) else (3, image_size, image_size)


def _find(root: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def detect_format(root: str) -> str:
    if _find(root, MNIST_FILES["train_images"]):
        return "mnist"
    if os.path.isdir(os.path.join(root, "train")):
        return "imagefolder"
    raise DataError(f"no dataset found in {root}: expected {MNIST_FILES['train_images']}[.gz] "
                    "(MNIST format) or a train/ folder of class folders; check JOB_DATA_URI")


def read_idx(path: str, ndim: int, max_bytes: int) -> np.ndarray:
    """Read one IDX file, checking the magic number and that the payload matches the header.
    At most max_bytes are decompressed: a gzip bomb is refused, not unpacked into memory."""
    name = os.path.basename(path)
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{name}: cannot read ({exc.__class__.__name__}: {exc}); the file is corrupt or truncated") from None
    if len(raw) > max_bytes:
        raise DataError(f"{name}: larger than JOB_MAX_FILE_BYTES={max_bytes} once decompressed; raise the limit if "
                        "the dataset really is this large")
    if len(raw) < 4 + 4 * ndim or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number)")
    if raw[2] != IDX_UBYTE or raw[3] != ndim:
        raise DataError(f"{name}: bad magic number 0x{raw[:4].hex()}; expected 0x0000{IDX_UBYTE:02x}{ndim:02x} "
                        f"(unsigned bytes, {ndim} dimensions)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(f"{name}: header says {dims} ({expected} bytes) but the file holds {len(raw) - offset}; "
                        "the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _read_pair(root: str, images_stem: str, labels_stem: str, required: bool, max_bytes: int):
    images_path, labels_path = _find(root, images_stem), _find(root, labels_stem)
    if not images_path and not labels_path and not required:
        return None
    for stem, path in ((images_stem, images_path), (labels_stem, labels_path)):
        if not path:
            raise DataError(f"{stem}[.gz] is missing from the dataset at {root}")
    images, labels = read_idx(images_path, 3, max_bytes), read_idx(labels_path, 1, max_bytes)
    if len(images) != len(labels):
        raise DataError(f"{os.path.basename(images_path)} holds {len(images)} images but "
                        f"{os.path.basename(labels_path)} holds {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"{os.path.basename(images_path)} holds no images")
    return images, labels, [images_path, labels_path]


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
    train = _read_pair(root, MNIST_FILES["train_images"], MNIST_FILES["train_labels"], True, max_bytes)
    test = _read_pair(root, MNIST_FILES["test_images"], MNIST_FILES["test_labels"], False, max_bytes)
    num_classes = int(train[1].max()) + 1
    absent = sorted(set(range(num_classes)) - set(np.unique(train[1]).tolist()))
    if absent:  # classes are 0..max label; one with no training example cannot be learned
        shown = ", ".join(map(str, absent[:10])) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
        raise DataError(f"{os.path.basename(train[2][1])}: labels run from 0 to {num_classes - 1} but {len(absent)} of them "
                        f"have no training example ({shown}); labels must be 0..N-1 with every class present")
    if test is not None and int(test[1].max()) >= num_classes:
        raise DataError(f"{os.path.basename(test[2][1])} has label {int(test[1].max())}, "
                        f"outside the {num_classes} classes of the training labels")

    def tensors(images, labels):
        # One copy to the device, then float in [0, 1] as torchvision's ToTensor gives.
        x = torch.from_numpy(images.copy()).to(device).unsqueeze(1).float().div_(255)
        return x, torch.from_numpy(labels.astype(np.int64)).to(device)

    x, y = tensors(train[0], train[1])
    test_x, test_y = tensors(test[0], test[1]) if test else (None, None)
    files = train[2] + (test[2] if test else [])
    return Data(x, y, test_x, test_y, [str(i) for i in range(num_classes)], fingerprint(files))


def load_images(root: str, settings, normalize: bool) -> Data:
    """An image-folder dataset, checked file by file (bad files are skipped and named)."""
    found = images.scan(root, threads=max(1, settings.num_workers or 4), max_bytes=settings.max_file_bytes,
                        max_pixels=settings.max_image_pixels)
    bad_fraction = len(found["bad"]) / max(found["files"], 1)
    if bad_fraction > settings.max_bad_fraction:
        raise DataError(f"{len(found['bad'])} of {found['files']} files in {root} are not readable images "
                        f"({bad_fraction:.1%} > JOB_MAX_BAD_FRACTION={settings.max_bad_fraction}); first: "
                        f"{found['bad'][0][0]!r} ({found['bad'][0][1]})")
    if not found["train"]:
        raise DataError(f"no readable image in {root}/train")
    train_t, eval_t = images.transforms(settings.image_size, settings.augment, normalize)
    items = found["train"] + (found["val"] or [])
    split = None
    if found["val"] is not None:  # the layout's own validation folder
        n = len(found["train"])
        split = (torch.arange(n), torch.arange(n, len(items)))
    labels = lambda pairs: torch.tensor([y for _, y in pairs], dtype=torch.int64)
    test = found["test"]
    items_of = lambda pairs: images.ImageItems(pairs, train_t, eval_t, max_pixels=settings.max_image_pixels)
    return Data(
        items_of(items), labels(items), items_of(test) if test else None, labels(test) if test else None,
        found["classes"], fingerprint([p for p, _ in items + (test or [])], found["digests"], found["names"]),
        split, found["bad"], found["files"])


def load(settings, device: torch.device, normalize: bool = False, include=None) -> Data:
    """Pull the dataset (or the files `include` selects) into the local cache and load it; every
    problem is a DataError (exit 3)."""
    with storage.errors(settings.data_uri, DataError, "read dataset"):
        root = storage.pull(settings.data_uri, settings.cache_dir, include)
    fmt = detect_format(root) if settings.data_format == "auto" else settings.data_format
    if fmt == "imagefolder":
        return load_images(root, settings, normalize)
    return load_mnist(root, device, settings.max_file_bytes)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (train, val) split of range(n) as in the tutorial's split_indices, but seeded."""
    n_val = int(val_fraction * n)
    if n_val < 1 or n - n_val < 1:
        raise DataError(f"JOB_VAL_FRACTION={val_fraction} leaves an empty split of {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


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


def epoch_order(train_idx: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The training indices in this epoch's order: a fresh shuffle per epoch that depends only on
    (seed, epoch), so a resumed run replays exactly the order an uninterrupted run would use."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return train_idx[torch.randperm(len(train_idx), generator=g)]


def check(uri: str, data_format: str) -> str:
    """Reach the dataset without pulling it: list its top level and recognise the format."""
    names = storage.list_names(uri)
    if not names:
        raise FileNotFoundError(uri)
    found = "mnist" if any(n.startswith(MNIST_FILES["train_images"]) for n in names) else (
        "imagefolder" if "train" in names else None)
    if found is None or data_format not in ("auto", found):
        expected = data_format if data_format != "auto" else "mnist or imagefolder"
        raise DataError(f"{uri} does not look like {expected} data (found {', '.join(names[:5])}); check JOB_DATA_URI")
    return found


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (the inverse of read_idx)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def batches(x, y: torch.Tensor, indices: torch.Tensor, batch_size: int, train: bool, settings, device: torch.device):
    """(x, y) batches on the device, in the order of `indices`: gathered from memory for tensors,
    read through the dataset's DataLoader for files."""
    if isinstance(x, torch.Tensor):
        yield from index_batches(x, y, indices, batch_size)
        return
    workers = settings.num_workers if settings.num_workers is not None else min(4, max(0, os.cpu_count() - 1))
    loader, sampler = x.loader(train, batch_size, workers, pin_memory=device.type == "cuda")
    sampler.indices = indices.tolist()
    for xb, yb in loader:
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


GATHER_BYTES = 2 << 20  # gather this much at a time: one op for several batches, and the chunk stays in cache


def index_batches(x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int):
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
        yield from zip(xc.split(batch_size), yc.split(batch_size))

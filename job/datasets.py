"""Datasets: find and validate what the job was pointed at, and load it as data sources.

MNIST-format data (four IDX files, gzip or raw) is small enough to live as tensors on the device;
image folders are checked file by file and read through DataLoader workers (job.data's sources).
"""

import gzip
import hashlib
import io
import logging
import os
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from job import images, shards, storage
from job.data import FileSource, Source, TensorSource
from job.errors import DataError

log = logging.getLogger("job")

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


def _find(root: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


SPLIT_DIRS = ("train", "valid", "val", "test")


def detect_format(names: list[str], uri: str) -> str:
    """mnist or imagefolder, from the names at the top of the dataset; a clear error naming the
    URI (and its parent, when it points one level too deep into an image folder) otherwise."""
    if any(n.startswith(MNIST_FILES["train_images"]) for n in names):
        return "mnist"
    if "train" in names:
        return "imagefolder"
    shown = storage.redact_uri(uri)
    hint = "; check JOB_DATA_URI"
    last = uri.rstrip("/").rsplit("/", 1)[-1]
    if last in SPLIT_DIRS:
        hint = (f"; it looks like one split of an image folder: did you mean JOB_DATA_URI="
                f"{storage.redact_uri(uri.rstrip('/').rsplit('/', 1)[0])} (the folder holding train/)?")
    found = (
        f" (found {', '.join(repr(n) for n in names[:5])}{' ...' if len(names) > 5 else ''})"
        if names
        else " (it is empty)"
    )
    raise DataError(
        f"no dataset found at {shown}{found}: expected {MNIST_FILES['train_images']}[.gz] "
        f"(MNIST format) or a train/ folder of class folders{hint}"
    )


def read_idx(path: str, ndim: int, max_bytes: int) -> np.ndarray:
    """Read one IDX file, checking the magic number and that the payload matches the header.
    At most max_bytes are decompressed: a gzip bomb is refused, not unpacked into memory."""
    name = os.path.basename(path)
    try:
        raw, reason = images.read_regular(path, max_bytes)  # a FIFO or a link to a device is refused
        if raw is None:
            raise DataError(f"{name}: {reason}")
        if path.endswith(".gz"):
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as g:
                raw = g.read(max_bytes + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{name}: cannot read ({exc.__class__.__name__}: {exc}); the file is corrupt or truncated"
        ) from None
    if len(raw) > max_bytes:
        raise DataError(
            f"{name}: larger than JOB_MAX_FILE_BYTES={max_bytes} once decompressed; raise the limit if "
            "the dataset really is this large"
        )
    if len(raw) < 4 + 4 * ndim or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number)")
    if raw[2] != IDX_UBYTE or raw[3] != ndim:
        raise DataError(
            f"{name}: bad magic number 0x{raw[:4].hex()}; expected 0x0000{IDX_UBYTE:02x}{ndim:02x} "
            f"(unsigned bytes, {ndim} dimensions)"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(
            f"{name}: header says {dims} ({expected} bytes) but the file holds {len(raw) - offset}; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _read_pair(root: str, images_stem: str, labels_stem: str, required: bool, max_bytes: int):
    images_path, labels_path = _find(root, images_stem), _find(root, labels_stem)
    if not images_path and not labels_path and not required:
        return None
    for stem, path in ((images_stem, images_path), (labels_stem, labels_path)):
        if not path:
            raise DataError(f"{stem}[.gz] is missing from the dataset at {root}")
    assert images_path and labels_path  # for the type checker: the loop above raised otherwise
    images, labels = read_idx(images_path, 3, max_bytes), read_idx(labels_path, 1, max_bytes)
    if len(images) != len(labels):
        raise DataError(
            f"{os.path.basename(images_path)} holds {len(images)} images but "
            f"{os.path.basename(labels_path)} holds {len(labels)} labels"
        )
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


def mnist_classes(train, test) -> int:
    """The number of classes of MNIST-format labels (0..max of the training labels), checked:
    every class has a training example, and the test labels are among them."""
    num_classes = int(train[1].max()) + 1
    absent = sorted(set(range(num_classes)) - set(np.unique(train[1]).tolist()))
    if absent:  # classes are 0..max label; one with no training example cannot be learned
        shown = ", ".join(map(str, absent[:10])) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
        raise DataError(
            f"{os.path.basename(train[2][1])}: labels run from 0 to {num_classes - 1} but {len(absent)} of them "
            f"have no training example ({shown}); labels must be 0..N-1 with every class present"
        )
    if test is not None and int(test[1].max()) >= num_classes:
        raise DataError(
            f"{os.path.basename(test[2][1])} has label {int(test[1].max())}, "
            f"outside the {num_classes} classes of the training labels"
        )
    return num_classes


def load_mnist(root: str, device: torch.device, max_bytes: int) -> Data:
    train = _read_pair(root, MNIST_FILES["train_images"], MNIST_FILES["train_labels"], True, max_bytes)
    test = _read_pair(root, MNIST_FILES["test_images"], MNIST_FILES["test_labels"], False, max_bytes)
    num_classes = mnist_classes(train, test)

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
    """An image-folder dataset, checked file by file (bad files are skipped and named)."""
    found = images.scan(
        root,
        threads=runtime.scan_threads,
        max_bytes=settings.max_file_bytes,
        max_pixels=settings.max_image_pixels,
        log_every=settings.log_every_seconds,
    )
    bad_fraction = len(found["bad"]) / max(found["files"], 1)
    if bad_fraction > settings.max_bad_fraction:
        raise DataError(
            f"{len(found['bad'])} of {found['files']} files in {root} are not readable images "
            f"({bad_fraction:.1%} > JOB_MAX_BAD_FRACTION={settings.max_bad_fraction}); first: "
            f"{found['bad'][0][0]!r} ({found['bad'][0][1]})"
        )
    if not found["train"]:
        raise DataError(f"no readable image in {root}/train")
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
    into the local cache and loaded. Every problem is a DataError (exit 3)."""
    with storage.errors(settings.data_uri, DataError, "read dataset"):
        index = shards.find_index(settings.data_uri)
        if index is not None:
            return load_shards(settings, runtime, index, normalize, limit=1 if include else 0)
        root = storage.pull(settings.data_uri, settings.cache_dir, include)
    names = sorted(n for n in os.listdir(root) if not n.startswith("."))
    fmt = detect_format(names, settings.data_uri) if settings.data_format == "auto" else settings.data_format
    if fmt == "imagefolder":
        return load_images(root, settings, runtime, normalize)
    return load_mnist(root, runtime.device, settings.max_file_bytes)


def load_shards(settings, runtime, index: dict, normalize: bool, limit: int = 0) -> Data:
    """A sharded dataset from its index alone (no listing, no scan, no hash: start-up does not
    grow with the dataset): train and val shards as one source, test shards as another, one
    bounded cache for all."""
    uri = settings.data_uri
    train, val, test = (shards.split_shards(index, split, limit) for split in ("train", "val", "test"))
    if not train or not val:
        raise DataError(f"{storage.redact_uri(uri)}/{shards.INDEX} lists no train or no val shards")
    cache = shards.ShardCache(
        uri,
        shards.cache_folder(settings, uri, runtime.local_rank),
        settings.shard_cache_bytes,
        train + val + test,
        len(index["class_names"]),
    )

    def source(parts):
        return shards.ShardSource(
            parts,
            cache,
            index["kind"],
            settings.image_size,
            normalize,
            runtime.workers,
            runtime.device,
            settings.seed,
            settings.max_image_pixels,
            settings.augment,
            settings.decode,
        )

    n_train, n_val = (sum(s["samples"] for s in parts) for parts in (train, val))
    log.info(
        f"sharded dataset {storage.redact_uri(uri)}: {len(train) + len(val) + len(test)} shards, streamed through "
        f"at most {settings.shard_cache_bytes / 1e6:,.1f} MB of local cache"
    )
    return Data(
        source(train + val),
        source(test) if test else None,
        index["class_names"],
        index["fingerprint"],
        (torch.arange(n_train), torch.arange(n_train, n_train + n_val)),
        [tuple(b) for b in index["bad_files"]],
        index["files"],
    )


def check(uri: str, data_format: str) -> tuple[str, list[str]]:
    """--check: reach the dataset without pulling it. Returns the format and the class names of
    an image folder ([] for MNIST, whose classes are in its labels)."""
    index = shards.find_index(uri)
    if index is not None:
        return "sharded", index["class_names"]
    names = storage.list_names(uri)
    if not names:
        raise FileNotFoundError(uri)
    found = detect_format(names, uri)
    if data_format not in ("auto", found):
        raise DataError(f"{storage.redact_uri(uri)} holds {found} data, not JOB_DATA_FORMAT={data_format}")
    if found == "mnist":
        return found, []
    classes = storage.list_names(storage.join(uri, "train"))
    if len(classes) < 2:
        raise DataError(
            f"{storage.redact_uri(storage.join(uri, 'train'))} holds {len(classes)} class folder(s); "
            "a classifier needs at least 2"
        )
    return found, classes


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (the inverse of read_idx)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()

"""MNIST-format data: IDX files (gzip or raw), read with their headers checked and decompression
bounded, and written (the inverse, for prepare's tests and the staging script)."""

import gzip
import io
import math
import os
import zlib

import numpy as np

from job.data import images
from job.data.layout import MNIST_FILES
from job.errors import DataError
from job.settings import MAX_IMAGE_SIDE

IDX_UBYTE = 0x08  # the IDX type code for unsigned bytes, the only one MNIST uses
Pair = tuple[np.ndarray, np.ndarray, list[str]]  # images, labels, their two files


def _find(root: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


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
    expected = math.prod(dims)  # Python ints: numpy's int64 product wraps (2^31 x 2^31 x 4 is 0)
    if not all(1 <= d <= MAX_IMAGE_SIDE for d in dims[1:]):  # as IDX shards and exported configs allow
        raise DataError(f"{name}: header says images of {dims[1:]} pixels; each side must be 1 to {MAX_IMAGE_SIDE}")
    if len(raw) - offset != expected:
        raise DataError(
            f"{name}: header says {dims} ({expected} bytes) but the file holds {len(raw) - offset}; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def read_split(root: str, role: str, required: bool, max_bytes: int) -> Pair | None:
    """The images and labels of one role ("train" or "test": train-* or t10k-* files) under a
    local root, checked against each other; None when neither file is there and not `required`."""
    images_stem, labels_stem = MNIST_FILES[f"{role}_images"], MNIST_FILES[f"{role}_labels"]
    images_path, labels_path = _find(root, images_stem), _find(root, labels_stem)
    if not images_path and not labels_path and not required:
        return None
    for stem, path in ((images_stem, images_path), (labels_stem, labels_path)):
        if not path:
            raise DataError(f"{stem}[.gz] is missing from the MNIST-format dataset")
    assert images_path and labels_path  # for the type checker: the loop above raised otherwise
    array, labels = read_idx(images_path, 3, max_bytes), read_idx(labels_path, 1, max_bytes)
    if len(array) != len(labels):
        raise DataError(
            f"{os.path.basename(images_path)} holds {len(array)} images but "
            f"{os.path.basename(labels_path)} holds {len(labels)} labels"
        )
    if len(array) == 0:
        raise DataError(f"{os.path.basename(images_path)} holds no images")
    return array, labels, [images_path, labels_path]


def num_classes(train: Pair, test: Pair | None) -> int:
    """The number of classes of MNIST-format labels (0..max of the training labels), checked:
    every class has a training example, and the test labels are among them."""
    classes = int(train[1].max()) + 1
    absent = sorted(set(range(classes)) - set(np.unique(train[1]).tolist()))
    if absent:  # classes are 0..max label; one with no training example cannot be learned
        shown = ", ".join(map(str, absent[:10])) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
        raise DataError(
            f"{os.path.basename(train[2][1])}: labels run from 0 to {classes - 1} but {len(absent)} of them "
            f"have no training example ({shown}); labels must be 0..N-1 with every class present"
        )
    if test is not None and int(test[1].max()) >= classes:
        raise DataError(
            f"{os.path.basename(test[2][1])} has label {int(test[1].max())}, "
            f"outside the {classes} classes of the training labels"
        )
    return classes


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (the inverse of read_idx)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()

"""Image files: check, scan, transform and read them through DataLoader workers.

An image folder (job.data.layout) is decoded file by file once before training: anything that is
not a regular file, too large, over the pixel limit (a decompression bomb), corrupt, truncated or
not an image is skipped and named, and too many of them fail the job.
"""

import hashlib
import io
import logging
import os
import random
import stat
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from job import stop
from job.data import augment, layout
from job.data.sources import fed_loader

log = logging.getLogger("job")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_MEAN, _STD = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))  # made once, not per image
# Over Image.MAX_IMAGE_PIXELS, PIL only warns (up to twice that): make it an error, so an image
# over the pixel limit is refused at open, from its header, before a byte is decoded.
warnings.simplefilter("error", Image.DecompressionBombWarning)


class ImageItems(Dataset):
    """(path, label) pairs read as RGB images through a transform. Grayscale, CMYK, palette and
    RGBA images are converted, not rejected. An item is (index, augmentation seed): the loader's
    sampler hands both, so a sample's augmentation depends on (JOB_SEED, epoch, sample) alone."""

    def __init__(self, items: list[tuple[str, int]], transform, train: bool = False, *, max_pixels: int):
        self.items, self.transform, self.train, self.max_pixels = items, transform, train, max_pixels
        self._loaders: dict = {}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        path, label = self.items[i]
        Image.MAX_IMAGE_PIXELS = self.max_pixels  # in a DataLoader worker process too
        with Image.open(path) as img:
            return self.transform(img.convert("RGB"), self.train, random.Random(seed)), label

    def loader(self, train: bool, batch_size: int, workers: int, pin_memory: bool):
        """The (DataLoader, sampler) for training or evaluation reads, made once and kept."""
        key = (train, batch_size)
        if key not in self._loaders:
            view = ImageItems(self.items, self.transform, train, max_pixels=self.max_pixels)
            self._loaders[key] = fed_loader(view, batch_size, workers, pin_memory)
        return self._loaders[key]


class ImageTransform:
    """PIL RGB image -> the model's input: job.data.augment's preprocessing on uint8 (shards use the
    same), then float in [0, 1], normalised with ImageNet's mean/std (what torchvision's
    pretrained weights expect) when `normalize`. Picklable, for DataLoader workers."""

    def __init__(self, size: int, augment: bool, normalize: bool):
        self.size, self.augment, self.normalize = size, augment, normalize

    def __call__(self, img: Image.Image, train: bool, rng: random.Random) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        x = augment.augment(TF.pil_to_tensor(img), self.size, train and self.augment, rng)
        return to_float(x, self.normalize)


def to_float(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """uint8 -> float in [0, 1], then (x - mean) / std with ImageNet's statistics if `normalize`."""
    x = x.float().div_(255)
    return x.sub_(_MEAN).div_(_STD) if normalize else x


def read_regular(path: str, max_bytes: int) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None), or (None, why not): only a regular file of at most max_bytes is
    read, in one bounded read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not hang
    except OSError as exc:
        return None, f"cannot open it ({exc.strerror})"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # a device (a link to /dev/zero), a FIFO, a socket
            return None, "not a regular file"
        if st.st_size > max_bytes:
            return None, f"{st.st_size} bytes, over JOB_MAX_FILE_BYTES={max_bytes}"
        return f.read(max_bytes + 1), None


def check_file(path: str, max_bytes: int, max_pixels: int) -> tuple[str | None, bytes]:
    """(None if the file is a regular file that decodes as an image within the limits, else why
    not; the sha256 of its bytes), from one bounded read."""
    blob, reason = read_regular(path, max_bytes)
    if blob is None:
        return reason, b""
    return check_blob(blob, max_pixels), hashlib.sha256(blob).digest()


def check_blob(blob: bytes, max_pixels: int) -> str | None:
    """None if the bytes decode as an image within the pixel limit, else why not. An animation
    (GIF, APNG, WebP) is checked and read as its first frame alone: PIL decodes one frame at a
    time, so 200 frames cost what one does (shards refuse animations: job.data.stream)."""
    try:
        with Image.open(io.BytesIO(blob)) as img:  # refuses more than Image.MAX_IMAGE_PIXELS from the header
            img.load()  # a full decode: verify() misses truncated JPEGs
        return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"more than JOB_MAX_IMAGE_PIXELS={max_pixels} pixels (a decompression bomb?)"
    except UnidentifiedImageError:  # PIL's message names the in-memory buffer (<_io.BytesIO object at 0x...>)
        return "not an image (no image format recognised)"
    except (OSError, SyntaxError, ValueError, MemoryError) as exc:
        return f"{exc.__class__.__name__}: {str(exc)[:120]}"


def user_name(shown: str, rel: str) -> str:
    """A file of a dataset as the user knows it: its URI (s3://bucket/photos/train/rose/1.jpg) or
    local path, from the dataset's URI and the file's path relative to it."""
    return shown.rstrip("/") + "/" + rel.replace(os.sep, "/")


def scan(root: str, threads: int, max_bytes: int, max_pixels: int, log_every: float = 10.0, shown: str = "",
         name_bad: bool = True) -> dict:
    """Find the splits and their images, decode each once, and sort out the bad ones. Messages
    name the dataset as the user gave it (`shown`: its URI, not the local cache folder `root`);
    each bad file is named in a warning when `name_bad` (rank 0 alone: one list in the log).

    Returns {"classes", "train", "val" (or None), "test" (or None), "bad", "files", "digests"};
    each split is a list of (path, label); digests maps each file's name (class/relative path)
    to its sha256. Raises DataError for a layout that cannot be trained on."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    shown = shown or root
    classes, items, folders = layout.image_splits(layout.local_folders(root), shown)
    every = [p for split in items.values() for p, _ in split]
    log.info(f"checking {len(every)} image files in {shown} ({threads} threads)")
    checked, start = {}, time.monotonic()
    last = start
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # PIL decodes without the GIL
        for path, result in zip(every, pool.map(lambda p: check_file(p, max_bytes, max_pixels), every), strict=True):
            checked[path] = result
            stop.check("while checking images: nothing to save")
            if time.monotonic() - last >= log_every:
                last = time.monotonic()
                done, rate = len(checked), len(checked) / (last - start)
                log.info(
                    f"checking images: {done}/{len(every)} ({100 * done / len(every):.0f}%), {rate:,.1f} files/s, "
                    f"elapsed {last - start:.0f} s, ETA {(len(every) - done) / rate:.0f} s"
                )
    reasons = {p: reason for p, (reason, _) in checked.items()}
    bad = [(p, r) for p, r in reasons.items() if r]
    for path, reason in bad if name_bad else []:
        log.warning(f"skipping {user_name(shown, os.path.relpath(path, root))}: {reason}")
    good = {k: [(p, y) for p, y in v if not reasons[p]] for k, v in items.items()}
    return {
        "classes": classes,
        "train": good["train"],
        "val": good.get("val"),
        "test": good.get("test"),
        "bad": [(os.path.relpath(p, root), r) for p, r in bad],
        "files": len(every),
        "digests": {p: digest for p, (_, digest) in checked.items()},
        # a file's name in the fingerprint: class/[subfolders/]file
        "names": {p: os.path.relpath(p, os.path.join(root, folders[k])) for k, v in items.items() for p, _ in v},
    }

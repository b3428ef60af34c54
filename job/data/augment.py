"""The one image preprocessing for training and evaluation, whatever holds the images.

Image folders (decoded by PIL in DataLoader workers) and shards (decoded by torchvision.io in
workers or on the device) hand the same uint8 (C, H, W) tensor to `augment` with the same
per-sample seed, so JOB_AUGMENT draws from one distribution on both paths, and a resumed run
augments each sample exactly as an uninterrupted one would.
"""

import math
import random
from typing import Any

import numpy as np
import torch

EVAL_RESIZE = 256 / 224  # evaluation: the shorter side to size x 256/224, then the centre crop (torchvision's recipe)
MAX_ROTATION_DEGREES = 20  # the flowers tutorial's RandomRotation(20)
_ROTATION_MAPS: dict[tuple, Any] = {}  # (size, angle in half degrees) -> gather indices: the nearest-neighbour rotation


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a function of (JOB_SEED, epoch, sample) alone, never
    of the process or worker that reads it."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + index


def augment(x: torch.Tensor, size: int, train: bool, rng: random.Random) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, size, size): evaluation resizes the shorter side to
    size*256/224 (bilinear, antialiased) and crops the centre; training (JOB_AUGMENT) takes a
    random resized crop, a horizontal flip and a rotation of up to 20 degrees, the tutorial's
    augmentations, on tensors."""
    from torchvision.transforms.v2 import functional as TF

    _, h, w = x.shape
    if not train:
        x = TF.resize(x, [round(size * EVAL_RESIZE)], antialias=True)
        return TF.center_crop(x, [size, size])
    top, left, ch, cw = _crop_box(h, w, rng)
    x = TF.resized_crop(x, top, left, ch, cw, [size, size], antialias=True)
    if rng.random() < 0.5:
        x = x.flip(-1)
    return rotate_nearest(x, rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))


def _crop_box(h: int, w: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box, scale (0.08, 1), ratio (3/4, 4/3): (top, left, h, w)."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def rotate_nearest(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a uint8 (C, H, W) image about its centre by nearest neighbour, as torchvision's
    RandomRotation does by default, with one gather through a cached index map (~7x faster
    than torchvision's rotate on a 224 px uint8 image on CPU); corners are filled with 0."""
    c, h, w = x.shape
    key = (h, w, round(degrees * 2), str(x.device))
    index: Any = _ROTATION_MAPS.get(key)
    if index is None:
        angle = math.radians(key[2] / 2)
        ys, xs = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
        src_x = (math.cos(angle) * xs - math.sin(angle) * ys + (w - 1) / 2).round().long()
        src_y = (math.sin(angle) * xs + math.cos(angle) * ys + (h - 1) / 2).round().long()
        inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
        index = torch.where(inside, src_y * w + src_x, h * w).flatten()  # h * w: the appended zero pixel
        # on the CPU, numpy's take on uint8 is ~4x faster than torch's gathers: keep numpy's form
        index = _ROTATION_MAPS[key] = index.numpy() if x.device.type == "cpu" else index.to(x.device)
    padded = torch.cat([x.reshape(c, -1), x.new_zeros(c, 1)], 1)
    if x.device.type == "cpu":
        return torch.from_numpy(np.take(padded.numpy(), index, axis=1).reshape(c, h, w))
    return padded.index_select(1, index).view(c, h, w)

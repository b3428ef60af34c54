"""Shards as a data source: each epoch's order, a function of (seed, epoch) alone, read through
the bounded cache, decoded and augmented by DataLoader workers (or on the device).

Order: per (seed, epoch), shards are shuffled and samples shuffled within windows of WINDOW
shards, so a process reads each shard once an epoch; the order does not depend on the number of
processes, so a resume continues exactly, mid-epoch too, with any number of them at the same
global batch (the position is counted in samples, as for in-memory data).
"""

import io
import logging
import math
import random
from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from job.data import images
from job.data.augment import augment, sample_seed
from job.data.cache import WINDOW, ShardCache
from job.data.sources import Feed, fed_loader
from job.errors import DataError, SettingsError

log = logging.getLogger("job")
Size = int | tuple[int, ...]  # an image's side, or an IDX sample's (height, width)
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"  # what prepare writes; a decoder reads one frame of each


class ShardItems(Dataset):
    """What a DataLoader worker does per sample: read its bytes from the local shard, decode
    (libjpeg-turbo through torchvision.io), augment or crop on uint8 tensors. The item carries
    everything (path, offset, size, label, key, augmentation seed), so workers keep no state;
    the seed is a function of (seed, epoch, sample), so augmentations survive a resume."""

    def __init__(self, size: Size, kind: str, max_pixels: int, decode_here: bool = True):
        self.size, self.kind, self.max_pixels = size, kind, max_pixels
        self.decode_here = decode_here  # False: hand the bytes on, the device decodes the batch

    def __len__(self):
        return 0  # items come from the sampler

    def __getitem__(self, item):
        path, offset, nbytes, label, key, seed, train = item
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                raw = bytearray(f.read(nbytes))
            check_header(raw, self.max_pixels)
            blob = torch.frombuffer(raw, dtype=torch.uint8)
            if not self.decode_here:
                return blob, label, key
            return decode(blob, self.kind, self.size, train, seed), label, key
        except Exception as exc:  # a corrupt sample: the batch takes another in its place (collate)
            why = f": {str(exc)[:160]}" if isinstance(exc, NotReadable) else ""
            return None, label, f"{key} ({exc.__class__.__name__}{why})"


class NotReadable(ValueError):
    """A sample refused before decoding; its message says why (the skip line shows it)."""


def check_header(raw: bytes, max_pixels: int) -> None:
    """Refuse, before it is decoded, an image whose header says it is over JOB_MAX_IMAGE_PIXELS (a
    shard written by someone else may hold a decompression bomb), or that is not a JPEG or PNG:
    torchvision decodes every frame of a GIF, so 200 frames that each pass the pixel check would
    take 200 times the memory. PIL reads the header alone."""
    from PIL import Image

    if not raw.startswith(JPEG_MAGIC) and not raw.startswith(PNG_MAGIC):  # APNG: libpng decodes one frame
        raise NotReadable("not a JPEG or PNG, as prepare writes (an animated GIF's every frame would be decoded)")
    with Image.open(io.BytesIO(raw)) as img:
        if img.width * img.height > max_pixels:
            raise NotReadable(f"{img.width}x{img.height} pixels, over JOB_MAX_IMAGE_PIXELS={max_pixels}")


def decode(blob: torch.Tensor, kind: str, size: Size, train: bool, seed: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    if kind == "idx":  # `size` is (height, width): every sample of a batch must have the index's shape
        return _checked(decode_image(blob, mode=ImageReadMode.GRAY), cast(tuple, size))
    x = (
        decode_jpeg(blob, mode=ImageReadMode.RGB)
        if blob[:2].tolist() == [0xFF, 0xD8]
        else decode_image(blob, mode=ImageReadMode.RGB)
    )
    return augment(_checked(x), cast(int, size), train, random.Random(seed))


def _checked(x: torch.Tensor, size: tuple[int, ...] | None = None) -> torch.Tensor:
    """A decoded sample as a batch can take it: 8 bits (a 16-bit PNG decodes to uint16), and for
    IDX the index's (height, width)."""
    if x.dtype != torch.uint8:
        raise ValueError(f"{x.dtype} pixels, not 8-bit")
    if size is not None and tuple(x.shape[1:]) != tuple(size):
        raise ValueError(f"shape {tuple(x.shape)} is not the index's")
    return x


def fill(batch: list) -> tuple[list, list[str]]:
    """A sample that failed to decode is replaced by another of the same batch (the batch keeps
    its size, so every rank takes the same steps); returns the batch and the failed names."""
    good = [b for b in batch if b[0] is not None]
    if not good:
        raise DataError(f"every sample of a batch failed to decode: {', '.join(b[2] for b in batch[:5])}")
    failed = [b[2] for b in batch if b[0] is None]
    return [b if b[0] is not None else good[i % len(good)] for i, b in enumerate(batch)], failed


def collate(batch):
    """Stack a batch decoded by the workers."""
    filled, failed = fill(batch)
    return torch.stack([b[0] for b in filled]), torch.tensor([b[1] for b in filled]), failed


def collate_bytes(batch):
    """A batch of undecoded images (the device decodes it): the bytes as a list."""
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch]), [b[2] for b in batch]


JpegDecoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # JPEG bytes -> uint8 (3, H, W) on the device
LOG_FIRST_FAILURES, LOG_EVERY_FAILURES = 10, 1000  # device decode failures: each of the first named, then every Nth


def cuda_jpeg_decoder(device: torch.device) -> JpegDecoder:
    """torchvision's batched nvJPEG decode, made safe for a training loop. decode_jpeg(device="cuda")
    allocates its outputs from the caller's current stream and decodes on a private stream without
    waiting for the caller's; on H100 the hardware JPEG engine also ignores stream order. So a
    block freed by the training stream while its kernels are still queued could be handed to the
    decoder and overwritten under them (pytorch/vision#9606: 199/200 corrupted iterations on an
    H100; meta-pytorch/torchcodec#1634: a host wait on the caller's stream before the hardware
    decode writes). Here the decode runs with a dedicated stream current, so its outputs come from
    that stream's pool, which the training stream never frees into; the host waits for that stream
    before each call (nothing of ours is in flight there when the engine writes); the training
    stream waits for it after, and each output is recorded on the training stream, so the
    allocator does not reuse it while the training stream may still read it. Needs a GPU: no test
    here runs this function (the CPU tests inject a decoder in its place)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    stream: torch.cuda.Stream | None = None  # created at the first batch, after the DataLoader workers start

    def decode(blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        nonlocal stream
        if stream is None:
            stream = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)
        stream.synchronize()
        with torch.cuda.stream(stream):
            out = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
        current.wait_stream(stream)
        for x in out:
            x.record_stream(current)
        return out

    return decode


def decode_isolating(decode_jpegs: JpegDecoder, blobs: list[torch.Tensor]) -> list[torch.Tensor | Exception]:
    """`decode_jpegs` over `blobs`, one result per blob: an image, or the error of the one JPEG it
    could not decode. One bad JPEG fails torchvision's whole batched call, so a failed call is
    split in halves until each failure is one sample's: about 2*log2(batch) more calls for one bad
    sample, and the rest of the batch still decodes on the device."""
    try:
        out: list[torch.Tensor | Exception] = list(decode_jpegs(blobs))
    except RuntimeError as exc:
        if len(blobs) == 1:
            return [exc]
        half = len(blobs) // 2
        return decode_isolating(decode_jpegs, blobs[:half]) + decode_isolating(decode_jpegs, blobs[half:])
    if len(out) != len(blobs):
        raise RuntimeError(f"the device JPEG decoder returned {len(out)} images for {len(blobs)}")
    return out


class DeviceDecode:
    """Decode and augment a batch of sample bytes on the training device (JOB_DECODE=device): a
    batch's JPEGs in one batched nvJPEG call on a GPU, then the workers' seeded augmentation, per
    sample, on the device. What the device cannot decode (a PNG, an IDX sample, a JPEG nvJPEG
    refuses) is decoded and augmented on the CPU exactly as the workers do (`decode`), and moved
    to the device in one copy per batch. A JPEG the device refuses is counted and named in the log
    (each of the first LOG_FIRST_FAILURES, then every LOG_EVERY_FAILURES-th); one the CPU cannot
    decode either is a corrupt sample like any other (replaced within its batch, named, counted).
    If the device refuses every JPEG of a batch that the CPU decodes, it is not the data: the rest
    of the run decodes on the CPU, and the log says so once.

    `decode_jpegs` is the device's batched JPEG decoder: by default torchvision's on a GPU
    (`cuda_jpeg_decoder`) and none on the CPU (everything takes the CPU path); the tests pass
    their own to drive the bookkeeping without a GPU."""

    def __init__(self, device: torch.device, decode_jpegs: JpegDecoder | None = None):
        self.device = device
        self.decode_jpegs = decode_jpegs or (cuda_jpeg_decoder(device) if device.type == "cuda" else None)
        self.device_failures = 0  # JPEGs the device could not decode (each then tried on the CPU)

    def __call__(
        self, blobs: list, keys: list[str], kind: str, size: Size, train: bool, seeds: list[int]
    ) -> tuple[torch.Tensor, list[str]]:
        """The batch (uint8 on the device, in the order of `blobs`) and the names of the samples
        that failed to decode everywhere (each replaced by another of the batch, as `fill` does)."""
        done: list[torch.Tensor | None] = [None] * len(blobs)
        refused = 0  # JPEGs of this batch the device could not decode
        failed: dict[int, str] = {i: keys[i] for i, b in enumerate(blobs) if b is None}  # the worker named why
        jpeg = [
            i for i, b in enumerate(blobs) if kind == "image" and b is not None and b[:3].tolist() == list(JPEG_MAGIC)
        ]
        if self.decode_jpegs is not None and jpeg:
            for i, x in zip(jpeg, decode_isolating(self.decode_jpegs, [blobs[i] for i in jpeg]), strict=True):
                if isinstance(x, Exception):
                    refused += 1
                    self._device_failed(keys[i], x)
                    continue
                try:
                    done[i] = augment(_checked(x), cast(int, size), train, random.Random(seeds[i]))
                except Exception as exc:
                    failed[i] = f"{keys[i]} ({exc.__class__.__name__})"
        on_cpu = [i for i in range(len(blobs)) if done[i] is None and i not in failed]
        decoded = []
        for i in on_cpu:
            try:
                decoded.append(decode(blobs[i], kind, size, train, seeds[i]))
            except Exception as exc:
                failed[i] = f"{keys[i]} ({exc.__class__.__name__})"
        good = [i for i in on_cpu if i not in failed]
        if good:  # one host-to-device copy for the batch's CPU-decoded samples, not one each
            for i, x in zip(good, torch.stack(decoded).to(self.device).unbind(), strict=True):
                done[i] = x
        if self.decode_jpegs is not None and len(jpeg) > 1 and refused == len(jpeg) and any(i in good for i in jpeg):
            log.error(
                f"the device's JPEG decoder failed on all {len(jpeg)} JPEGs of a batch that the CPU decodes: "
                "the rest of this run decodes on the CPU in the training process (slow); JOB_DECODE=workers "
                "decodes in the DataLoader workers instead"
            )
            self.decode_jpegs = None
        filled, names = fill([(done[i], 0, failed.get(i, keys[i])) for i in range(len(blobs))])
        return torch.stack([b[0] for b in filled]), names

    def _device_failed(self, key: str, exc: Exception) -> None:
        self.device_failures += 1
        n = self.device_failures
        if n <= LOG_FIRST_FAILURES or n % LOG_EVERY_FAILURES == 0:
            why = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
            later = f"; from now on every {LOG_EVERY_FAILURES}th is logged" if n == LOG_FIRST_FAILURES else ""
            log.warning(f"device decode failure {n}: {key} ({why}); decoding it on the CPU{later}")


class ShardSource:
    """A sharded dataset's samples (some of its splits, indexed in order), streamed through a
    ShardCache: the loop's data source like the in-memory and file ones."""

    in_memory = False
    eval_batch_size = None

    def __init__(
        self,
        shards: list[dict],
        cache: ShardCache,
        kind: str,
        image_size: int,
        normalize: bool,
        workers: int,
        device: torch.device,
        seed: int,
        max_pixels: int,
        augment: bool,
        decode: str = "auto",
    ):
        self.shards, self.cache, self.kind, self.workers, self.device = shards, cache, kind, workers, device
        self.augment = augment  # JOB_AUGMENT: training reads are augmented, else cropped as for evaluation
        # JOB_DECODE: the workers decode and augment (CPU), or hand the bytes on to the device
        self.on_device = decode == "device" or (decode == "auto" and device.type == "cuda")
        self.seed, self.max_pixels = seed, max_pixels
        counts = [s["samples"] for s in shards]
        self.starts = torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.int64)
        self.sample_shape = (
            (3, image_size, image_size) if kind == "image" else tuple(shards[0].get("shape", (1, 28, 28)))
        )
        self.size = image_size if kind == "image" else self.sample_shape[1:]  # idx: (height, width), checked per sample
        # normalisation folded into one multiply-add on the uint8 values: (x / 255 - mean) / std
        mean, std = (
            torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (images.IMAGENET_MEAN, images.IMAGENET_STD)
        )
        self.scale: torch.Tensor | None = 1 / (255 * std) if normalize else None
        self.bias: torch.Tensor | None = -mean / std if normalize else None
        self.loaders: dict = {}
        self.skipped = 0
        self.device_decode = DeviceDecode(device) if self.on_device else None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shard = torch.searchsorted(self.starts, indices, right=True) - 1
        return shard, indices - self.starts[shard]

    def order(self, indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        """`indices` in this epoch's order: shards shuffled, samples shuffled within windows of
        WINDOW shards. Depends only on (seed, epoch) and the indices, never on the processes."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        shard, _ = self.locate(indices)
        present = torch.unique(shard)
        groups = {int(s): indices[shard == s] for s in present}
        shuffled = present[torch.randperm(len(present), generator=g)].tolist()
        out = []
        for w in range(0, len(shuffled), WINDOW):
            window = torch.cat([groups[s] for s in shuffled[w : w + WINDOW]])
            out.append(window[torch.randperm(len(window), generator=g)])
        return torch.cat(out) if out else indices[:0]

    def batches(self, indices: torch.Tensor, batch_size: int, train: bool, epoch: int = 0):
        shard_ids, positions = self.locate(indices.cpu())
        names = [self.shards[i]["name"] for i in range(len(self.shards))]
        sequence, last = [], {}
        for k, s in enumerate(shard_ids.tolist()):
            if s not in last:
                sequence.append(names[s])
            last[s] = k
        self.check_room(len(sequence), batch_size)
        self.cache.want(sequence)
        loader, sampler = self._loader(train, batch_size)
        held: dict[int, int] = {}  # shard -> items handed to the loader and not yet received
        base_seed = sample_seed(self.seed, epoch, 0)

        def items():
            for k, (s, pos) in enumerate(zip(shard_ids.tolist(), positions.tolist(), strict=True)):
                local = self.cache.get(names[s]) if s not in held else self.cache.local[names[s]]
                held[s] = held.get(s, 0) + 1
                offset, nbytes, label, sample_key = local["samples"][pos]
                yield (
                    local["path"],
                    offset,
                    nbytes,
                    label,
                    f"{names[s]}:{sample_key}",
                    base_seed + int(indices[k]),
                    train and self.augment,
                )

        sampler.give(items(), len(indices))
        received = 0
        try:
            for x, y, failed in loader:
                if self.device_decode is not None:
                    seeds = [base_seed + int(i) for i in indices[received : received + len(y)]]
                    x, failed = self.device_decode(x, failed, self.kind, self.size, train and self.augment, seeds)
                for name in failed:
                    log.warning(f"skipping a corrupt sample {name}; another sample of its batch took its place")
                self.skipped += len(failed)
                received += len(y)
                for s in [s for s, k in last.items() if k < received and s in held]:
                    self.cache.release(names[s])
                    del held[s]
                yield self._to_model(x), y.to(self.device, non_blocking=True)
        finally:
            for s in list(held):
                self.cache.release(names[s])
            held.clear()
            log.debug(f"shard cache: {self.cache.disk_peak} bytes on disk at most (limit {self.cache.limit})")

    def _loader(self, train: bool, batch_size: int) -> tuple[DataLoader, Feed]:
        """One persistent DataLoader per (train, batch size), fed sample by sample through its sampler."""
        key = (train, batch_size)
        if key not in self.loaders:
            self.loaders[key] = fed_loader(
                ShardItems(self.size, self.kind, self.max_pixels, decode_here=not self.on_device),
                batch_size,
                self.workers,
                pin_memory=self.device.type == "cuda",
                collate_fn=collate_bytes if self.on_device else collate,
            )
        return self.loaders[key]

    def check_room(self, shards_read: int, batch_size: int) -> None:
        """The cache must hold every shard the loader may be reading at once: those of the batches
        in flight (the DataLoader prefetches 2 a worker) and the next windows'. Refused up front,
        as a setting (exit 2), rather than found out mid-epoch."""
        in_flight = (2 * max(self.workers, 1) + 2) * batch_size
        typical = max(1.0, len(self) / len(self.shards))  # samples a shard
        needed = min(shards_read, math.ceil(in_flight / typical) + 2 * WINDOW + 1)
        biggest = max(s["bytes"] for s in self.shards)
        if needed * biggest > self.cache.limit:
            raise SettingsError(
                f"JOB_SHARD_CACHE_BYTES={self.cache.limit} is too small: reading batches of {batch_size} "
                f"with {self.workers} worker(s) keeps up to {needed} shards in use (each up to {biggest} "
                f"bytes): raise it to at least {needed * biggest}, or make shards larger than batches"
            )

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float in [0, 1] (normalised for torchvision models), on the device: one
        vectorised op per batch, on the GPU when there is one."""
        x = x.to(self.device, non_blocking=True).float()
        if self.scale is None or self.bias is None:
            return x.div_(255)
        return x.mul_(self.scale).add_(self.bias)


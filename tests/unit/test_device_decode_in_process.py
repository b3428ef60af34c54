"""JOB_DECODE=device without a GPU: the bookkeeping around the device's batched JPEG decoder (which
samples it gets, what it refuses, the CPU decode of the rest, the order of the batch, the log, the
corrupt samples) driven through its `decode_jpegs` parameter. The stand-in device decoder is
torchvision's own batched decode_jpeg on the CPU, which, like nvJPEG's, fails the whole call for
one bad JPEG; a few tests also make it refuse what nvJPEG may refuse (a progressive JPEG) or
everything. The CUDA stream handling of `cuda_jpeg_decoder` needs a GPU and is not run here."""

import hashlib
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from job.data import stream
from job.data.cache import ShardCache
from job.data.prepare_shards import tar_shard

CPU = torch.device("cpu")
SIZE = 24


def encoded(seed: int, fmt: str = "JPEG", progressive: bool = False, truncated: bool = False) -> torch.Tensor:
    """A 40x50 RGB image's bytes as a shard holds them; a truncated JPEG keeps its header (PIL
    reads it, as the workers' header check does), so only the decode finds it broken."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"progressive": True} if progressive else {}))
    blob = buffer.getvalue()
    return torch.frombuffer(bytearray(blob[: len(blob) // 2] if truncated else blob), dtype=torch.uint8)


def is_progressive(blob: torch.Tensor) -> bool:
    return b"\xff\xc2" in bytes(blob.numpy())  # SOF2: a progressive frame


class Device:
    """A batched JPEG decoder standing in for nvJPEG (torchvision's on the CPU), with the calls it
    got; `refuse` says which JPEGs fail the call they are in, as one nvJPEG cannot decode does."""

    def __init__(self, refuse=lambda blob: False):
        self.calls: list[list[torch.Tensor]] = []
        self.refuse = refuse

    def __call__(self, blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls.append(blobs)
        if any(self.refuse(b) for b in blobs):
            raise RuntimeError("Error while decoding JPEG images: Failed to decode batch: 4\nmore detail")
        return decode_jpeg(blobs, mode=ImageReadMode.RGB)


def workers_batch(blobs: list, train: bool, seeds: list[int]) -> torch.Tensor:
    """What the DataLoader workers make of the same samples (JOB_DECODE=workers)."""
    return torch.stack([stream.decode(b, "image", SIZE, train, s) for b, s in zip(blobs, seeds, strict=True)])


@pytest.mark.parametrize("train", [True, False])
def test_the_device_gets_the_jpegs_and_the_batch_is_the_workers_batch_in_order(train):
    blobs = [encoded(0), encoded(1, "PNG"), encoded(2), encoded(3, "PNG"), encoded(4)]
    keys = [f"s:{i}" for i in range(len(blobs))]
    seeds = [100 + i for i in range(len(blobs))]
    device = Device()
    decoder = stream.DeviceDecode(CPU, device)
    batch, failed = decoder(blobs, keys, "image", SIZE, train, seeds)
    assert failed == [] and decoder.device_failures == 0
    (call,) = device.calls
    assert len(call) == 3 and all(a is b for a, b in zip(call, [blobs[0], blobs[2], blobs[4]], strict=True))
    assert torch.equal(batch, workers_batch(blobs, train, seeds))


def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu_counted_and_named(caplog):
    blobs = [encoded(0), encoded(1, progressive=True), encoded(2), encoded(3)]
    keys = ["shard-a.tar:cat", "shard-a.tar:dog", "shard-a.tar:owl", "shard-a.tar:eel"]
    seeds = [7, 8, 9, 10]
    device = Device(refuse=is_progressive)
    decoder = stream.DeviceDecode(CPU, device)
    with caplog.at_level(logging.WARNING, logger="job"):
        batch, failed = decoder(blobs, keys, "image", SIZE, True, seeds)
    assert failed == [] and decoder.device_failures == 1
    assert torch.equal(batch, workers_batch(blobs, True, seeds))  # the CPU decoded it as the workers do
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "shard-a.tar:dog" in lines[0] and "Failed to decode batch: 4" in lines[0], lines
    assert "more detail" not in lines[0]  # one line
    # the other three still decoded on the device: the failed call was split, not abandoned
    assert sum(len(c) for c in device.calls if not any(is_progressive(b) for b in c)) == 3


def test_a_bad_jpeg_is_isolated_in_about_two_log2_calls_and_the_rest_decode_on_the_device():
    blobs = [encoded(i, truncated=i == 11) for i in range(16)]
    device = Device(refuse=lambda b: len(b) < len(blobs[0]) * 3 // 4)  # the truncated one
    results = stream.decode_isolating(device, blobs)
    assert len(device.calls) == 1 + 2 * 4  # the batch, then both halves of each failed part down to one sample
    for i, (result, blob) in enumerate(zip(results, blobs, strict=True)):
        if i == 11:
            assert isinstance(result, RuntimeError)
        else:
            assert torch.equal(result, decode_jpeg(blob, mode=ImageReadMode.RGB))


def test_a_jpeg_no_decoder_can_read_is_a_corrupt_sample_replaced_within_its_batch(caplog):
    blobs = [encoded(0), encoded(1, truncated=True), None, encoded(3, "PNG")]
    keys = ["s:0", "s:1", "s:2 (NotReadable: not a JPEG or PNG)", "s:3"]  # a worker names why it gave no bytes
    seeds = [1, 2, 3, 4]
    decoder = stream.DeviceDecode(CPU, Device())  # torchvision fails the truncated JPEG, as nvJPEG would
    with caplog.at_level(logging.WARNING, logger="job"):
        batch, failed = decoder(blobs, keys, "image", SIZE, False, seeds)
    assert failed == ["s:1 (RuntimeError)", "s:2 (NotReadable: not a JPEG or PNG)"]
    assert decoder.device_failures == 1 and "s:1" in caplog.records[0].getMessage()
    # the batch keeps its size; fill's rule: the i-th sample's place goes to good[i % len(good)]
    good = workers_batch([blobs[0], blobs[3]], False, [1, 4])
    assert torch.equal(batch, torch.stack([good[0], good[1], good[0], good[1]]))


def test_device_decode_failures_are_logged_by_key_at_first_then_every_thousandth(caplog):
    decoder = stream.DeviceDecode(CPU, Device(refuse=lambda b: True))
    blob = encoded(0)
    total = stream.LOG_EVERY_FAILURES + 5
    with caplog.at_level(logging.WARNING, logger="job"):
        for n in range(total):  # one JPEG a batch: a lone refusal never gives the device up
            decoder([blob], [f"s:{n}"], "image", 8, False, [n])
    assert decoder.device_failures == total
    lines = [r.getMessage() for r in caplog.records]
    first = stream.LOG_FIRST_FAILURES
    assert len(lines) == first + 1, lines[-3:]
    assert all(f"s:{n} " in lines[n] for n in range(first))
    assert f"every {stream.LOG_EVERY_FAILURES}th" in lines[first - 1]
    assert f"failure {stream.LOG_EVERY_FAILURES}: s:{stream.LOG_EVERY_FAILURES - 1} " in lines[-1]


def test_a_device_that_refuses_every_jpeg_of_a_batch_is_given_up_once_and_the_cpu_decodes_the_rest(caplog):
    device = Device(refuse=lambda b: True)
    decoder = stream.DeviceDecode(CPU, device)
    blobs = [encoded(i) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="job"):
        first, _ = decoder(blobs, [f"s:{i}" for i in range(4)], "image", SIZE, True, [0, 1, 2, 3])
        calls = len(device.calls)
        second, _ = decoder(blobs, [f"s:{i}" for i in range(4)], "image", SIZE, True, [4, 5, 6, 7])
    assert len(device.calls) == calls  # no more calls to a device that read nothing
    assert torch.equal(first, workers_batch(blobs, True, [0, 1, 2, 3]))
    assert torch.equal(second, workers_batch(blobs, True, [4, 5, 6, 7]))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "JOB_DECODE=workers" in errors[0]


def test_idx_samples_never_reach_the_jpeg_decoder():
    pngs = []
    for seed in range(3):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, "PNG")
        pngs.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    device = Device()
    batch, failed = stream.DeviceDecode(CPU, device)(pngs, ["a", "b", "c"], "idx", (28, 28), True, [0, 1, 2])
    assert device.calls == [] and failed == [] and batch.shape == (3, 1, 28, 28)
    assert torch.equal(batch, torch.stack([stream.decode(b, "idx", (28, 28), True, 0) for b in pngs]))


# --- through a ShardSource: the same batches and corrupt samples as the workers' --------------------

def shard_source(tmp_path, decode: str) -> stream.ShardSource:
    samples = [("cat", encoded(0)), ("dog", encoded(1, progressive=True)), ("owl", encoded(2, truncated=True)),
               ("eel", encoded(3, "PNG")), ("ant", encoded(4)), ("bee", encoded(5))]
    blob = tar_shard([(key, bytes(b.numpy()), i % 2) for i, (key, b) in enumerate(samples)], "jpg")
    (tmp_path / "store").mkdir(exist_ok=True)
    (tmp_path / "store" / "train-000000.tar").write_bytes(blob)
    shards = [{"name": "train-000000.tar", "samples": len(samples), "bytes": len(blob),
               "sha256": hashlib.sha256(blob).hexdigest()}]
    cache = ShardCache(str(tmp_path / "store"), str(tmp_path / f"cache-{decode}"), 10**8, shards, classes=2)
    return stream.ShardSource(shards, cache, "image", SIZE, normalize=False, workers=0, device=CPU, seed=3,
                              max_pixels=10**6, augment=True, decode=decode)


def test_a_shard_source_decoding_on_the_device_gives_the_workers_batches_and_skips(tmp_path, caplog):
    """The device refuses the progressive JPEG and the truncated one; the CPU decodes the first
    and not the second, which is skipped, named and counted as the workers' path does."""
    runs = {}
    for decode in ("workers", "device"):
        source = shard_source(tmp_path, decode)
        if decode == "device":
            device = Device(refuse=lambda b: is_progressive(b) or not bytes(b[-2:].numpy()) == b"\xff\xd9")
            source.device_decode = stream.DeviceDecode(CPU, device)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="job"):
            batches = [x for x, _ in source.batches(torch.arange(6), batch_size=3, train=True, epoch=1)]
        lines = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
        runs[decode] = (batches, source.skipped, lines)
    (workers, workers_skipped, workers_lines), (device_batches, skipped, lines) = runs["workers"], runs["device"]
    assert all(torch.equal(a, b) for a, b in zip(device_batches, workers, strict=True))
    assert skipped == workers_skipped == 1 and lines == workers_lines
    assert len(lines) == 1 and "train-000000.tar:owl" in lines[0]
    assert source.device_decode.device_failures == 2
    # [cat dog owl] fails, [cat] decodes, [dog owl], [dog] and [owl] fail; then [ant bee] (eel is a PNG)
    assert [len(c) for c in device.calls] == [3, 1, 2, 1, 1, 2]


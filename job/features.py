"""Feature cache for frozen backbones: with JOB_FREEZE=all and no augmentation the backbone maps
each image to the same features every epoch, so compute them once, keep them (local cache and
<run>/cache/ in object storage, keyed by the backbone's weights, the transform and the dataset),
and train the head on them as an in-memory source. Checkpoints still hold the whole model."""

import hashlib
import io
import logging
import os
import time

import torch
from torch import nn

from job import checkpoint, stop, storage
from job.data import Data
from job.data.sources import TensorSource
from job.errors import OutputError

log = logging.getLogger("job")
VERSION = 2  # bump when what is cached changes (2: the labels too, read with the features)


def applicable(settings, data: Data) -> bool:
    """Frozen backbone, no augmentation, and samples that cost a decode per epoch."""
    return (settings.feature_cache == "auto" and settings.freeze == "all" and not settings.augment
            and not data.samples.in_memory)


def cache_key(model_name: str, image_size: int, model: nn.Module, head: str, fingerprint: str) -> str:
    digest = hashlib.sha256(f"v{VERSION} {model_name} {image_size} {fingerprint}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(head + "."):
            digest.update(name.encode() + tensor.cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def compute(model: nn.Module, head: str, source, batch_size: int, autocast, what: str,
            log_every: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the head's inputs, the labels) for every sample of `source`, in order: the model with its
    head swapped for Identity. Logs progress (done/total, rate, ETA) every `log_every` seconds."""
    head_module = model.get_submodule(head)
    model.set_submodule(head, nn.Identity())
    model.eval()
    total, out, labels = len(source), [], []
    start = last = time.monotonic()
    try:
        for xb, yb in source.batches(torch.arange(total), batch_size, train=False):
            stop.check("while computing the feature cache: nothing to save yet")
            with autocast():
                out.append(model(xb).float().cpu())
            labels.append(yb.cpu())
            now = time.monotonic()
            if now - last >= log_every:
                last = now
                done = sum(len(o) for o in out)
                rate = done / (now - start)
                log.info(f"feature cache: {what} {done}/{total} images ({100 * done / total:.0f}%), "
                         f"{rate:.1f} images/s, elapsed {now - start:.0f} s, ETA {(total - done) / rate:.0f} s")
        return torch.cat(out), torch.cat(labels)
    finally:
        model.set_submodule(head, head_module)


def cached(data: Data, model: nn.Module, head: str, *, model_name: str, image_size: int, batch_size: int,
           device: torch.device, autocast, cache_dir: str, run_uri: str, publish: bool, log_every: float) -> Data:
    """The dataset as backbone features (in-memory sources), from a cache when one holds them;
    computed otherwise, and then published to <run>/cache/ when `publish` (rank 0)."""
    key = cache_key(model_name, image_size, model, head, data.fingerprint)
    local = os.path.join(cache_dir, "features", f"{key}.pt")
    remote = storage.join(run_uri, "cache", f"features-{key}.pt")
    blob = None
    if os.path.exists(local):
        log.info(f"feature cache: using {local}")
        with open(local, "rb") as f:
            blob = f.read()
    elif storage.exists(remote):
        log.info(f"feature cache: using {storage.redact_uri(remote)}")
        blob = storage.read_bytes(remote)
    if blob is not None:
        features = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    else:
        log.info(f"feature cache: computing backbone features of {len(data.samples)} images"
                 f"{f' and {len(data.test)} test images' if data.test is not None else ''} (once)")
        features = dict(zip(("x", "y"), compute(model, head, data.samples, batch_size, autocast, "images", log_every),
                            strict=True))
        if data.test is not None:
            features["test_x"], features["test_y"] = compute(
                model, head, data.test, batch_size, autocast, "test images", log_every
            )
        blob = checkpoint.serialize(features)
        if publish:
            with storage.errors(remote, OutputError, "write feature cache to"):
                storage.write_bytes(remote, blob)
    if not os.path.exists(local):
        storage.write_bytes(local, blob)

    def source(x, labels):
        return TensorSource(x.to(device), labels.to(device))

    return Data(
        source(features["x"], features["y"]),
        source(features["test_x"], features["test_y"]) if data.test is not None else None,
        data.class_names,
        data.fingerprint,
        data.split,
        data.bad_files,
        data.files,
    )

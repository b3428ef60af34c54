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
from job.errors import OutputError, SettingsError
from job.report import phase

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


# The feature pass's batch size: the frozen backbone runs without autograd, keeping no activations
# for a backward pass, and JOB_BATCH_SIZE was chosen for training the head alone; so batches as
# large as the pixels of 256 images of 224x224 (154 MB of float32 input, a budget for the
# activations in flight too), at most 1024 images and never fewer than JOB_BATCH_SIZE.
FEATURE_BATCH_PIXELS = 256 * 224 * 224
MAX_FEATURE_BATCH = 1024


def inference_batch_size(batch_size: int, image_size: int) -> int:
    return max(batch_size, min(MAX_FEATURE_BATCH, FEATURE_BATCH_PIXELS // (image_size * image_size)))


@torch.no_grad()
def compute(model: nn.Module, head: str, source, batch_size: int, autocast, what: str,
            log_every: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the head's inputs, the labels) for every sample of `source`, in order: the model with its
    head swapped for Identity. Logs the pass as a phase: progress (done/total, rate, ETA) every
    `log_every` seconds from its start, however long one batch takes (a batch of up to
    MAX_FEATURE_BATCH images through a backbone is often the whole pass).

    The results stay where the batches are (the device), written into tensors made at the first
    batch: nothing waits for the device until the caller reads them, once. A copy to the CPU per
    batch waited for each batch's forward pass (and the training loop holds the features on the
    device anyway)."""
    head_module = model.get_submodule(head)
    model.set_submodule(head, nn.Identity())
    model.eval()
    total, done = len(source), 0
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    start = time.monotonic()

    def progress() -> str:
        elapsed = time.monotonic() - start
        if not done:
            return f"0/{total}, elapsed {elapsed:.0f} s"
        rate = done / elapsed
        return (f"{done}/{total} ({100 * done / total:.0f}%), {rate:.1f} images/s, elapsed {elapsed:.0f} s, "
                f"ETA {(total - done) / rate:.0f} s")

    try:
        with phase(f"feature cache: {what}", log_every, progress):
            for xb, yb in source.batches(torch.arange(total), batch_size, train=False):
                stop.check("while computing the feature cache: nothing to save yet")
                with autocast():
                    out = model(xb)
                if x is None or y is None:
                    x = torch.empty((total, *out.shape[1:]), dtype=torch.float32, device=out.device)
                    y = torch.empty(total, dtype=yb.dtype, device=yb.device)
                x[done:done + len(out)] = out  # float32, as the head trains on them
                y[done:done + len(yb)] = yb
                done += len(yb)
        if x is None or y is None or done != total:
            raise RuntimeError(f"the feature pass read {done} of {total} {what}")  # a source's bug, not the data's
        return x, y
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
        batch = inference_batch_size(batch_size, image_size)
        log.info(f"feature cache: computing backbone features of {len(data.samples)} images"
                 f"{f' and {len(data.test)} test images' if data.test is not None else ''} (once), "
                 f"in batches of {batch}")
        try:
            computed = compute(model, head, data.samples, batch, autocast, "train and val images", log_every)
        except SettingsError as exc:  # raised before the first batch: a shard cache sized for training's batches
            if batch == batch_size:
                raise
            log.info(f"feature cache: {str(exc).split(':')[0]} for batches of {batch}: "
                     f"computing in batches of JOB_BATCH_SIZE={batch_size}")
            batch = batch_size
            computed = compute(model, head, data.samples, batch, autocast, "train and val images", log_every)
        features = dict(zip(("x", "y"), computed, strict=True))
        if data.test is not None:
            features["test_x"], features["test_y"] = compute(
                model, head, data.test, batch, autocast, "test images", log_every
            )
        with phase("feature cache: saving the features", log_every):
            blob = checkpoint.serialize({k: v.cpu() for k, v in features.items()})  # the one read of the device
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

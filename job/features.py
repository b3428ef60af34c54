"""Feature cache for frozen backbones: with JOB_FREEZE=all and no augmentation the backbone maps
each image to the same features every epoch, so compute them once, keep them (local cache and
<run>/cache/ in object storage, keyed by the backbone's weights, the transform and the dataset),
and train the head on them as an in-memory dataset. Checkpoints still hold the whole model."""

import hashlib
import io
import logging
import os

import torch
from torch import nn

from job import checkpoint, data, storage
from job.errors import OutputError

log = logging.getLogger("job")
VERSION = 1  # bump when what is cached changes


def applicable(settings, dataset: data.Data) -> bool:
    return (settings.feature_cache == "auto" and settings.freeze == "all" and not settings.augment
            and not isinstance(dataset.x, torch.Tensor))


def cache_key(settings, model: nn.Module, head: str, dataset: data.Data) -> str:
    digest = hashlib.sha256(f"v{VERSION} {settings.model} {settings.image_size} {dataset.fingerprint}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(head + "."):
            digest.update(name.encode() + tensor.cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def compute(model: nn.Module, head: str, x, y, settings, device, amp) -> torch.Tensor:
    """The head's inputs for every item, in order: the model with its head swapped for Identity."""
    head_module = model.get_submodule(head)
    model.set_submodule(head, nn.Identity())
    model.eval()
    try:
        out = []
        for xb, _ in data.batches(x, y, torch.arange(len(y)), settings.batch_size, False, settings, device):
            with amp():
                out.append(model(xb).float().cpu())
        return torch.cat(out)
    finally:
        model.set_submodule(head, head_module)


def features_data(job) -> data.Data:
    """The job's dataset as backbone features, from a cache when one holds them."""
    s, d = job.settings, job.data
    key = cache_key(s, job.model, job.head, d)
    local = os.path.join(s.cache_dir, "features", f"{key}.pt")
    remote = storage.join(job.run_uri, "cache", f"features-{key}.pt")
    blob = None
    if os.path.exists(local):
        log.info(f"feature cache: using {local}")
        with open(local, "rb") as f:
            blob = f.read()
    elif storage.exists(remote):
        log.info(f"feature cache: using {storage.redact_uri(remote)}")
        blob = storage.read_bytes(remote)
    if blob is not None:
        cached = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    else:
        log.info(f"feature cache: computing backbone features of {len(d.y)} images"
                 f"{f' and {len(d.test_y)} test images' if d.test_x is not None else ''} (once)")
        cached = {"x": compute(job.model, job.head, d.x, d.y, s, job.runtime.device, job.autocast)}
        if d.test_x is not None:
            cached["test_x"] = compute(job.model, job.head, d.test_x, d.test_y, s, job.runtime.device, job.autocast)
        blob = checkpoint.serialize(cached)
        if job.runtime.is_main:
            with storage.errors(remote, OutputError, "write feature cache to"):
                storage.write_bytes(remote, blob)
    if not os.path.exists(local):
        storage.write_bytes(local, blob)
    device = job.runtime.device
    test_x = cached["test_x"].to(device) if "test_x" in cached else None
    test_y = d.test_y.to(device) if d.test_y is not None else None
    return data.Data(cached["x"].to(device), d.y.to(device), test_x, test_y, d.class_names, d.fingerprint, d.split,
                     d.bad_files, d.files)

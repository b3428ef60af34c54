"""What runs beside the training step without waiting for the device or the other ranks, in
process: evaluation and the feature pass give exactly what a plain loop computes (on a GPU, also
with no host-device sync per batch), DDP copies buffers between ranks only where training changes
one, and node_first's waits in the process group's store end on a failure, a stop or a silent rank."""

import contextlib
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from job import features, loop, models, run
from job.data import sources
from job.errors import JobError, PeerLostError, Stopped
from job.runtime import NodeWait, Runtime
from job.settings import Settings
from job.stop import StopRequest

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(),
                            reason="needs a GPU: torch's sync debug mode counts host-device syncs on CUDA alone")


@pytest.fixture
def digits(digits_arrays):
    x = torch.from_numpy(digits_arrays["train_images"].copy()).unsqueeze(1).float().div_(255)
    y = torch.from_numpy(digits_arrays["train_labels"].astype(np.int64))
    return x, y


def mlp(settings) -> nn.Module:
    torch.manual_seed(0)
    return models.build_model(settings, (1, 28, 28), 10)[0]


def evaluation(settings, device, x, y, idx, batch_size):
    source = sources.TensorSource(x.to(device), y.to(device))
    source.eval_batch_size = batch_size
    module = mlp(settings).to(device)
    model = loop.Model(module, module, head="3")
    return loop.evaluate(settings, Runtime(torch.device(device)), model, source, idx, 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("limit", [0, 3])
def test_evaluation_equals_a_plain_loop(digits, device, limit):
    x, y = digits
    settings = Settings(data_uri="/unused", hidden_sizes=[32], limit_val_batches=limit)
    _, idx = sources.split_indices(len(x), 0.2, 0)  # 287 samples: 8 batches of 37, the last of 28
    loss, accuracy, confusion = evaluation(settings, device, x, y, idx, 37)

    scored = idx[: 37 * limit] if limit else idx
    with torch.no_grad():
        logits = mlp(settings).eval()(x[scored])
    expected = torch.bincount(y[scored] * 10 + logits.argmax(1), minlength=100).view(10, 10)
    assert torch.equal(confusion, expected)
    assert confusion.device.type == "cpu" and confusion.dtype == torch.int64
    assert accuracy == float(expected.diagonal().sum()) / len(scored)
    assert loss == pytest.approx(F.cross_entropy(logits, y[scored]).item(), rel=1e-5)


def syncs(fn) -> int:
    """How many times fn() made the host wait for the GPU (torch's sync debug mode warns each time)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@ON_GPU
def test_evaluation_waits_for_the_gpu_once_per_evaluation_not_per_batch(digits):
    x, y, device = *digits, "cuda"
    settings = Settings(data_uri="/unused", hidden_sizes=[32])
    _, idx = sources.split_indices(len(x), 0.2, 0)
    few, many = (syncs(lambda b=b: evaluation(settings, device, x, y, idx, b)) for b in (287, 7))  # 1 and 41 batches
    assert few == many, (few, many)


def backbone(image_size: int) -> tuple[nn.Module, str]:
    settings = Settings(data_uri="/unused", model="resnet18", pretrained="none")
    torch.manual_seed(0)
    module, head = models.build_model(settings, (3, image_size, image_size), 3)
    with torch.no_grad():  # batch-norm statistics as a pretrained backbone has them, not the identity
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return module, head


@pytest.mark.parametrize("device", DEVICES)
def test_the_feature_pass_equals_a_plain_loop_at_the_training_batch_size(device):
    """The pass runs at the inference batch size into tensors on the device; a plain loop at the
    training batch size, copying each batch to the CPU, is the reference."""
    module, head = backbone(32)
    images = torch.rand(70, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (70,), generator=torch.Generator().manual_seed(2))
    reference = copy.deepcopy(module).eval()
    reference.set_submodule(head, nn.Identity())
    with torch.no_grad():
        expected = torch.cat([reference(xb) for xb in images.split(16)])

    module.to(device)
    source = sources.TensorSource(images.to(device), labels.to(device))
    batch = features.inference_batch_size(16, 32)
    x, y = features.compute(module, head, source, batch, contextlib.nullcontext, "images", 60.0)
    assert x.device.type == device and x.dtype == torch.float32  # kept on the device, read once by the caller
    assert torch.equal(y.cpu(), labels)
    torch.testing.assert_close(x.cpu(), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(module.get_submodule(head), nn.Linear)  # the head is back


@ON_GPU
def test_the_feature_pass_does_not_wait_for_the_gpu_per_batch():
    device = "cuda"
    module, head = backbone(32)
    module.to(device)
    images, labels = torch.rand(70, 3, 32, 32, device=device), torch.randint(0, 3, (70,), device=device)
    source = sources.TensorSource(images, labels)
    few, many = (syncs(lambda b=b: features.compute(module, head, source, b, contextlib.nullcontext, "images", 60.0))
                 for b in (70, 4))
    assert few == many, (few, many)


def test_the_feature_pass_takes_larger_batches_than_training():
    assert features.inference_batch_size(32, 224) == 256  # the transfer-learning default
    assert features.inference_batch_size(32, 32) == features.MAX_FEATURE_BATCH
    assert features.inference_batch_size(16, 448) == 64
    assert features.inference_batch_size(512, 224) == 512  # never fewer than JOB_BATCH_SIZE


@pytest.mark.parametrize("case, trains", [
    ("mlp", False),  # no buffers at all
    ("resnet18 frozen", False),  # every batch norm in eval mode
    ("resnet18 head on cached features", False),  # only the Linear head runs
    ("resnet18 last stage trains", True),  # layer4's batch norms update their statistics
    ("resnet18 whole", True),
])
def test_ddp_copies_buffers_only_where_training_changes_one(case, trains):
    name = case.split()[0]
    settings = Settings(data_uri="/unused", model=name, pretrained="none")
    module, head = models.build_model(settings, (1, 28, 28) if name == "mlp" else (3, 32, 32), 3)
    freeze = "all" if "frozen" in case or "features" in case else "1" if "last stage" in case else "none"
    frozen = models.freeze(module, head, freeze)
    model = loop.Model(module, module, head, frozen, on_features="features" in case)
    model.net = model.trainable
    assert run.buffers_train(model) is trains


@pytest.fixture
def store_group():
    """A one-process gloo group: its store is the one node_first waits in."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def node_wait(name: str, stop: StopRequest | None = None, timeout: float = 0.5) -> NodeWait:
    settings = Settings(data_uri="/unused", dist_timeout_seconds=timeout, log_every_seconds=0.1)
    runtime = Runtime(torch.device("cpu"), stop=stop or StopRequest(), rank=0, local_rank=0, world_size=2)
    return NodeWait(settings, runtime, name)


def test_a_wait_ends_with_the_failure_another_rank_posted(store_group):
    other, wait = node_wait("a"), node_wait("a")
    other.fail(3)
    other.fail(75)  # the first failure's code stays
    with pytest.raises(JobError, match=r"another rank failed \(exit 3\)") as failed:
        wait.until(lambda: False, "the other ranks", [0])
    assert failed.value.exit_code == 3


def test_a_wait_answers_a_stop(store_group):
    stop = StopRequest()
    stop.record(15)
    with pytest.raises(Stopped, match="while waiting for local rank 0 \\(b\\)"):
        node_wait("b", stop).until(lambda: False, "local rank 0", [0])


def test_a_wait_ends_when_a_rank_stops_beating(store_group):
    """Rank 1 never beats: after JOB_DIST_TIMEOUT_SECONDS of silence the wait is a lost peer (exit
    75), however long the node-local work itself may take; rank 0 beats (every half second here),
    so it is never the one."""
    wait = node_wait("c", timeout=2)
    with wait.beating(), pytest.raises(PeerLostError, match="rank 1 has not answered"):
        wait.until(lambda: False, "the other ranks", [0, 1])


def test_a_wait_ends_when_every_rank_is_done(store_group):
    first, wait = node_wait("d"), node_wait("d")
    first.post(first=True)
    wait.until(lambda: wait.has("first/0"), "local rank 0", [0])
    first.post(first=False)
    wait.until(lambda: wait.done() == 2, "the other ranks", [0, 1])

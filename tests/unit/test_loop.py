"""The training loop's bookkeeping, in process on the real digits: the batches it trains on and
the train_loss / train_accuracy it reports must be exactly what a plain loop over the same order
computes, whatever the gather chunk and however often the step sums are folded."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from job import loop
from job.data import Data
from job.data import sources as data
from job.models import build_model
from job.optim import build_optimizer
from job.runtime import Runtime
from job.settings import Settings


@pytest.fixture
def digits(digits_arrays):
    x = torch.from_numpy(digits_arrays["train_images"].copy()).unsqueeze(1).float().div_(255)
    y = torch.from_numpy(digits_arrays["train_labels"].astype(np.int64))
    return x, y


@pytest.mark.parametrize("gather_bytes", [1, 5 * 100 * 784 * 4, 1 << 30])  # a batch, 5 batches, all at once
def test_batches_follow_the_order_exactly(digits, monkeypatch, gather_bytes):
    x, y = digits
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:1234]
    monkeypatch.setattr(data, "GATHER_BYTES", gather_bytes)
    seen = 0
    for xb, yb in data.TensorSource(x, y).batches(order, 100, train=True):
        expected = order[seen:seen + 100]
        assert torch.equal(xb, x[expected]) and torch.equal(yb, y[expected])
        seen += len(yb)
    assert seen == len(order)  # 12 full batches and a last one of 34


@pytest.mark.parametrize("fold_elements", [1, 7 * 100 * 10, 1 << 30])  # every step, every 7 steps, once
def test_reported_train_metrics_equal_a_plain_loop(digits, monkeypatch, fold_elements):
    x, y = digits
    monkeypatch.setattr(loop.StepSums, "FOLD_ELEMENTS", fold_elements)
    monkeypatch.setattr(data, "GATHER_BYTES", 3 * 100 * 784 * 4)
    settings = Settings(data_uri="/unused", batch_size=100, lr=0.1, hidden_sizes=[32], lr_schedule="constant")
    train_idx, val_idx = data.split_indices(len(x), 0.2, settings.seed)

    def fresh_model():
        torch.manual_seed(0)
        return build_model(settings, (1, 28, 28), 10)[0]

    module = fresh_model()
    model = loop.Model(module, module, head="3")
    state = loop.TrainState(build_optimizer(settings, module.parameters()), None, train_idx, val_idx)
    digits_data = Data(data.TensorSource(x, y), None, [str(i) for i in range(10)], "digits")
    train_loss, train_accuracy, _ = loop.train_one_epoch(settings, Runtime(torch.device("cpu")), model, digits_data,
                                                         state, ckpt=None)

    reference = fresh_model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    order = data.epoch_order(train_idx, settings.seed, 0)
    loss_sum, correct = 0.0, 0
    for i in range(0, len(order), 100):
        xb, yb = x[order[i:i + 100]], y[order[i:i + 100]]
        logits = reference(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
    assert len(order) % 100 != 0  # the short last batch is weighted by its size
    assert train_loss == pytest.approx(loss_sum / len(order), rel=1e-6)
    assert train_accuracy == correct / len(order)
    assert state.progress.count == len(order) and state.progress.seen == len(order)
    for a, b in zip(module.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)  # the same steps on the same batches

"""The training loop: train_one_epoch, evaluate and fit, on any data source.

Single process or under torchrun: every rank runs this same code (the Runtime's collectives are
no-ops in one process). No storage here: fit is handed a checkpointer (job.checkpoint) and calls
its save() at step and epoch edges and its stop() when a signal asks the run to end.
"""

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from job import models
from job.data import Data
from job.data.sources import shard
from job.errors import DivergedError, Stopped, StoppedWaitingForData
from job.optim import lr_factor, set_lr
from job.report import duration, format_row
from job.runtime import Runtime, StopPoll
from job.settings import CONTINUOUS_SCHEDULES

log = logging.getLogger("job")


@dataclass
class Progress:
    """Where the loop is. Saved in every checkpoint so a resume continues exactly, mid-epoch too,
    with any number of processes: the position is counted in samples of the epoch's order."""

    epoch: int = 0  # epochs completed
    seen: int = 0  # samples of this epoch's order already trained on (all ranks together)
    global_step: int = 0  # optimizer steps so far (names checkpoints)
    loss_sum: float = 0.0  # sums over the epoch in progress, all ranks, so a mid-epoch resume
    correct: int = 0  # reports the same epoch metrics as an uninterrupted run
    count: int = 0
    epoch_lr: float = 0.0  # lr at the start of the epoch in progress (the history's `lr`)


@dataclass
class Model:
    """The model and how the loop runs it."""

    module: nn.Module  # the whole plain model: what checkpoints hold
    net: nn.Module  # what training calls: `trainable`, in DDP when distributed, compiled with JOB_COMPILE
    head: str  # the classifier head's module name
    frozen: list = field(default_factory=list)  # modules JOB_FREEZE froze: kept in eval mode while training
    on_features: bool = False  # batches are cached backbone features: only the head runs

    @property
    def trainable(self) -> nn.Module:
        """What batches go through, unwrapped (evaluation calls it): the model, or its head."""
        return self.module.get_submodule(self.head) if self.on_features else self.module

    def train_mode(self) -> None:
        if self.frozen and not self.on_features:
            models.train_mode(self.module, self.head, self.frozen)
        else:
            self.net.train()


@dataclass
class TrainState:
    """Everything training changes, and every checkpoint holds (with the model's weights)."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only: scales the loss so small gradients survive
    train_idx: torch.Tensor  # the split, as sample indices
    val_idx: torch.Tensor
    progress: Progress = field(default_factory=Progress)
    history: list = field(default_factory=list)  # one row per completed epoch
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    val_confusion: torch.Tensor | None = None  # of the last evaluation: rows true classes, columns predictions
    settings_changes: list = field(default_factory=list)  # schedule settings changed at a resume, and where


def train_one_epoch(s, rt: Runtime, model: Model, data: Data, state: TrainState, ckpt) -> tuple[float, float, float]:
    """Train from the current position to the end of the epoch.

    Returns (train_loss, train_accuracy, train_samples_per_second). A signal is noticed within a
    few steps (StopPoll) and answered with a checkpoint at that step edge."""
    p = state.progress
    order = data.samples.order(state.train_idx, s.seed, p.epoch)[p.seen:]
    mine = shard(order, s.batch_size, rt.rank, rt.world_size)
    if s.log_level == "debug":
        log.debug(f"rank {rt.rank} epoch {p.epoch + 1} from sample {p.seen} shard {mine.tolist()}")
    start_seen, block, epoch_size = p.seen, s.batch_size * rt.world_size, len(state.train_idx)
    steps = math.ceil(len(mine) / s.batch_size) if not s.limit_train_batches else s.limit_train_batches
    sums, autocast, poll = StepSums(rt.device), rt.autocast(), StopPoll(rt)
    lr_per_step = s.lr_schedule in CONTINUOUS_SCHEDULES  # the others change the lr only between epochs
    lr = set_lr(state.optimizer, s, p.epoch + p.seen / epoch_size)
    model.train_mode()
    start = last_log = time.monotonic()
    batches = enumerate(data.samples.batches(mine, s.batch_size, train=True, epoch=p.epoch), start=1)
    for step, (x, y) in stop_if_stalled(batches, rt, p, sums, ckpt):
        if lr_per_step:
            lr = set_lr(state.optimizer, s, p.epoch + p.seen / epoch_size)
        # A compiled model runs the epoch's last, partial batch eagerly: its shape would cost a second
        # graph (resnet18 on the CPU: 38 s to compile the first, 22 s more for that one) for one step
        eager = torch.compiler.set_stance("force_eager") if len(y) < s.batch_size else contextlib.nullcontext()
        with autocast, eager:
            logits = model.net(x)
            loss = F.cross_entropy(logits.float(), y)
        state.optimizer.zero_grad(set_to_none=True)
        if state.scaler is not None:
            state.scaler.scale(loss).backward()
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            loss.backward()
            state.optimizer.step()
        sums.add(loss, logits, y)
        p.seen, p.global_step = start_seen + min(step * block, len(order)), p.global_step + 1

        signum, every = poll(step), s.checkpoint_every_steps
        if signum or (every and p.global_step % every == 0):
            add_sums(rt, p, sums)
            check_finite(p.loss_sum, p)
            saving = ckpt.save()
            if signum:
                ckpt.stop(signum, saving)
        if time.monotonic() - last_log >= s.log_every_seconds:
            last_log = time.monotonic()
            elapsed = last_log - start
            rate = (p.seen - start_seen) / elapsed
            epoch_eta = (epoch_size - p.seen) / rate
            run_eta = epoch_eta + (s.epochs - p.epoch - 1) * epoch_size / rate  # training time; evaluation comes on top
            log.info(f"epoch {p.epoch + 1}/{s.epochs} step {step}/{steps} ({100 * p.seen / epoch_size:.0f}%) "
                     f"train_loss={loss.item():.4f} lr={lr:.4g} {rate:,.1f} samples/s, elapsed {duration(elapsed)}, "
                     f"epoch ETA {duration(epoch_eta)}, run ETA {duration(run_eta)}, {rt.peak_memory()}")
        if step == s.limit_train_batches:  # JOB_LIMIT_TRAIN_BATCHES (smoke runs): the epoch ends here
            p.seen = start_seen + len(order)
            break
    poll.finish()  # a signal it carried is seen again at the epoch's end (Runtime.stop_signal)
    add_sums(rt, p, sums)
    seconds = time.monotonic() - start
    return p.loss_sum / max(p.count, 1), p.correct / max(p.count, 1), (p.seen - start_seen) / max(seconds, 1e-9)


def stop_if_stalled(batches, rt: Runtime, p: Progress, sums: "StepSums", ckpt):
    """The batches; a stop signal that arrives while the next batch is stuck (a stalled shard
    download) is answered with a checkpoint of the last step edge, as at a poll. Under torchrun
    the other ranks wait in a collective this rank cannot join (saving takes collectives too),
    so that rank ends at once and the newest checkpoint stays the valid one."""
    try:
        yield from batches
    except StoppedWaitingForData as stopped:
        if alone_in_stall(rt, stopped):
            raise
        log.warning(f"{stopped}: saving the last step")
        add_sums(rt, p, sums)
        check_finite(p.loss_sum, p)
        ckpt.stop(stopped.signum, ckpt.save())


def alone_in_stall(rt: Runtime, stopped: Stopped) -> bool:
    """A stop met while this rank alone waited for data, under torchrun: no collective can follow."""
    return isinstance(stopped, StoppedWaitingForData) and rt.world_size > 1


class StepSums:
    """The loss and accuracy sums of the steps since the last add_sums, kept on the device (no
    sync per step). A step only keeps its loss, logits and targets; they are reduced together
    once FOLD_ELEMENTS logits have piled up (or when read). Reducing every step (argmax, compare,
    sum, add) cost a small MLP ~10% of its CPU throughput in scripts/bench_mlp.py."""

    FOLD_ELEMENTS = 1 << 20  # 4 MB of float logits: one fold per epoch of MNIST, a few steps of ImageNet

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.kept = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.steps.append((loss.detach(), logits.detach(), y))
        self.count += len(y)
        self.kept += logits.numel()
        if self.kept >= self.FOLD_ELEMENTS:
            self.fold()

    def fold(self) -> None:
        if not self.steps:
            return
        losses, logits, ys = zip(*self.steps, strict=True)
        device = self.loss_sum.device
        # pinned on CUDA, so the copy is asynchronous and the GPU is never waited for
        sizes = torch.tensor([len(y) for y in ys], dtype=torch.float64, pin_memory=device.type == "cuda")
        self.loss_sum += torch.stack(losses).double() @ sizes.to(device, non_blocking=True)  # losses are batch means
        # max().indices is argmax (the first maximum) and ~1.5x faster on CPU
        self.correct += (torch.cat(logits).max(1).indices == torch.cat(ys)).sum()
        self.steps, self.kept = [], 0

    def take(self) -> tuple[float, int, int]:
        """(loss sum, correct, count) so far, and start again from zero."""
        self.fold()
        taken = self.loss_sum.item(), int(self.correct.item()), self.count
        self.loss_sum.zero_(), self.correct.zero_()
        self.count = 0
        return taken


def add_sums(rt: Runtime, p: Progress, sums: StepSums) -> None:
    """Fold the steps since the last call into the progress, summed over ranks (one sync), so
    every rank holds the whole epoch's sums so far."""
    total = rt.sum(*sums.take())
    p.loss_sum, p.correct, p.count = p.loss_sum + total[0], p.correct + int(total[1]), p.count + int(total[2])


@torch.no_grad()
def evaluate(s, rt: Runtime, model: Model, source, idx: torch.Tensor, num_classes: int,
             what: str = "val") -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, confusion matrix) over the samples `idx` of `source`: each rank
    scores its share, then sums and counts are added up over ranks (never an average of
    averages). Sums stay on the device (no sync per batch). A signal abandons the evaluation
    (Stopped, on every rank)."""
    mine = idx[rt.rank::rt.world_size]
    model.trainable.eval()
    batch_size = source.eval_batch_size or s.batch_size
    batches = math.ceil(len(mine) / batch_size)
    if s.limit_val_batches:
        batches = min(s.limit_val_batches, batches)
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=rt.device)
    start = last_log = time.monotonic()
    for i, (xb, yb) in enumerate(source.batches(mine, batch_size, train=False)):
        rt.stop.check("while evaluating: nothing written")  # `python -m job evaluate`; training polls below
        if rt.stop.signum or i == s.limit_val_batches > 0:  # a local signal (ranks agree below), or the limit
            break
        with rt.autocast():
            logits = model.trainable(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        # counted in place: a bincount with minlength allocated the whole matrix again every batch
        confusion.index_add_(0, yb * num_classes + logits.argmax(1), torch.ones_like(yb))
        if time.monotonic() - last_log >= s.log_every_seconds:
            last_log = time.monotonic()
            elapsed = last_log - start
            log.info(
                f"evaluating {what}: batch {i + 1}/{batches} ({100 * (i + 1) / batches:.0f}%), "
                f"elapsed {duration(elapsed)}, ETA {duration(elapsed / (i + 1) * (batches - i - 1))}"
            )
    signum = rt.stop_signal()
    if signum:
        raise Stopped(signum, f"during {what} evaluation")
    # all ranks' samples in one reduction and one read of the device: the counts as float64 (exact
    # up to 2**53) beside the loss sum
    totals = rt.reduce(torch.cat([confusion.double(), loss_sum.view(1)])).cpu()
    confusion = totals[:-1].long().view(num_classes, num_classes)
    count = float(confusion.sum())
    return float(totals[-1]) / count, float(confusion.diagonal().sum()) / count, confusion


def check_finite(loss_sum: float, p: Progress) -> None:
    """A NaN/inf loss must stop the run before the poisoned weights reach a checkpoint."""
    if not math.isfinite(loss_sum):
        raise DivergedError(
            f"training diverged: non-finite loss in epoch {p.epoch + 1} by sample {p.seen}; "
            "the last good checkpoint is kept. Lower JOB_LR or check the data"
        )


def fit(s, rt: Runtime, model: Model, data: Data, state: TrainState, ckpt) -> list[dict]:
    """Train until JOB_EPOCHS epochs are in the history; returns the history."""
    p = state.progress
    warn_if_few_steps(s, rt, len(state.train_idx))
    mark = time.monotonic()  # end of the previous epoch: epoch_seconds counts everything since
    while p.epoch < s.epochs:
        if p.seen == 0:
            p.epoch_lr = s.lr * lr_factor(s, p.epoch)
        else:
            log.info(f"continuing epoch {p.epoch + 1} at sample {p.seen}/{len(state.train_idx)}")
        train_start = time.monotonic()
        train_loss, train_accuracy, samples_per_second = train_one_epoch(s, rt, model, data, state, ckpt)
        check_finite(train_loss, p)
        val_start = time.monotonic()
        try:
            val_loss, val_accuracy, state.val_confusion = evaluate(
                s, rt, model, data.samples, state.val_idx, data.num_classes
            )
        except Stopped as stopped:
            if alone_in_stall(rt, stopped):
                raise
            ckpt.stop(stopped.signum, ckpt.save())  # position: this epoch trained, not yet evaluated
        now = time.monotonic()
        row = {
            "epoch": p.epoch + 1,
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": p.epoch_lr,
            "train_seconds": val_start - train_start,
            "val_seconds": now - val_start,
            "epoch_seconds": now - mark,
            "train_samples_per_second": samples_per_second,
        }
        mark = now
        state.history.append(row)
        log.info(format_row(row))
        warn_if_at_chance(state, data)
        best = val_accuracy > state.best_val_accuracy
        if best:
            state.best_epoch, state.best_val_accuracy = int(row["epoch"]), val_accuracy
        state.progress = p = Progress(epoch=p.epoch + 1, global_step=p.global_step)
        signum = rt.stop_signal()  # read first: a pending stop always saves, whatever the cadence
        saving = ckpt.save(best=best, epoch_end=not signum)
        if signum:
            ckpt.stop(signum, saving)
    return state.history


FEW_STEPS = 10  # fewer optimizer steps per epoch than this rarely train anything in a few epochs
CHANCE_EPOCHS = 3  # validation at chance this many epochs in a row: say so


def warn_if_few_steps(s, rt: Runtime, train_samples: int) -> None:
    steps = math.ceil(train_samples / (s.batch_size * rt.world_size))
    if steps < FEW_STEPS and not s.limit_train_batches:
        log.warning(
            f"each epoch is only {steps} optimizer step(s): {train_samples} training samples in batches of "
            f"JOB_BATCH_SIZE={s.batch_size} x {rt.world_size} process(es); lower JOB_BATCH_SIZE or add data, "
            "or the model will barely move"
        )


def warn_if_at_chance(state: TrainState, data: Data) -> None:
    """Once: validation accuracy no better than always answering the commonest class."""
    recent = state.history[-CHANCE_EPOCHS:]
    if len(state.history) != CHANCE_EPOCHS or state.val_confusion is None:
        return
    counts = state.val_confusion.sum(1)
    chance = float(counts.max()) / max(float(counts.sum()), 1.0)
    if all(row["val_accuracy"] <= chance + 0.02 for row in recent):
        log.warning(
            f"validation accuracy has stayed at chance ({chance:.3f}: always the commonest class) for "
            f"{CHANCE_EPOCHS} epochs. Likely causes: a learning rate far too high or too low (JOB_LR), "
            "too few steps per epoch (JOB_BATCH_SIZE), a frozen backbone whose features do not fit the "
            "images, or labels that do not match the images"
        )

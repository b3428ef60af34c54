"""The training loop (train_one_epoch, evaluate, fit) and run(), which wires one run together.

Single process or under torchrun: every rank runs this same code; the Runtime's collectives are
no-ops in a single process. Rank 0 alone writes outputs.
"""

import contextlib
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel

from job import __version__, checkpoint, data, features, models, report, storage
from job.errors import DataError, DivergedError, JobError, OutputError, Stopped
from job.lease import Lease, LeaseLost
from job.optim import build_optimizer, lr_factor, set_lr
from job.runtime import Runtime, is_peer_failure, peer_lost
from job.settings import CONTINUOUS_SCHEDULES, redact_text

log = logging.getLogger("job")
EVAL_BATCH_SIZE = 1000  # evaluation keeps no activations for backward, so bigger batches are free


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
class Job:
    settings: object
    runtime: Runtime
    run_uri: str
    data: data.Data
    train_idx: torch.Tensor  # indices into data.x; saved with every checkpoint
    val_idx: torch.Tensor
    model: torch.nn.Module  # the whole plain model: what checkpoints hold
    net: torch.nn.Module  # what training calls: `trainable`, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    uploader: checkpoint.Uploader
    progress: Progress = field(default_factory=Progress)
    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    started: float = field(default_factory=time.monotonic)
    head: str = ""  # the classifier head's module name
    frozen: list = field(default_factory=list)  # modules JOB_FREEZE froze (kept in eval mode)
    trainable: torch.nn.Module | None = None  # what batches go through: the model, or its head on cached features
    amp_dtype: torch.dtype | None = None  # CUDA mixed precision, None on CPU
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    on_features: bool = False  # training the head on cached backbone features
    lease: Lease | None = None  # rank 0's hold on the run directory (one writer per run)
    valid_checkpoint: str = "no checkpoint saved"  # the newest committed checkpoint, for the last log line

    def __post_init__(self):
        self.trainable = self.trainable or self.model

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.amp_dtype)

    def train_mode(self) -> None:
        if self.frozen and not self.on_features:
            models.train_mode(self.model, self.head, self.frozen)
        else:
            self.net.train()


def train_one_epoch(job: Job) -> tuple[float, float, float]:
    """Train from the current position to the end of the epoch.

    Returns (train_loss, train_accuracy, train_samples_per_second). Batches are gathered by index
    from tensors already on the device: no per-item Dataset, no host-to-device copy per step.
    """
    s, p, rt = job.settings, job.progress, job.runtime
    order = data.epoch_order(job.train_idx, s.seed, p.epoch)[p.seen:]
    mine = data.shard(order, s.batch_size, rt.rank, rt.world_size).to(rt.device)
    if s.log_level == "debug":
        log.debug(f"rank {rt.rank} epoch {p.epoch + 1} from sample {p.seen} shard {mine.tolist()}")
    start_seen, block = p.seen, s.batch_size * rt.world_size
    sums, autocast = StepSums(rt.device), job.autocast()
    lr_per_step = s.lr_schedule in CONTINUOUS_SCHEDULES
    set_lr(job.optimizer, s, p.epoch + p.seen / len(job.train_idx))
    job.train_mode()
    start, last_log = time.monotonic(), time.monotonic()
    batches = data.batches(job.data.x, job.data.y, mine, s.batch_size, True, s, rt.device)
    for step, (x, y) in enumerate(batches, start=1):
        if lr_per_step:
            set_lr(job.optimizer, s, p.epoch + p.seen / len(job.train_idx))
        with autocast:
            logits = job.net(x)
            loss = F.cross_entropy(logits.float(), y)
        job.optimizer.zero_grad(set_to_none=True)
        if job.scaler:  # fp16: scale the loss so small gradients survive
            job.scaler.scale(loss).backward()
            job.scaler.step(job.optimizer)
            job.scaler.update()
        else:
            loss.backward()
            job.optimizer.step()
        sums.add(loss, logits, y)
        p.seen, p.global_step = start_seen + min(step * block, len(order)), p.global_step + 1

        every = s.checkpoint_every_steps
        signum = rt.stop_signal()
        if signum or (every and p.global_step % every == 0):
            add_sums(job, sums)
            check_finite(p.loss_sum, p)
            saving = save_checkpoint(job)
            if signum:
                stop(job, signum, saving)
        if time.monotonic() - last_log >= s.log_every_seconds:
            last_log = time.monotonic()
            rate = (p.seen - start_seen) / (last_log - start)
            log.info(f"epoch {p.epoch + 1} sample {p.seen}/{len(job.train_idx)} "
                     f"train_loss={loss.item():.4f} train_samples_per_second={rate:.0f}")
        if step == s.limit_train_batches:  # JOB_LIMIT_TRAIN_BATCHES (smoke runs): the epoch ends here
            p.seen = start_seen + len(order)
            break
    add_sums(job, sums)
    seconds = time.monotonic() - start
    return p.loss_sum / max(p.count, 1), p.correct / max(p.count, 1), (p.seen - start_seen) / max(seconds, 1e-9)


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
        self.steps, self.kept = [], 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.steps.append((loss.detach(), logits.detach(), y))
        self.count += len(y)
        self.kept += logits.numel()
        if self.kept >= self.FOLD_ELEMENTS:
            self.fold()

    def fold(self) -> None:
        if not self.steps:
            return
        losses, logits, ys = zip(*self.steps)
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


def add_sums(job: Job, sums: StepSums) -> None:
    """Fold the steps since the last call into the progress: summed over ranks (one sync)."""
    p = job.progress
    total = job.runtime.sum(*sums.take())
    p.loss_sum, p.correct, p.count = p.loss_sum + total[0], p.correct + int(total[1]), p.count + int(total[2])


@torch.no_grad()
def evaluate(job: Job, x, y: torch.Tensor, idx: torch.Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) over the items `idx` of x: each rank scores its share, then sums and
    counts are added up over ranks (never an average of averages). Polls the stop flag."""
    rt, s = job.runtime, job.settings
    mine = idx[rt.rank::rt.world_size].to(rt.device if isinstance(x, torch.Tensor) else "cpu")
    job.trainable.eval()
    loss_sum, correct, count = 0.0, 0, 0
    batch_size = EVAL_BATCH_SIZE if isinstance(x, torch.Tensor) else s.batch_size
    for i, (xb, yb) in enumerate(data.batches(x, y, mine, batch_size, False, s, rt.device)):
        if rt.stop.signum or i == s.limit_val_batches > 0:  # a local signal (ranks agree below), or the limit
            break
        with job.autocast():
            logits = job.trainable(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum").item()
        correct += int((logits.argmax(1) == yb).sum().item())
        count += len(yb)
    signum = rt.stop_signal()
    if signum:
        raise Stopped(signum, "during evaluation")
    loss_sum, correct, count = rt.sum(loss_sum, correct, count)
    return loss_sum / count, correct / count


def check_finite(loss_sum: float, p: Progress) -> None:
    """A NaN/inf loss must stop the run before the poisoned weights reach a checkpoint."""
    if not math.isfinite(loss_sum):
        raise DivergedError(f"training diverged: non-finite loss in epoch {p.epoch + 1} by sample {p.seen}; "
                            "the last good checkpoint is kept. Lower JOB_LR or check the data")


def fit(job: Job) -> list[dict]:
    """Train until JOB_EPOCHS epochs are in the history; returns the history."""
    s, p = job.settings, job.progress
    while p.epoch < s.epochs:
        if p.seen == 0:
            p.epoch_lr = s.lr * lr_factor(s, p.epoch)
        else:
            log.info(f"continuing epoch {p.epoch + 1} at sample {p.seen}/{len(job.train_idx)}")
        epoch_start = time.monotonic()
        train_loss, train_accuracy, samples_per_second = train_one_epoch(job)
        check_finite(train_loss, p)
        try:
            val_loss, val_accuracy = evaluate(job, job.data.x, job.data.y, job.val_idx)
        except Stopped as stopped:
            saving = save_checkpoint(job)  # position: this epoch trained, not yet evaluated
            stop(job, stopped.exit_code - 128, saving)
        row = {"epoch": p.epoch + 1, "train_loss": train_loss, "train_accuracy": train_accuracy,
               "val_loss": val_loss, "val_accuracy": val_accuracy, "lr": p.epoch_lr,
               "epoch_seconds": time.monotonic() - epoch_start, "train_samples_per_second": samples_per_second}
        job.history.append(row)
        log.info(report.format_row(row))
        best = val_accuracy > job.best_val_accuracy
        if best:
            job.best_epoch, job.best_val_accuracy = row["epoch"], val_accuracy
        job.progress = p = Progress(epoch=p.epoch + 1, global_step=p.global_step)
        saving = save_checkpoint(job, best=best)
        signum = job.runtime.stop_signal()
        if signum:
            stop(job, signum, saving)
    return job.history


def checkpoint_state(job: Job) -> dict:
    p = job.progress
    return {
        "format_version": checkpoint.FORMAT_VERSION,
        "model": job.model.state_dict(),  # unwrapped: loads with any number of processes
        "optimizer": job.optimizer.state_dict(),
        # the lr schedule is a pure function of progress; recorded here for readers
        "scheduler": {"schedule": job.settings.lr_schedule,
                      "lr": job.settings.lr * lr_factor(job.settings, p.epoch + p.seen / len(job.train_idx))},
        "progress": asdict(p),
        "history": list(job.history),
        "best_epoch": job.best_epoch,
        "best_val_accuracy": job.best_val_accuracy,
        "settings": job.settings.public_dict(),
        "world_size": job.runtime.world_size,
        "class_names": job.data.class_names,
        "dataset_fingerprint": job.data.fingerprint,
        "split": {"train": job.train_idx, "val": job.val_idx},
        "rng": torch.get_rng_state(),
    }


def position(p: Progress, train_samples: int) -> str:
    """Where a checkpoint stands, 1-based as the log's epochs are."""
    return f"end of epoch {p.epoch}" if p.seen == 0 else f"epoch {p.epoch + 1}, sample {p.seen}/{train_samples}"


def save_checkpoint(job: Job, best: bool = False) -> bool:
    """Snapshot now (rank 0), commit in the background; history, summary and plots follow the
    checkpoint so that no history row is ever published ahead of a checkpoint that holds it.
    False when it could not even start: the previous upload had not ended by a stop's deadline."""
    if not job.runtime.is_main:
        return True
    if not job.uploader.wait():
        return False
    p = job.progress
    blob = checkpoint.serialize(checkpoint_state(job))
    name = f"step-{p.global_step:09d}"
    meta = {"epoch": p.epoch, "seen": p.seen, "global_step": p.global_step}
    history, summary = list(job.history), summary_of(job, "running")
    where = f"checkpoints/{name}.pt ({position(p, len(job.train_idx))})"

    def commit():
        checkpoint.commit(job.run_uri, name, blob, meta, best, job.settings.keep_checkpoints, job.lease)
        job.valid_checkpoint = where
        report.publish(job.run_uri, history, summary)

    return job.uploader.submit(commit)


def stop(job: Job, signum: int, saving: bool) -> None:
    """Wait for the stop checkpoint within the grace period, then end every rank with 128+signal,
    saying truthfully which checkpoint is the valid one. The other ranks wait for rank 0's
    upload: a rank that left early would make torchrun kill rank 0 in the middle of it."""
    saved = saving and job.runtime.is_main and job.uploader.wait()
    if job.runtime.is_main and not saved:
        log.warning(f"the stop checkpoint was not saved within JOB_STOP_GRACE_SECONDS={job.settings.stop_grace_seconds:g}; "
                    f"the valid checkpoint is {job.valid_checkpoint}")
    saved, valid = job.runtime.broadcast((saved, job.valid_checkpoint))  # rank 0 knows what was committed
    job.runtime.barrier()
    if saved:
        raise Stopped(signum, f"after saving a checkpoint: {valid}")
    raise Stopped(signum, f"without a new checkpoint; the valid one is {valid}")


def summary_of(job: Job, status: str, **extra) -> dict:
    last = job.history[-1] if job.history else {}
    return {
        "status": status,
        "run_name": job.settings.run_name,
        "epochs_completed": len(job.history),
        "best_epoch": job.best_epoch or None,
        "best_val_accuracy": job.best_val_accuracy if job.history else None,
        "final_val_accuracy": last.get("val_accuracy"),
        "test_accuracy": None,
        "wall_seconds": round(time.monotonic() - job.started, 3),
        "device": str(job.runtime.device),
        "world_size": job.runtime.world_size,
        "dataset_fingerprint": job.data.fingerprint,
        "class_names": job.data.class_names,
        "class_to_idx": {name: i for i, name in enumerate(job.data.class_names)},
        "bad_files": len(job.data.bad_files),
        "train_samples": len(job.train_idx),
        "val_samples": len(job.val_idx),
        **extra,
    }


def restore(job: Job, state: dict, name: str) -> None:
    """Continue from a checkpoint after checking it belongs to this experiment and data."""
    s = job.settings
    saved = state["settings"]
    problems = []
    for key in ("model", "hidden_sizes", "optimizer"):
        if saved.get(key) != getattr(s, key):
            problems.append(f"JOB_{key.upper()} was {saved.get(key)}, now {getattr(s, key)}")
    if state["class_names"] != job.data.class_names:
        problems.append(f"classes {state['class_names']} != {job.data.class_names}")
    if state["dataset_fingerprint"] != job.data.fingerprint:
        problems.append("the dataset changed (fingerprint differs)")
    split = state["split"]
    if len(split["train"]) + len(split["val"]) != len(job.data.x):
        problems.append("the saved split does not fit the dataset")
    if problems:
        raise DataError(f"the checkpoint in {job.run_uri} does not fit these settings: {'; '.join(problems)}; "
                        "use a new JOB_RUN_NAME to start a separate run")
    job.model.load_state_dict(state["model"])
    job.optimizer.load_state_dict(state["optimizer"])
    job.progress = Progress(**state["progress"])
    job.history = list(state["history"])
    job.best_epoch, job.best_val_accuracy = state["best_epoch"], state["best_val_accuracy"]
    job.train_idx, job.val_idx = split["train"], split["val"]
    torch.set_rng_state(state["rng"])
    if not job.runtime.is_main:  # rank 0's partial sums are the whole; the others add only their own
        job.progress.loss_sum, job.progress.correct, job.progress.count = 0.0, 0, 0
    job.valid_checkpoint = f"checkpoints/{name}.pt ({position(job.progress, len(job.train_idx))})"
    log.info(f"resumed from checkpoint at epoch {job.progress.epoch} sample {job.progress.seen} "
             f"(global step {job.progress.global_step}, written by {state['world_size']} process(es)); "
             f"{len(job.history)} epochs in the history")


def load_resume_state(settings, run_uri: str) -> tuple[dict | None, str | None]:
    """Apply JOB_RESUME: never silently restart a run that has history from scratch."""
    with storage.errors(run_uri, DataError, "read checkpoints from"):
        state, name = checkpoint.load_latest(run_uri)
        has_history = storage.exists(storage.join(run_uri, "history.jsonl"))
    if state is not None and settings.resume == "never":
        raise DataError(f"{run_uri} already holds a checkpoint and JOB_RESUME=never; "
                        "set a new JOB_RUN_NAME, delete the run, or use JOB_RESUME=auto")
    if state is None and settings.resume == "require":
        raise DataError(f"JOB_RESUME=require but {run_uri} holds no checkpoint")
    if state is None and has_history and settings.resume == "auto":
        raise DataError(f"{run_uri} has a history but no readable checkpoint; refusing to restart it from scratch. "
                        "Set JOB_RESUME=never with a new JOB_RUN_NAME to start over")
    return state, name


def on_main(runtime: Runtime, fn):
    """Run fn on rank 0 and hand its result to every rank; an error there ends every rank."""
    result, error = None, None
    if runtime.is_main:
        try:
            result = fn()
        except JobError as exc:
            error = exc
    runtime.all_ok(error)
    return runtime.broadcast(result)


def load_data(settings, runtime: Runtime, include=None) -> data.Data:
    """Each node pulls the dataset into its own cache once: its local rank 0 first, the others
    after a barrier (they then find the cache fresh and read it)."""
    normalize = settings.model not in ("mlp", "cnn")  # torchvision models expect ImageNet statistics
    tensors, error = None, None
    if runtime.local_rank == 0:
        try:
            tensors = data.load(settings, runtime.device, normalize, include)
        except JobError as exc:
            error = exc
    runtime.all_ok(error)
    return tensors if tensors is not None else data.load(settings, runtime.device, normalize, include)


def build_job(settings, runtime: Runtime, run_uri: str, dataset: data.Data) -> Job:
    """Model (head replaced, weights loaded, backbone frozen as asked), optimizer and split."""
    model, head = models.build_model(settings, dataset.input_shape(settings.image_size), dataset.num_classes)
    frozen = models.freeze(model, head, settings.freeze)
    model.to(runtime.device)
    optimizer = build_optimizer(settings, models.param_groups(model, head, settings.backbone_lr_scale))
    train_idx, val_idx = dataset.split or data.split_indices(len(dataset.y), settings.val_fraction, settings.seed)
    job = Job(settings, runtime, run_uri, dataset, train_idx, val_idx, model, model, optimizer,
              checkpoint.Uploader(run_uri, runtime.stop, settings.stop_grace_seconds), head=head, frozen=frozen, trainable=model)
    if runtime.device.type == "cuda":
        # CUDA-only speed-ups; none of them runs (or changes anything) on CPU.
        torch.backends.cudnn.benchmark = True
        if settings.amp != "off":
            job.amp_dtype = torch.float16 if settings.amp == "fp16" or (
                settings.amp == "auto" and not torch.cuda.is_bf16_supported()) else torch.bfloat16
            job.scaler = torch.amp.GradScaler("cuda") if job.amp_dtype == torch.float16 else None
        if len(dataset.input_shape(settings.image_size)) == 3:
            model.to(memory_format=torch.channels_last)
        if settings.compile:
            job.trainable = job.net = torch.compile(model)
    return job


def versions() -> dict:
    return {"trainjob": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__}


def prepare_output(settings, runtime: Runtime, run_uri: str) -> Lease:
    """Check the output takes writes, become the run's only writer, clear what a killed writer
    left, and record the settings. Returns the lease (rank 0)."""
    with storage.errors(run_uri, OutputError, "write to"):
        storage.check_writable(run_uri)
        lease = Lease(run_uri, settings.lease_seconds)
        lease.acquire()
        removed = storage.remove_stale_tmp(run_uri)
        if removed:
            log.info(f"removed {removed} temporary file(s) a killed writer left in {storage.redact_uri(run_uri)}")
        storage.write_json(storage.join(run_uri, "settings.json"),
                           {"settings": settings.public_dict(), "versions": versions(),
                            "device": str(runtime.device), "world_size": runtime.world_size})
    return lease


def begin(settings, runtime: Runtime, run_uri: str) -> Lease | None:
    """Say what runs where, then make sure the output location takes writes before any work.
    Returns rank 0's lease on the run (None on other ranks)."""
    log.info(" ".join(f"{k} {v}" for k, v in versions().items()) + f" | device {runtime.describe()}")
    log.info(f"run {storage.redact_uri(run_uri)} settings {settings.public_dict()}")
    held = {}
    try:
        on_main(runtime, lambda: held.setdefault("lease", prepare_output(settings, runtime, run_uri)) and None)
    except JobError:
        raise  # the output location is the problem: nowhere to record it
    except Exception as exc:
        if is_peer_failure(runtime, exc):
            raise peer_lost(runtime, exc) from None
        raise
    return held.get("lease")


def make_job(settings, runtime: Runtime, run_uri: str, dataset: data.Data, lease: Lease | None) -> Job:
    """The job ready to fit: resumed if the run has a checkpoint, features cached if they can be,
    wrapped for data parallelism, and answering signals with a checkpoint from here on."""
    log.info(f"dataset {storage.redact_uri(settings.data_uri)}: {len(dataset.y)} images for training and validation, "
             f"{dataset.num_classes} classes, test set: {'yes' if dataset.test_x is not None else 'no'}, "
             f"{len(dataset.bad_files)} bad files skipped, fingerprint {dataset.fingerprint[:12]}")
    state, name = on_main(runtime, lambda: load_resume_state(settings, run_uri))
    job = build_job(settings, runtime, run_uri, dataset)
    job.lease = lease
    if state is not None:
        restore(job, state, name)
    if features.applicable(settings, job.data):
        job.data, job.trainable = features.features_data(job), job.model.get_submodule(job.head)
        job.net, job.on_features = job.trainable, True
    if runtime.distributed:  # wraps after restore: DDP starts every rank from rank 0's weights
        job.net = DistributedDataParallel(job.trainable, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    runtime.stop.deferred = True  # from here a signal is answered with a checkpoint
    if runtime.stop.signum:
        raise Stopped(runtime.stop.signum, f"before training; the valid checkpoint is {job.valid_checkpoint}")
    return job


def finish(job: Job) -> dict:
    """Score the test set if there is one, publish the final summary; returns it."""
    d, extra = job.data, {}
    if d.test_x is not None:
        try:
            test_loss, test_accuracy = evaluate(job, d.test_x, d.test_y, torch.arange(len(d.test_y)))
        except Stopped as stopped:  # every epoch is saved (or on its way): wait for it, then stop
            stop(job, stopped.exit_code - 128, saving=True)
        extra = {"test_loss": test_loss, "test_accuracy": test_accuracy}
        log.info(f"test_loss={test_loss:.4f} test_accuracy={test_accuracy:.4f}")
    summary = summary_of(job, "completed", **extra)
    if job.runtime.is_main:
        if not job.uploader.wait():
            raise Stopped(job.runtime.stop.signum, "while publishing the final outputs; the valid checkpoint is "
                          f"{job.valid_checkpoint}")
        with storage.errors(job.run_uri, OutputError, "write to"):
            report.publish(job.run_uri, job.history, summary)
            storage.remove(storage.join(job.run_uri, "failure.json"))  # from an earlier attempt: this one completed
    job.runtime.barrier()
    log.info(f"completed: best_val_accuracy={job.best_val_accuracy:.4f} (epoch {job.best_epoch}); "
             f"outputs in {storage.redact_uri(job.run_uri)}")
    return summary


@contextlib.contextmanager
def recorded(settings, run_uri: str, runtime: Runtime, current: dict, lease: Lease | None):
    """Record how the run ended (summary.json, failure.json) for `current["job"]`, turn a failed
    collective into a clear exit 75, and give the run's lease back."""
    try:
        yield
    except JobError as exc:
        record_outcome(settings, run_uri, runtime, current.get("job"), exc)
        raise
    except Exception as exc:
        if not is_peer_failure(runtime, exc):
            raise
        error = peer_lost(runtime, exc)
        record_outcome(settings, run_uri, runtime, current.get("job"), error)
        raise error from None
    finally:
        if lease is not None:
            try:
                with storage.time_limit(settings.stop_grace_seconds):
                    lease.release()
            except Exception as exc:  # it expires by itself
                log.warning(f"could not release the run's lease ({exc.__class__.__name__}); it expires in "
                            f"JOB_LEASE_SECONDS={settings.lease_seconds:g}")


def run(settings, runtime: Runtime) -> dict:
    """One run: outputs checked, data loaded, resume applied, fit, test, summary. Returns the summary."""
    run_uri = storage.join(settings.output_uri, settings.run_name)
    lease = begin(settings, runtime, run_uri)
    current = {}
    with recorded(settings, run_uri, runtime, current, lease):
        dataset = load_data(settings, runtime)
        current["job"] = job = make_job(settings, runtime, run_uri, dataset, lease)
        fit(job)
        return finish(job)


def record_outcome(settings, run_uri: str, runtime: Runtime, job: Job | None, exc: JobError) -> None:
    """Write summary.json (and failure.json on failure) with the reason, after the last good
    checkpoint is safe. Rank 0 only, and only while it holds the run. Best effort, and within
    JOB_STOP_GRACE_SECONDS: the storage may be why we are failing."""
    if not runtime.is_main or isinstance(exc, LeaseLost):
        return
    status = "stopped" if isinstance(exc, Stopped) else "failed"
    outcome = {"reason": redact_text(str(exc)), "exit_code": exc.exit_code}
    end = time.monotonic() + settings.stop_grace_seconds
    try:
        if job is not None and status == "failed":
            job.uploader.wait(deadline=end)
        summary = summary_of(job, status, **outcome) if job is not None else {"status": status, **outcome}
        with storage.time_limit(max(0.0, end - time.monotonic())):
            storage.write_json(storage.join(run_uri, "summary.json"), summary)
            if status == "failed":
                storage.write_json(storage.join(run_uri, "failure.json"), {**outcome, "error": exc.__class__.__name__})
    except Exception as write_error:  # never hide the original error behind this one
        log.warning(f"could not record the outcome in {storage.redact_uri(run_uri)}: {write_error.__class__.__name__}")

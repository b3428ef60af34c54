"""The training loop (train_one_epoch, evaluate, fit) and run(), which wires one run together."""

import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
import torchvision

from job import __version__, checkpoint, data, report, storage
from job.errors import DataError, DivergedError, JobError, OutputError, Stopped
from job.models import build_model
from job.optim import build_optimizer, lr_factor, set_lr
from job.runtime import Runtime

log = logging.getLogger("job")
EVAL_BATCH_SIZE = 1000  # evaluation keeps no activations for backward, so bigger batches are free


@dataclass
class Progress:
    """Where the loop is. Saved in every checkpoint so a resume continues exactly, mid-epoch too."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken in the epoch in progress
    global_step: int = 0
    loss_sum: float = 0.0  # sums over the epoch in progress, so a mid-epoch resume reports
    correct: int = 0  # the same epoch metrics as an uninterrupted run
    seen: int = 0
    epoch_lr: float = 0.0  # lr at the start of the epoch in progress (the history's `lr`)


@dataclass
class Job:
    settings: object
    runtime: Runtime
    run_uri: str
    data: data.TensorData
    train_idx: torch.Tensor  # indices into data.x; saved with every checkpoint
    val_idx: torch.Tensor
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    uploader: checkpoint.Uploader
    progress: Progress = field(default_factory=Progress)
    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    started: float = field(default_factory=time.monotonic)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_idx) / self.settings.batch_size)


def train_one_epoch(job: Job) -> tuple[float, float, float]:
    """Train from the current position to the end of the epoch.

    Returns (train_loss, train_accuracy, train_samples_per_second). Batches are gathered by index
    from tensors already on the device: no per-item Dataset, no host-to-device copy per step.
    """
    s, p, device = job.settings, job.progress, job.runtime.device
    order = data.epoch_order(job.train_idx, s.seed, p.epoch).to(device)
    loss_sum = torch.tensor(p.loss_sum, dtype=torch.float64, device=device)
    correct = torch.tensor(p.correct, dtype=torch.int64, device=device)
    job.model.train()
    start, last_log, seen_at_start = time.monotonic(), time.monotonic(), p.seen
    batches = data.index_batches(job.data.x, job.data.y, order, s.batch_size, start_step=p.step)
    for step, (x, y) in enumerate(batches, start=p.step):
        set_lr(job.optimizer, s, p.global_step, job.steps_per_epoch)
        logits = job.model(x)
        loss = F.cross_entropy(logits, y)
        job.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        job.optimizer.step()
        loss_sum.add_(loss.detach(), alpha=len(y))  # summed on the device: no sync per step
        correct.add_((logits.argmax(1) == y).sum())
        p.step, p.global_step, p.seen = step + 1, p.global_step + 1, p.seen + len(y)

        every = s.checkpoint_every_steps
        if job.runtime.stop.signum or (every and p.global_step % every == 0):
            p.loss_sum, p.correct = loss_sum.item(), int(correct.item())
            check_finite(p.loss_sum, p)
            save_checkpoint(job)
            if job.runtime.stop.signum:
                stop(job)
        if time.monotonic() - last_log >= s.log_every_seconds:
            p.loss_sum, p.correct = loss_sum.item(), int(correct.item())
            last_log = time.monotonic()
            rate = (p.seen - seen_at_start) / (last_log - start)
            log.info(f"epoch {p.epoch + 1} step {p.step}/{job.steps_per_epoch} "
                     f"train_loss={p.loss_sum / p.seen:.4f} train_samples_per_second={rate:.0f}")
    p.loss_sum, p.correct = loss_sum.item(), int(correct.item())
    seconds = time.monotonic() - start
    return p.loss_sum / max(p.seen, 1), p.correct / max(p.seen, 1), (p.seen - seen_at_start) / max(seconds, 1e-9)


@torch.no_grad()
def evaluate(job: Job, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) over all of x; polls the stop flag so a stop never waits for eval."""
    job.model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), EVAL_BATCH_SIZE):
        if job.runtime.stop.signum:
            raise Stopped(job.runtime.stop.signum)
        logits = job.model(x[i:i + EVAL_BATCH_SIZE])
        target = y[i:i + EVAL_BATCH_SIZE]
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum().item())
    return loss_sum / len(x), correct / len(x)


def check_finite(loss_sum: float, p: Progress) -> None:
    """A NaN/inf loss must stop the run before the poisoned weights reach a checkpoint."""
    if not math.isfinite(loss_sum):
        raise DivergedError(f"training diverged: non-finite loss in epoch {p.epoch + 1} by step {p.step}; "
                            "the last good checkpoint is kept. Lower JOB_LR or check the data")


def fit(job: Job) -> list[dict]:
    """Train until JOB_EPOCHS epochs are in the history; returns the history."""
    s, p = job.settings, job.progress
    val_x, val_y = job.data.x[job.val_idx.to(job.runtime.device)], job.data.y[job.val_idx.to(job.runtime.device)]
    while p.epoch < s.epochs:
        if p.step == 0:
            p.epoch_lr = s.lr * lr_factor(s, p.global_step, job.steps_per_epoch)
            epoch_start = time.monotonic()
        else:
            epoch_start = time.monotonic()
            log.info(f"continuing epoch {p.epoch + 1} at step {p.step}/{job.steps_per_epoch}")
        train_loss, train_accuracy, samples_per_second = train_one_epoch(job)
        check_finite(train_loss, p)
        try:
            val_loss, val_accuracy = evaluate(job, val_x, val_y)
        except Stopped:
            save_checkpoint(job)  # position: this epoch trained, not yet evaluated
            stop(job)
        row = {"epoch": p.epoch + 1, "train_loss": train_loss, "train_accuracy": train_accuracy,
               "val_loss": val_loss, "val_accuracy": val_accuracy, "lr": p.epoch_lr,
               "epoch_seconds": time.monotonic() - epoch_start, "train_samples_per_second": samples_per_second}
        job.history.append(row)
        log.info(report.format_row(row))
        best = val_accuracy > job.best_val_accuracy
        if best:
            job.best_epoch, job.best_val_accuracy = row["epoch"], val_accuracy
        job.progress = p = Progress(epoch=p.epoch + 1, global_step=p.global_step)
        save_checkpoint(job, best=best)
        if job.runtime.stop.signum:
            stop(job)
    return job.history


def checkpoint_state(job: Job) -> dict:
    return {
        "format_version": checkpoint.FORMAT_VERSION,
        "model": job.model.state_dict(),
        "optimizer": job.optimizer.state_dict(),
        # the lr schedule is a pure function of the global step; recorded here for readers
        "scheduler": {"schedule": job.settings.lr_schedule, "global_step": job.progress.global_step,
                      "lr": job.settings.lr * lr_factor(job.settings, job.progress.global_step, job.steps_per_epoch)},
        "progress": asdict(job.progress),
        "history": list(job.history),
        "best_epoch": job.best_epoch,
        "best_val_accuracy": job.best_val_accuracy,
        "settings": job.settings.public_dict(),
        "class_names": job.data.class_names,
        "dataset_fingerprint": job.data.fingerprint,
        "split": {"train": job.train_idx, "val": job.val_idx},
        "rng": torch.get_rng_state(),
    }


def save_checkpoint(job: Job, best: bool = False) -> None:
    """Snapshot now, commit in the background; history, summary and plots follow the checkpoint
    so that no history row is ever published ahead of a checkpoint that holds it."""
    p = job.progress
    blob = checkpoint.serialize(checkpoint_state(job))
    meta = {"epoch": p.epoch, "step": p.step, "global_step": p.global_step}
    history, summary = list(job.history), summary_of(job, "running")

    def commit():
        checkpoint.commit(job.run_uri, f"step-{p.global_step:09d}", blob, meta, best, job.settings.keep_checkpoints)
        report.publish(job.run_uri, history, summary)

    job.uploader.submit(commit)


def stop(job: Job) -> None:
    """Wait for the stop checkpoint within the grace period, then end the job with 128+signal."""
    stop_request = job.runtime.stop
    if job.uploader.wait(deadline=stop_request.deadline(job.settings.stop_grace_seconds)):
        log.info(f"checkpoint saved at epoch {job.progress.epoch} step {job.progress.step}; stopping")
    else:
        log.warning(f"the stop checkpoint did not finish within JOB_STOP_GRACE_SECONDS="
                    f"{job.settings.stop_grace_seconds}; the previous checkpoint remains the valid one")
    raise Stopped(stop_request.signum)


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
        "dataset_fingerprint": job.data.fingerprint,
        "class_names": job.data.class_names,
        "train_samples": len(job.train_idx),
        "val_samples": len(job.val_idx),
        **extra,
    }


def restore(job: Job, state: dict) -> None:
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
    log.info(f"resumed from checkpoint at epoch {job.progress.epoch} step {job.progress.step} "
             f"(global step {job.progress.global_step}); {len(job.history)} epochs in the history")


def load_resume_state(settings, run_uri: str) -> dict | None:
    """Apply JOB_RESUME: never silently restart a run that has history from scratch."""
    with storage.errors(run_uri, DataError, "read checkpoints from"):
        state = checkpoint.load_latest(run_uri)
        has_history = storage.exists(storage.join(run_uri, "history.jsonl"))
    if state is not None and settings.resume == "never":
        raise DataError(f"{run_uri} already holds a checkpoint and JOB_RESUME=never; "
                        "set a new JOB_RUN_NAME, delete the run, or use JOB_RESUME=auto")
    if state is None and settings.resume == "require":
        raise DataError(f"JOB_RESUME=require but {run_uri} holds no checkpoint")
    if state is None and has_history and settings.resume == "auto":
        raise DataError(f"{run_uri} has a history but no readable checkpoint; refusing to restart it from scratch. "
                        "Set JOB_RESUME=never with a new JOB_RUN_NAME to start over")
    return state


def versions() -> dict:
    return {"trainjob": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__}


def run(settings, runtime: Runtime) -> dict:
    """One run: outputs checked, data loaded, resume applied, fit, test, summary. Returns the summary."""
    run_uri = storage.join(settings.output_uri, settings.run_name)
    log.info(" ".join(f"{k} {v}" for k, v in versions().items()) + f" | device {runtime.describe()}")
    log.info(f"run {storage.redact_uri(run_uri)} settings {settings.public_dict()}")
    with storage.errors(run_uri, OutputError, "write to"):
        storage.check_writable(run_uri)
        storage.write_json(storage.join(run_uri, "settings.json"),
                           {"settings": settings.public_dict(), "versions": versions(), "device": str(runtime.device)})
    job = None
    try:
        tensors = data.load(settings, runtime.device)
        log.info(f"dataset {storage.redact_uri(settings.data_uri)}: {len(tensors.x)} training images, "
                 f"{tensors.num_classes} classes, test set: {'yes' if tensors.test_x is not None else 'no'}, "
                 f"fingerprint {tensors.fingerprint[:12]}")
        state = load_resume_state(settings, run_uri)
        model = build_model(settings, tuple(tensors.x.shape[1:]), tensors.num_classes).to(runtime.device)
        optimizer = build_optimizer(settings, model.parameters())
        train_idx, val_idx = data.split_indices(len(tensors.x), settings.val_fraction, settings.seed)
        job = Job(settings, runtime, run_uri, tensors, train_idx, val_idx, model, optimizer, checkpoint.Uploader(run_uri))
        if state is not None:
            restore(job, state)
        runtime.stop.deferred = True  # from here a signal is answered with a checkpoint
        if runtime.stop.signum:
            raise Stopped(runtime.stop.signum)
        fit(job)
        extra = {}
        if tensors.test_x is not None:
            test_loss, test_accuracy = evaluate(job, tensors.test_x, tensors.test_y)
            extra = {"test_loss": test_loss, "test_accuracy": test_accuracy}
            log.info(f"test_loss={test_loss:.4f} test_accuracy={test_accuracy:.4f}")
        job.uploader.wait()
        summary = summary_of(job, "completed", **extra)
        with storage.errors(run_uri, OutputError, "write to"):
            report.publish(run_uri, job.history, summary)
        log.info(f"completed: best_val_accuracy={job.best_val_accuracy:.4f} (epoch {job.best_epoch}); "
                 f"outputs in {storage.redact_uri(run_uri)}")
        return summary
    except JobError as exc:
        record_outcome(run_uri, job, exc)
        raise


def record_outcome(run_uri: str, job: Job | None, exc: JobError) -> None:
    """Write summary.json (and failure.json on failure) with the reason, after the last good
    checkpoint is safe. Best effort: the storage may be why we are failing."""
    status = "stopped" if isinstance(exc, Stopped) else "failed"
    outcome = {"reason": str(exc), "exit_code": exc.exit_code}
    try:
        if job is not None and status == "failed":
            job.uploader.wait(deadline=time.monotonic() + job.settings.stop_grace_seconds)
        summary = summary_of(job, status, **outcome) if job is not None else {"status": status, **outcome}
        storage.write_json(storage.join(run_uri, "summary.json"), summary)
        if status == "failed":
            storage.write_json(storage.join(run_uri, "failure.json"), {**outcome, "error": exc.__class__.__name__})
    except Exception as write_error:  # never hide the original error behind this one
        log.warning(f"could not record the outcome in {storage.redact_uri(run_uri)}: {write_error.__class__.__name__}")

"""Smoke mode (JOB_SMOKE=true): the real run (job.run.run, the same steps) on a few batches and a
sample of the data, each step checked and timed, outputs under <run>/smoke/ so a real run is
never touched. Adds a loss sanity check before training and reads every output back after it.
Ends with a one-screen report; exits 0 only if every step passed."""

import copy
import logging
import math
import os
import time

import torch
import torch.nn.functional as F

from job import checkpoint, models, report, run, storage
from job.errors import DataError, DivergedError, JobError, OutputError
from job.optim import build_optimizer
from job.runtime import Runtime

log = logging.getLogger("job")
SAMPLE_PER_FOLDER = 8  # images pulled per class folder of each split: enough for a few batches
SANITY_STEPS = 10


def smoke_settings(settings):
    """The user's settings, cut down: one epoch of a few batches, on a sample, into <run>/smoke."""
    return settings.model_copy(update={
        "epochs": 1,
        "limit_train_batches": settings.limit_train_batches or 3,
        "limit_val_batches": settings.limit_val_batches or 2,
        "output_uri": storage.join(settings.output_uri, settings.run_name),
        "run_name": "smoke",
        "resume": "never",
        "cache_dir": os.path.join(settings.cache_dir, "smoke"),
    })


def sample(rel: str, counts: dict) -> bool:
    """Pull filter: every file outside class folders (MNIST's IDX files), and the first
    SAMPLE_PER_FOLDER files of each class folder of an image-folder dataset."""
    folder, _, _ = rel.rpartition("/")
    if folder.count("/") < 1:
        return True
    counts[folder] = counts.get(folder, 0) + 1
    return counts[folder] <= SAMPLE_PER_FOLDER


def loss_sanity(settings, runtime: Runtime, model, data, state) -> str:
    """A fresh head's first-batch loss is about ln(classes), and a few steps on that one batch
    bring it down clearly. Catches nothing trainable, a useless lr, NaN from the start, labels
    out of range. Runs on a copy: the smoke run itself is untouched."""
    num_classes = data.num_classes
    net = copy.deepcopy(model.trainable).eval()  # eval: dropout off, batch-norm statistics fixed
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise DivergedError("loss sanity: nothing to train, every parameter is frozen")
    x, y = next(data.samples.batches(state.train_idx[:settings.batch_size], settings.batch_size, train=False))
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DataError(f"loss sanity: labels {int(y.min())}..{int(y.max())} fall outside the {num_classes} classes")
    optimizer = build_optimizer(settings, params)
    losses = []
    for _ in range(SANITY_STEPS + 1):
        with runtime.autocast():
            loss = F.cross_entropy(net(x).float(), y)
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    first, last, expected = losses[0], losses[-1], math.log(num_classes)
    if not math.isfinite(first):
        raise DivergedError(f"loss sanity: the first batch's loss is {first}; check the data and the weights")
    if abs(first - expected) > max(1.0, expected):
        raise DivergedError(f"loss sanity: the first batch's loss {first:.3f} is far from ln({num_classes}) = "
                            f"{expected:.3f}; is the head freshly initialised and the input normalised?")
    if not last < 0.9 * first:
        raise DivergedError(f"loss sanity: {SANITY_STEPS} steps on one repeated batch took the loss from {first:.3f} "
                            f"to {last:.3f}; nothing is learning (lr {settings.lr}, frozen parameters?)")
    return f"first-batch loss {first:.3f} (ln {num_classes} = {expected:.3f}), {last:.3f} after {SANITY_STEPS} steps"


def verify_checkpoint(settings, runtime: Runtime, run_uri: str, images, model, state) -> str:
    """The committed checkpoint verifies, loads into a fresh model and gives identical outputs
    on images (the dataset as read, not cached features)."""
    saved, _ = checkpoint.load_latest(run_uri)
    if saved is None:
        raise OutputError(f"no checkpoint in {run_uri} after training")
    fresh, _ = models.build_model(settings.model_copy(update={"pretrained": "none"}), images.samples.sample_shape,
                                  images.num_classes)
    fresh.load_state_dict(saved["model"])
    fresh.to(runtime.device).eval()
    model.module.eval()
    x, _ = next(images.samples.batches(state.val_idx[:4], 4, train=False))
    with torch.no_grad():
        if not torch.equal(fresh(x), model.module(x)):
            raise OutputError("the checkpoint read back gives different outputs from the trained model")
    size = storage.read_json(storage.join(run_uri, "checkpoints", "latest.json"))["size"]
    return f"sha256 verified, {size} bytes, identical outputs"


def verify_reports(run_uri: str) -> str:
    history = report.read_history(run_uri)
    summary = storage.read_json(storage.join(run_uri, "summary.json"))
    if len(history) != 1 or summary.get("status") != "completed":
        raise OutputError(
            f"outputs in {run_uri} read back wrong: {len(history)} history rows, status {summary.get('status')}"
        )
    for plot in ("accuracy", "loss"):
        if not storage.read_bytes(storage.join(run_uri, "plots", f"{plot}.png")).startswith(b"\x89PNG"):
            raise OutputError(f"plots/{plot}.png in {run_uri} is not a PNG")
    return "history.jsonl, summary.json, plots/accuracy.png, plots/loss.png"


def describe(result) -> str:
    """A step's result in the report's words."""
    if isinstance(result, str):
        return result
    if hasattr(result, "bad_files"):  # the dataset
        return f"{len(result.samples)} images, {result.num_classes} classes, {len(result.bad_files)} bad files skipped"
    if isinstance(result, list) and result:  # the history
        return f"{result[-1]['val_accuracy']:.3f} val_accuracy"
    if isinstance(result, dict) and "status" in result:  # the summary
        return f"status {result['status']}"
    return ""


class Report:
    """The smoke report: each step's outcome, time and result."""

    def __init__(self):
        self.lines: list[tuple[str, str, float, str]] = []
        self.results: dict = {}

    def step(self, name: str, fn):
        start = time.monotonic()
        try:
            result = fn()
        except BaseException as exc:
            self.lines.append(
                (
                    "FAILED",
                    name,
                    time.monotonic() - start,
                    str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__,
                )
            )
            raise
        self.lines.append(("ok", name, time.monotonic() - start, describe(result)))
        self.results[name] = result
        return result


def main(settings, runtime: Runtime) -> dict:
    s = smoke_settings(settings)
    run_uri = storage.join(s.output_uri, s.run_name)
    steps, code = Report(), 0
    counts: dict = {}
    try:
        if runtime.is_main:
            with storage.errors(run_uri, OutputError, "write to"):
                storage.remove_tree(run_uri)  # a fresh smoke run; only ever under <run>/smoke
        summary = run.run(s, runtime, timed=steps.step, sanity=loss_sanity, include=lambda rel: sample(rel, counts))
        images, built = steps.results["dataset pulled and read"], steps.results["model built with its weights"]
        if runtime.is_main:
            steps.step(
                "checkpoint written, verified, reloaded",
                lambda: verify_checkpoint(s, runtime, run_uri, images, built[0], built[2]),
            )
            steps.step("history, summary and plots read back", lambda: verify_reports(run_uri))
        return summary
    except JobError as exc:
        code = exc.exit_code
        raise
    except BaseException:
        code = 1
        raise
    finally:
        lines = [f"smoke report for {storage.redact_uri(run_uri)}:"]
        lines += [
            f"  {status:6} {seconds:7.2f}s  {name}{': ' + detail if detail else ''}"
            for status, name, seconds, detail in steps.lines
        ]
        lines.append(f"smoke: {'PASSED' if code == 0 else 'FAILED'} (exit {code})")
        for line in lines:
            log.warning(line) if code else log.info(line)

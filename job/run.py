"""One run, top to bottom: the output location, the dataset, the model and its training state
(resumed when the run has a checkpoint), training, the test set and the final outputs, the
exported model, and a record of how the run ended.

A normal run and a smoke run both go through run(): smoke mode passes `step`, which times and
reports each phase, and `sanity`, a check between building the model and training.
"""

import inspect
import logging
import platform
import time
from importlib.metadata import version
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from job import __version__, checkpoint, compiling, export, features, loop, models, report, storage, tracking
from job.checkpoint import Checkpointer
from job.data import Data
from job.data import load as load_dataset
from job.data.sources import split_indices
from job.errors import DataError, JobError, OutputError, Stopped
from job.lease import Lease, LeaseLost
from job.optim import build_optimizer
from job.runtime import Runtime, dtype_name, is_peer_failure, node_first, peer_lost
from job.settings import CONTINUOUS_SCHEDULES, redact_text

log = logging.getLogger("job")


def plain_step(name: str, fn):
    return fn()


def run(settings, runtime: Runtime, timed=plain_step, sanity=None, include=None) -> dict:
    """One run; returns its summary. `include` limits the dataset pull (smoke mode's sample);
    `timed(name, fn)` runs each phase (smoke mode times them)."""
    started = time.monotonic()
    run_uri = storage.join(settings.output_uri, settings.run_name)

    def step(name: str, fn):  # each phase starts at a stop point (a no-op once training saves on a stop)
        runtime.stop.check()
        return timed(name, fn)

    lease = step("output location", lambda: begin(settings, runtime, run_uri))
    tracker = tracking.Tracker(settings, runtime, run_uri)
    with Ending(settings, runtime, run_uri, lease, tracker) as ending:
        done = on_main(runtime, lambda: completed_from_records(settings, run_uri))
        if done is not None:  # no data pulled, no checkpoint loaded
            say_complete(run_uri, done["epochs_completed"], done["best_val_accuracy"], done["best_epoch"])
            return done
        dataset = step("dataset pulled and read", lambda: load_data(settings, runtime, include))
        model, data, state, ckpt = step("model built with its weights",
                                        lambda: prepare(settings, runtime, run_uri, dataset, lease, started, tracker))
        ending.ckpt = ckpt
        if state.progress.epoch >= settings.epochs:
            done = on_main(runtime, lambda: report.completed(run_uri))
            if done is not None:
                if on_main(runtime, lambda: export_missing(settings, run_uri)):  # killed while exporting
                    step("model exported", lambda: export_model(settings, runtime, run_uri, dataset, state))
                say_complete(run_uri, len(state.history), state.best_val_accuracy, state.best_epoch)
                tracker.end("FINISHED")  # prepare() found the tracker's run and marked it running
                return done
        if sanity is not None:
            step("loss sanity", lambda: sanity(settings, runtime, model, data, state))
        step("train and validate", lambda: loop.fit(settings, runtime, model, data, state, ckpt))
        summary = step("summary and test set", lambda: finish(settings, runtime, model, data, state, ckpt))
        step("model exported", lambda: export_model(settings, runtime, run_uri, dataset, state))
        if runtime.is_main:
            tracker.results(summary)
            tracker.artifacts(final_outputs(run_uri))
        tracker.end("FINISHED")
        log.info(f"completed: best_val_accuracy={state.best_val_accuracy:.4f} (epoch {state.best_epoch}); "
                 f"outputs in {storage.redact_uri(run_uri)}")
        return summary


def check(settings, runtime: Runtime) -> str:
    """--check: the run's own start-up up to its first step, in the same functions and order
    (begin, a completed run's records, the dataset pull and scan, the model with its weights and
    the checkpoint restored), so it refuses what the run refuses, with the same exit code. It
    leaves nothing in the output location (a probe proves its root takes writes, then goes; no run
    directory is made) and takes no lease (it waits for one another job holds,
    as the run would); the dataset it pulls stays in JOB_CACHE_DIR for the run. Returns what it
    found and what the run would do with the run: new, resumable or complete."""
    run_uri = storage.join(settings.output_uri, settings.run_name)
    begin(settings, runtime, run_uri, check=True)
    found = (f"output {storage.redact_uri(settings.output_uri)} writable; device {runtime.describe()}; "
             f"run {storage.redact_uri(run_uri)}: ")
    done = completed_from_records(settings, run_uri)
    if done is not None:
        return found + f"complete ({done['epochs_completed']} epochs): the run would say so and stop"
    data = load_data(settings, runtime)
    *_, state, saved, name = build(settings, runtime, run_uri, data, check=True)
    found = (f"dataset {storage.redact_uri(settings.data_uri)} read as the run reads it ({len(data.samples)} samples, "
             f"{data.num_classes} classes, {len(data.bad_files)} bad files skipped); model {settings.model} built "
             f"with its weights ({storage.redact_uri(settings.pretrained)}); " + found)
    if saved is None:
        return found + "new"
    if state.progress.epoch >= settings.epochs and report.completed(run_uri) is not None:
        again = "export its model again" if export_missing(settings, run_uri) else "say so and stop"
        return found + f"complete ({state.progress.epoch} epochs): the run would {again}"
    return found + f"resumable from checkpoints/{name}.pt ({checkpoint.position(state.progress)})"


def completed_from_records(settings, run_uri: str) -> dict | None:
    """The summary of a run that is complete under these settings, from its records alone (the
    checkpoint pointer and summary.json, as --check reads them): a rerun says so in a second where
    pulling the dataset and loading the checkpoint took 40 s. None sends the run the long way,
    which decides as before: a pointer that cannot tell (an older trainjob), a model/ to export
    again (it needs the dataset), a summary whose numbers are not numbers."""
    with storage.errors(run_uri, OutputError, "read"):
        if checkpoint.finished(run_uri, settings) is None or model_missing(settings, run_uri):
            return None
        summary = report.completed(run_uri)
    if summary is None:
        return None
    numbers = (summary.get("epochs_completed"), summary.get("best_val_accuracy"), summary.get("best_epoch"))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        return None
    return summary


def say_complete(run_uri: str, epochs: int, best_val_accuracy: float, best_epoch: int) -> None:
    log.info(f"run {storage.redact_uri(run_uri)} is already complete: {epochs} epochs, "
             f"best_val_accuracy={best_val_accuracy:.4f} (epoch {best_epoch}); nothing to do. "
             "Raise JOB_EPOCHS to train it further, or set a new JOB_RUN_NAME for another run")


def versions() -> dict:
    # torchvision's version without importing it: an MLP run never needs it (a second of start-up)
    return {"trainjob": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": version("torchvision")}


def resolve_run_name(settings):
    """A derived run name that an earlier trainjob (<= 0.1: model-hash) gave a run still in the
    output location keeps that run going after an upgrade, instead of starting it over."""
    if not settings.run_name_derived:
        return settings
    legacy = settings.legacy_run_name()
    new, old = (
        storage.join(settings.output_uri, name, "checkpoints", "latest.json") for name in (settings.run_name, legacy)
    )
    with storage.errors(storage.join(settings.output_uri, settings.run_name), OutputError, "read"):
        if not storage.exists(new) and storage.exists(old):
            log.info(
                f"continuing the run {legacy}, named by an earlier trainjob (new runs are named like "
                f"{settings.run_name})"
            )
            return settings.model_copy(update={"run_name": legacy})
    return settings


def begin(settings, runtime: Runtime, run_uri: str, check: bool = False) -> Lease | None:
    """Say what runs where, then make sure the output location takes writes before any work.
    Returns rank 0's lease on the run (None on other ranks). check (--check): the same, taking
    nothing and leaving nothing behind (look_at_output)."""
    log.info(
        f"run {storage.redact_uri(run_uri)} | "
        + " ".join(f"{k} {v}" for k, v in versions().items())
        + f" | device {runtime.describe()}"
    )
    log.info(f"settings {settings.public_dict()}")
    if settings.defaults_applied:
        log.info(
            "defaults for transfer learning (set the variable to choose otherwise): "
            + " ".join(f"JOB_{k.upper()}={v}" for k, v in settings.defaults_applied.items())
        )
    if settings.lr_schedule in CONTINUOUS_SCHEDULES and settings.run_name_derived:
        log.info(
            f"JOB_LR_SCHEDULE={settings.lr_schedule} is stretched over JOB_EPOCHS, so the epochs are part of the "
            "run's name: changing JOB_EPOCHS starts a new run (set JOB_RUN_NAME to keep this one)"
        )
    # before any work: a missing compiler once failed only at the first step, and JOB_FREEZE past
    # the model's stages after the whole dataset was pulled (a model's stages do not depend on its input)
    error = None
    try:
        if settings.compile:
            compiling.compile_ready(settings, runtime)
        if settings.transfer_learning:
            models.check_freeze(settings, (3, settings.image_size, settings.image_size), 2)
    except JobError as exc:
        error = exc
    runtime.all_ok(error)
    if check:
        look_at_output(settings, run_uri)
        return None
    held: dict = {}
    try:
        on_main(runtime, lambda: held.setdefault("lease", prepare_output(settings, runtime, run_uri)) and None)
    except JobError:
        raise  # the output location is the problem: nowhere to record it
    except Exception as exc:
        if is_peer_failure(runtime, exc):
            raise peer_lost(runtime, exc) from None
        raise
    return held.get("lease")


def prepare_output(settings, runtime: Runtime, run_uri: str) -> Lease:
    """Check the output takes writes, become the run's only writer and clear what a killed writer
    left. Returns the lease."""
    with storage.errors(run_uri, OutputError, "write to"):
        storage.check_writable(run_uri)
        lease = Lease(run_uri, settings.lease_seconds)
        lease.acquire()
        removed = storage.remove_stale_tmp(run_uri)
        if removed:
            log.info(f"removed {removed} temporary file(s) a killed writer left in {storage.redact_uri(run_uri)}")
    return lease


def look_at_output(settings, run_uri: str) -> None:
    """--check's prepare_output: the output location takes writes (its root: no run directory is
    made) and no other job holds the run, waiting and refusing as the run's lease would (exit 75)."""
    with storage.errors(run_uri, OutputError, "write to"):
        storage.check_writable(settings.output_uri)
        Lease(run_uri, settings.lease_seconds).acquire(take=False)


def record_settings(settings, runtime: Runtime, run_uri: str, compiled: str) -> None:
    """settings.json, once training is about to start (a run that fails before leaves one record),
    with what the settings came to on this device: the autocast dtype and whether the model is
    compiled (`compile_skipped`: why not, when JOB_COMPILE=true)."""
    with storage.errors(run_uri, OutputError, "write to"):
        storage.write_json(
            storage.join(run_uri, "settings.json"),
            {
                "settings": settings.public_dict(),
                "versions": versions(),
                "device": str(runtime.device),
                "world_size": runtime.world_size,
                "amp": dtype_name(runtime.amp_dtype),
                "compile": compiled.startswith("on"),
                "compile_skipped": compiled.removeprefix("skipped: ") if compiled.startswith("skipped") else None,
            },
        )


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


def load_data(settings, runtime: Runtime, include=None) -> Data:
    """Each node pulls the dataset into its own cache once (node_first)."""
    normalize = settings.model not in ("mlp", "cnn")  # torchvision models expect ImageNet statistics
    return node_first(settings, runtime, "the dataset", lambda: load_dataset(settings, runtime, normalize, include))


def build(settings, runtime: Runtime, run_uri: str, data: Data, check: bool = False):
    """The model (head replaced, weights loaded, backbone frozen as asked) on the device and its
    training state, restored from the run's checkpoint when it has one: all that the run and
    --check refuse before training that is not about the data or the output location.
    check (--check): a corrupt checkpoint is left where it is. Returns (module, head, frozen stages,
    state, the checkpoint loaded or None, its name)."""
    log.info(
        f"dataset {storage.redact_uri(settings.data_uri)}: {len(data.samples)} images for training and "
        f"validation, {data.num_classes} classes, test set: {'yes' if data.test is not None else 'no'}, "
        f"{len(data.bad_files)} bad files skipped, fingerprint {data.fingerprint[:12]}"
    )
    saved, name = on_main(runtime, lambda: checkpoint.load_resume_state(settings, run_uri, move=not check))
    shape = data.samples.sample_shape
    module, head = models.build_model(settings, shape, data.num_classes)
    frozen = models.freeze(module, head, settings.freeze)
    module.to(runtime.device)
    if runtime.device.type == "cuda" and len(shape) == 3:
        module.to(memory_format=torch.channels_last)  # faster convolutions with tensor cores
    optimizer = build_optimizer(settings, models.param_groups(module, head, settings.backbone_lr_scale))
    scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 else None
    train_idx, val_idx = data.split or split_indices(len(data.samples), settings.val_fraction, settings.seed)
    state = loop.TrainState(optimizer, scaler, train_idx, val_idx)
    if saved is not None:
        checkpoint.restore(saved, name, settings, module, state, data, run_uri, runtime.device)
    return module, head, frozen, state, saved, name


def prepare(
    settings, runtime: Runtime, run_uri: str, data: Data, lease: Lease | None, started: float, tracker=None
):
    """The model (head replaced, weights loaded, backbone frozen as asked) and the training state,
    resumed if the run has a checkpoint; backbone features cached when they can be; wrapped for
    data parallelism. From here a signal is answered with a checkpoint.
    Returns (model, data, state, checkpointer); `data` is the features when they are cached."""
    module, head, frozen, state, saved, name = build(settings, runtime, run_uri, data)
    compile_cache = compiling.CompileCache(storage.join(run_uri, "compile", "cache.bin"),
                                           in_run=settings.compile_cache == "run")
    ckpt = Checkpointer(settings, runtime, run_uri, module, state, data, lease, started,
                        lambda: records(settings, runtime, run_uri, data, state, started, tracker, compile_cache))
    if saved is not None:
        ckpt.resumed(name)
    if tracker is not None:
        tracker.start(state.history)
    on_features = features.applicable(settings, data)
    if on_features:
        images = data
        data = node_first(
            settings,
            runtime,
            "the feature cache",
            lambda: features.cached(
                images,
                module,
                head,
                model_name=settings.model,
                image_size=settings.image_size,
                batch_size=settings.batch_size,
                device=runtime.device,
                autocast=runtime.autocast,
                cache_dir=settings.cache_dir,
                run_uri=run_uri,
                publish=runtime.is_main,
                log_every=settings.log_every_seconds,
            ),
        )
    model = loop.Model(module, module, head, frozen, on_features)
    model.net = model.trainable
    compiled = compiling.compile_model(settings, model, compile_cache, len(state.history), resumed=saved is not None)
    if runtime.distributed:  # after restore: DDP starts every rank from rank 0's weights
        buffer_sync: dict[str, Any] = {DDP_BUFFER_SYNC: buffers_train(model)}
        model.net = DistributedDataParallel(
            model.net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None, **buffer_sync
        )
    log.info(f"mixed precision {dtype_name(runtime.amp_dtype)} (JOB_AMP={settings.amp}"
             f"{', loss scaled' if state.scaler is not None else ''}), compile {compiled}")
    on_main(runtime, lambda: record_settings(settings, runtime, run_uri, compiled))
    runtime.stop.deferred = True  # from here a signal is answered with a checkpoint
    if runtime.stop.signum:
        raise Stopped(runtime.stop.signum, f"before training; the valid checkpoint is {ckpt.valid}")
    return model, data, state, ckpt


# DDP copies rank 0's buffers to every rank before each forward (a collective per step) unless
# told not to; torch 2.13 renamed the switch, and its old name also skips the copy at start.
DDP_BUFFER_SYNC = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else "broadcast_buffers"
)


def buffers_train(model: loop.Model) -> bool:
    """Whether training changes a buffer: one held by a module in train mode (batch-norm running
    statistics), which would drift apart across ranks without DDP's copy from rank 0. A frozen
    backbone keeps its batch norms in eval mode; an mlp, the cnn and a head on cached features
    have no buffers: nothing to copy at every step."""
    model.train_mode()
    return any(m.training and any(True for _ in m.buffers(recurse=False)) for m in model.net.modules())


def records(settings, runtime: Runtime, run_uri: str, data: Data, state: loop.TrainState, started: float, tracker,
            compile_cache: "compiling.CompileCache | None" = None):
    """What a checkpoint publishes once committed, as the run is when it is taken: the history,
    summary.json, the curves and the validation confusion matrix, the tracker's epochs, and the
    compile cache once this process has trained an epoch."""
    history, confusion = list(state.history), state.val_confusion
    summary = report.summary(settings, runtime, data, state, "running", started)
    compiled = compile_cache.take(len(history)) if compile_cache is not None else None

    def publish() -> None:
        report.publish(run_uri, history, summary, {"val": confusion})
        if compiled is not None and compile_cache is not None:
            storage.write_bytes(compile_cache.uri, compiled)
        if tracker is not None:
            tracker.epochs(history)

    return publish


def finish(
    settings, runtime: Runtime, model: loop.Model, data: Data, state: loop.TrainState, ckpt: Checkpointer
) -> dict:
    """Score the test set if there is one, publish the final summary; returns it."""
    extra: dict = {}
    confusions: dict[str, torch.Tensor | None] = {}
    if data.test is not None:
        try:
            test_loss, test_accuracy, confusions["test"] = loop.evaluate(
                settings, runtime, model, data.test, torch.arange(len(data.test)), data.num_classes, "test"
            )
        except Stopped as stopped:  # every epoch is saved (or on its way): wait for it, then stop
            if loop.alone_in_stall(runtime, stopped):
                raise
            ckpt.stop(stopped.signum, saving=True)
        extra = {
            "test_epoch": state.history[-1]["epoch"],  # the weights after the last epoch, not best.pt's
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "per_class_test_accuracy": report.per_class(confusions["test"], data.class_names),
        }
        log.info(f"test_loss={test_loss:.4f} test_accuracy={test_accuracy:.4f} (weights after epoch "
                 f"{extra['test_epoch']}; the best epoch, in best.pt and model/, is {state.best_epoch})")
    summary = report.summary(settings, runtime, data, state, "completed", ckpt.started, **extra)
    if runtime.is_main:
        if not ckpt.uploader.wait():
            raise Stopped(
                runtime.stop.signum, f"while publishing the final outputs; the valid checkpoint is {ckpt.valid}"
            )
        with storage.errors(ckpt.run_uri, OutputError, "write to"):
            fresh = ckpt.published_epochs == len(state.history)  # the last checkpoint drew this history
            if not fresh:
                confusions["val"] = state.val_confusion
            report.publish(ckpt.run_uri, state.history, summary, confusions, curves=not fresh)
            storage.remove(storage.join(ckpt.run_uri, "failure.json"))  # from an earlier attempt: this one completed
    runtime.barrier()
    return summary


def export_missing(settings, run_uri: str) -> bool:
    """A completed run whose model/ is missing or unfinished (config.json is written last)."""
    with storage.errors(run_uri, OutputError, "read"):
        missing = model_missing(settings, run_uri)
    if missing:
        log.info("the run completed but its model/ is missing or unfinished (stopped while exporting?): exporting it")
    return missing


def model_missing(settings, run_uri: str) -> bool:
    return settings.export != "off" and not storage.exists(storage.join(run_uri, "model", "config.json"))


def export_model(settings, runtime: Runtime, run_uri: str, dataset: Data, state: loop.TrainState) -> str:
    """<run>/model/ from the best checkpoint (read back and checked against its manifest), its
    ONNX form verified on validation samples of the dataset as read (images, not features).
    An earlier config.json goes first: until the new one is written, model/ reads as unfinished."""
    if settings.export == "off" or not runtime.is_main:
        return "not asked for" if settings.export == "off" else ""
    with storage.errors(run_uri, OutputError, "write to"):
        storage.remove(storage.join(run_uri, "model", "config.json"))
    with storage.errors(run_uri, DataError, "read the best checkpoint from"):
        best = checkpoint.read(run_uri, "best")
    source = {
        "run": storage.redact_uri(run_uri),
        "checkpoint": "checkpoints/best.pt",
        "epoch": best["best_epoch"],
        "val_accuracy": best["best_val_accuracy"],
        "dataset_fingerprint": dataset.fingerprint,
    }
    config = export.config_for(
        settings,
        dataset.class_names,
        dataset.samples.sample_shape,
        # photos (image folders, image shards) are RGB; IDX images, in memory or in shards, are not
        from_images=dataset.samples.sample_shape[0] == 3 and not dataset.samples.in_memory,
        source=source,
    )
    module = export.build(config)
    module.load_state_dict(best["model"])
    samples = state.val_idx[: export.VERIFY_SAMPLES]
    batches = (x for x, _ in dataset.samples.batches(samples, settings.batch_size, train=False))
    config = export.write(storage.join(run_uri, "model"), module, config, batches, onnx=settings.export == "onnx",
                          device=runtime.device, threads=runtime.cpus.count if runtime.cpus else runtime.threads,
                          log_every=settings.log_every_seconds)
    if config["onnx"]:
        return f"model.safetensors, config.json, model.onnx verified on {config['verification']['samples']} samples"
    return "model.safetensors, config.json" + (
        f" (no ONNX: {config['onnx_error']})" if config.get("onnx_error") else ""
    )


def final_outputs(run_uri: str) -> dict[str, bytes]:
    """The files of a completed run worth keeping beside its metrics: summary, plots, the model."""
    files = {}
    for path in (
        "summary.json",
        "plots/accuracy.png",
        "plots/loss.png",
        "plots/confusion_val.png",
        "plots/confusion_val.json",
        "plots/confusion_test.png",
        "plots/confusion_test.json",
        "model/config.json",
        "model/model.safetensors",
        "model/model.onnx",
    ):
        uri = storage.join(run_uri, path)
        try:
            files[path] = storage.read_bytes(uri)
        except FileNotFoundError:
            continue
    return files


class Ending:
    """How the run ended, recorded: summary.json (and failure.json on failure) with the reason, a
    failed collective turned into a clear exit 75, and the run's lease given back. Rank 0 writes,
    only while it holds the run, within JOB_STOP_GRACE_SECONDS: the storage may be why we fail."""

    def __init__(self, settings, runtime: Runtime, run_uri: str, lease: Lease | None, tracker=None):
        self.settings, self.rt, self.run_uri, self.lease, self.tracker = settings, runtime, run_uri, lease, tracker
        self.ckpt: Checkpointer | None = None  # once the state exists, the summary describes it

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        lost = None
        if isinstance(exc, Exception) and not isinstance(exc, JobError) and is_peer_failure(self.rt, exc):
            lost = peer_lost(self.rt, exc)
        error = lost or exc
        try:
            if isinstance(error, JobError):
                self.record(error)
        finally:
            self.release()
        if isinstance(error, JobError) and self.tracker is not None:  # last: a hanging tracker costs no record
            signum, deadline = storage.stop_pending()
            seconds = min(tracking.DRAIN_SECONDS, deadline - time.monotonic() - 1) if signum else tracking.DRAIN_SECONDS
            self.tracker.end("KILLED" if isinstance(error, Stopped) else "FAILED", max(0.0, seconds))
        if lost is not None:
            raise lost from None
        return False

    def record(self, exc: JobError) -> None:
        """Before training, one record: failure.json (or, stopped, a summary saying so); after,
        summary.json describing the state, and failure.json on failure."""
        exc.run_uri = storage.redact_uri(self.run_uri)  # the last log line names the run
        if not self.rt.is_main or isinstance(exc, LeaseLost):
            return
        status = "stopped" if isinstance(exc, Stopped) else "failed"
        outcome = {"reason": redact_text(str(exc)), "exit_code": exc.exit_code}
        failure = {**outcome, "error": exc.__class__.__name__}
        end = time.monotonic() + self.settings.stop_grace_seconds
        try:
            ckpt = self.ckpt
            if ckpt is not None and status == "failed":
                ckpt.uploader.wait(deadline=end)
            with storage.time_limit(max(0.0, end - time.monotonic())):
                # a completed run keeps its summary: a rerun stopped before training, or a stop
                # while exporting (the next run redoes the export), must not erase its record
                trained = ckpt is not None and ckpt.state.progress.epoch >= self.settings.epochs
                kept = (ckpt is None or trained) and report.completed(self.run_uri) is not None
                if not kept and (ckpt is not None or status == "stopped"):
                    summary = (
                        {"status": status, **outcome}
                        if ckpt is None
                        else report.summary(
                            self.settings, self.rt, ckpt.data, ckpt.state, status, ckpt.started, **outcome
                        )
                    )
                    storage.write_json(storage.join(self.run_uri, "summary.json"), summary)
                if status == "failed":
                    if ckpt is None:
                        failure["settings"] = self.settings.public_dict()
                    storage.write_json(storage.join(self.run_uri, "failure.json"), failure)
        except Exception as write_error:  # never hide the original error behind this one
            log.warning(f"could not record the outcome in {storage.redact_uri(self.run_uri)}: {write_error}")

    def release(self) -> None:
        if self.lease is None:
            return
        try:
            with storage.time_limit(self.settings.stop_grace_seconds):
                self.lease.release()
        except Exception as exc:  # it expires by itself
            log.warning(
                f"could not release the run's lease ({exc.__class__.__name__}); it expires within "
                f"JOB_LEASE_SECONDS={self.settings.lease_seconds:g}"
            )

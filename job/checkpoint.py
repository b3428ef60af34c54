"""Checkpoints: what they hold, when they are taken, how they are committed and how a run resumes.

A checkpoint is a plain dict (contents()), loaded with weights_only=True. The Checkpointer decides
when the loop saves; restore() and load_resume_state() apply one to a new process.

Commit protocol (object stores have no rename and no symlinks):
  1. checkpoints/step-<global step>.pt    the bytes (a PUT is atomic on S3; local: temp + rename)
  2. checkpoints/step-<global step>.json  its manifest: size and sha256
  3. checkpoints/last.pt                  a server-side copy, for people and tools
  4. checkpoints/latest.json              the pointer; only now is the checkpoint "last"
A kill at any point leaves the previous pointer and checkpoint valid. Resume verifies the sha256
and falls back to older checkpoints, moving one that fails verification to checkpoints/corrupt/;
a signal or a storage error while reading moves nothing. A pointer or manifest names a plain
file in its own folder; one that names anything else is refused, never followed. The pointer
never moves to an older step than the one it names (unless that one is gone), and every commit
first renews the run's lease, so a second writer cannot turn the run back.
"""

import hashlib
import io
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # the builtin only from Python 3.11
from dataclasses import asdict
from typing import NoReturn

import torch

from job import storage
from job.errors import MALFORMED, DataError, OutputError, Stopped
from job.lease import LeaseLost
from job.optim import lr_factor

FORMAT_VERSION = 1
log = logging.getLogger("job")
# Resume policy by kind of setting. These shape the model, its inputs or its optimizer state: a
# checkpoint cannot continue under other values (a changed image size or freeze would fail deep in
# load_state_dict), so a change is refused, named. The split is the checkpoint's, so a changed
# val_fraction could not take effect either. image_size only for image data, pretrained only for
# torchvision models: elsewhere they change nothing.
FIXED_ON_RESUME = ("model", "hidden_sizes", "optimizer", "freeze", "image_size", "pretrained", "val_fraction")
# These may change between segments of a run (the MNIST recipe continues at lr 0.1 after 5 epochs
# at 0.5): each change is logged and recorded in the checkpoint and the summary (settings_changes).
SCHEDULE_SETTINGS = ("epochs", "lr", "lr_schedule", "lr_milestones", "lr_gamma", "momentum", "weight_decay",
                     "batch_size", "backbone_lr_scale", "augment", "seed")


def _dir(run_uri: str) -> str:
    return storage.join(run_uri, "checkpoints")


def serialize(state: dict) -> bytes:
    """Snapshot the state now: the bytes are independent of tensors that keep training."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _manifest(file: str, blob: bytes, meta: dict) -> dict:
    return {"file": file, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), **meta}


def commit(run_uri: str, name: str, blob: bytes, meta: dict, best: bool, keep: int, lease=None,
           best_blob: tuple[bytes, dict] | None = None) -> None:
    """Publish one checkpoint (steps 1-4 above), then prune old ones. Runs in the uploader thread.
    best: this checkpoint is the best so far (best.pt becomes a copy of it); best_blob: a best
    epoch snapshotted since the last commit, written as best.pt."""
    ckpt_dir = _dir(run_uri)
    manifest = _manifest(f"{name}.pt", blob, meta)
    if lease is not None:
        lease.renew()
    storage.write_bytes(storage.join(ckpt_dir, f"{name}.pt"), blob)
    storage.write_json(storage.join(ckpt_dir, f"{name}.json"), manifest)
    storage.copy(storage.join(ckpt_dir, f"{name}.pt"), storage.join(ckpt_dir, "last.pt"))
    if best:
        storage.copy(storage.join(ckpt_dir, f"{name}.pt"), storage.join(ckpt_dir, "best.pt"))
        storage.write_json(storage.join(ckpt_dir, "best.json"), {**manifest, "file": "best.pt"})
    elif best_blob is not None:
        storage.write_bytes(storage.join(ckpt_dir, "best.pt"), best_blob[0])
        storage.write_json(storage.join(ckpt_dir, "best.json"), _manifest("best.pt", *best_blob))
    _advance_pointer(ckpt_dir, manifest)
    for old in _step_names(run_uri)[:-keep]:
        storage.remove(storage.join(ckpt_dir, f"{old}.pt"))
        storage.remove(storage.join(ckpt_dir, f"{old}.json"))


def _advance_pointer(ckpt_dir: str, manifest: dict) -> None:
    """Point latest.json at `manifest`, never back at an older step while the newer one exists."""
    pointer = storage.join(ckpt_dir, "latest.json")
    try:
        current = storage.read_json(pointer)
        newer = (
            current["global_step"] > manifest["global_step"]
            and storage.plain_name(current["file"])
            and storage.exists(storage.join(ckpt_dir, current["file"]))
        )
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        newer = False
    if newer:
        raise LeaseLost(
            f"checkpoints/latest.json names {current['file']}, newer than {manifest['file']}: another "
            "job is writing this run; not moving it back"
        )
    storage.write_json(pointer, manifest)


def _step_names(run_uri: str) -> list[str]:
    """Committed checkpoints (those with a manifest), oldest first."""
    names = storage.list_names(_dir(run_uri))
    return sorted(n[:-5] for n in names if n.startswith("step-") and n.endswith(".json"))


def _own_file(run_uri: str, record: str, file, suffix: str = "") -> str:
    """The file a record (a pointer or a manifest) names, which must be a plain file beside it:
    a name read from storage is never a path. A resume once followed `../other-run/...` and
    moved another run's best.pt into this run as "corrupt"; `export` followed one to /dev/zero."""
    if not storage.plain_name(file) or not file.endswith(suffix):
        shown = repr(file)[:120]  # repr: one line, whatever the record holds
        raise DataError(
            f"checkpoints/{record} in {storage.redact_uri(run_uri)} names {shown}, not a{suffix and ' ' + suffix} "
            "file in its own folder; refusing to follow it. Fix or delete that record"
        )
    return file


class Corrupt(Exception):
    """A checkpoint failed verification: its manifest is unreadable or its bytes do not match it."""


def read(run_uri: str, name: str) -> dict:
    """The checkpoint `name`, its bytes checked against its manifest. FileNotFoundError when it
    is incomplete (a manifest without its file); Corrupt when it fails verification; storage
    errors and signals propagate untouched."""
    ckpt_dir = _dir(run_uri)
    try:
        manifest = storage.read_json(storage.join(ckpt_dir, f"{name}.json"))
        size, sha256, file = int(manifest["size"]), manifest["sha256"], manifest["file"]
        if not isinstance(file, str):
            raise TypeError(file)
    except (ValueError, KeyError, TypeError) as exc:
        raise Corrupt(f"its manifest is unreadable ({exc.__class__.__name__})") from None
    _own_file(run_uri, f"{name}.json", file)
    # never more than the manifest says (a step file that grew, or a link to a device, is not read whole)
    blob = storage.read_bytes(storage.join(ckpt_dir, file), max_bytes=max(size, 0), nbytes=max(size, 0))
    if len(blob) != size or hashlib.sha256(blob).hexdigest() != sha256:
        raise Corrupt(f"size {len(blob)} / sha256 differ from its manifest (expected {size} bytes)")
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # the bytes are what was written: not corruption, a format this version cannot read
        raise DataError(
            f"checkpoint {file} in {storage.redact_uri(run_uri)} matches its sha256 but cannot be loaded "
            f"({exc.__class__.__name__}: {str(exc)[:200]}); was it written by another version of trainjob?"
        ) from None


def _quarantine(run_uri: str, name: str) -> None:
    ckpt_dir = _dir(run_uri)
    for suffix in (".pt", ".json"):
        src = storage.join(ckpt_dir, name + suffix)
        if storage.exists(src):
            storage.copy(src, storage.join(ckpt_dir, "corrupt", name + suffix))
            storage.remove(src)


def load_latest(run_uri: str, move: bool = True) -> tuple[dict | None, str | None]:
    """(state, name) of the newest checkpoint that verifies, or (None, None) when the run has none.

    Tries the one latest.json points at first, then older ones; each that fails verification is
    reported and moved to checkpoints/corrupt/ (move=False, --check: left in place). Raises
    DataError when checkpoints exist but none is readable: that run must never silently restart
    from scratch.
    """
    ckpt_dir = _dir(run_uri)
    candidates = list(reversed(_step_names(run_uri)))
    try:
        file = storage.read_json(storage.join(ckpt_dir, "latest.json"))["file"]
        if not isinstance(file, str):
            raise TypeError(file)
        pointed = _own_file(run_uri, "latest.json", file, ".pt")[:-3]
        candidates = [pointed] + [c for c in candidates if c != pointed]
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError):
        log.warning("checkpoints/latest.json is unreadable; looking for the newest good checkpoint")
    tried = []
    for name in candidates:
        try:
            state = read(run_uri, name)
        except FileNotFoundError:
            continue
        except Corrupt as exc:
            log.warning(
                f"checkpoint {name}.pt failed verification ({exc}); {'moving' if move else 'the run moves'} it to "
                "checkpoints/corrupt/ and trying an older one"
            )
            if move:
                _quarantine(run_uri, name)
            tried.append(name)
            continue
        if tried:
            log.warning(f"resuming from {name}.pt instead of {tried[0]}.pt, which was corrupt")
        return state, name
    if tried:
        raise DataError(
            f"no readable checkpoint in {storage.join(ckpt_dir, '')}: {', '.join(tried)} failed verification "
            "(the run moves them to checkpoints/corrupt/); restore one, or set a new JOB_RUN_NAME to start over"
        )
    return None, None


class Uploader:
    """Runs checkpoint commits in a background thread, at most one in flight, so training does
    not stall on object-store uploads (ray-project/ray#48801). A daemon thread: if the process
    must exit before an upload ends, the previous checkpoint stays the valid one. After a stop
    signal every wait ends with the grace period, whatever the storage does."""

    def __init__(self, run_uri: str, stop=None, grace_seconds: float = 0.0, log_every: float = 10.0):
        self.run_uri, self.stop, self.grace_seconds, self.log_every = run_uri, stop, grace_seconds, log_every
        self._pending: Future | None = None

    def submit(self, fn, *args) -> bool:
        """Start fn(*args) once the previous upload is done; False if that one did not end in time."""
        if not self.wait():
            return False
        future: Future = Future()

        def work():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=work, name="checkpoint-upload", daemon=True).start()
        self._pending = future
        return True

    def wait(self, deadline: float | None = None) -> bool:
        """Wait for the upload in flight and re-raise its error. False if `deadline` (a
        time.monotonic() value) or, after a stop signal, the grace period ended first."""
        if self._pending is None:
            return True
        start = next_log = time.monotonic()
        while True:
            if time.monotonic() - next_log >= self.log_every:
                next_log = time.monotonic()
                log.info(
                    f"waiting for the upload to {storage.redact_uri(self.run_uri)} to finish "
                    f"({next_log - start:.0f} s so far)"
                )
            end = deadline
            if self.stop is not None and self.stop.signum:
                grace_end = self.stop.deadline(self.grace_seconds)
                end = grace_end if end is None else min(end, grace_end)
            timeout = 0.5 if end is None else max(0.0, min(0.5, end - time.monotonic()))
            try:
                self._pending.exception(timeout=timeout)  # polls, so a signal's deadline is noticed
                break
            except FutureTimeout:
                if end is not None and time.monotonic() >= end:
                    return False
        pending, self._pending = self._pending, None
        with storage.errors(self.run_uri, OutputError, "write checkpoint or report to"):
            pending.result()
        return True


# --- what a checkpoint holds, and resuming from one -------------------------------------------


def contents(settings, runtime, module: torch.nn.Module, state, data) -> dict:
    """The checkpoint of a run now: a plain dict of tensors and Python values."""
    p = state.progress
    return {
        "format_version": FORMAT_VERSION,
        "model": module.state_dict(),  # unwrapped: loads with any number of processes
        "optimizer": state.optimizer.state_dict(),
        # the lr schedule is a pure function of progress; recorded here for readers
        "scheduler": {
            "schedule": settings.lr_schedule,
            "lr": settings.lr * lr_factor(settings, p.epoch + p.seen / len(state.train_idx)),
        },
        "progress": asdict(p),
        "history": list(state.history),
        "best_epoch": state.best_epoch,
        "best_val_accuracy": state.best_val_accuracy,
        "settings": settings.public_dict(),
        "world_size": runtime.world_size,
        "class_names": data.class_names,
        "dataset_fingerprint": data.fingerprint,
        "split": {"train": state.train_idx, "val": state.val_idx},
        "rng": torch.get_rng_state(),
        # the training device's generator (dropout draws there): every rank seeds and draws alike,
        # so rank 0's state is every rank's (a list over all GPUs would give rank k rank 0's unused one)
        "cuda_rng": torch.cuda.get_rng_state(runtime.device) if runtime.device.type == "cuda" else None,
        # fp16's loss scale and growth tracker: afresh, a resumed run would overflow and skip steps
        # while the scale falls back from 65536 to where it was
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "val_confusion": state.val_confusion,  # the last evaluation's, for the final report
        "input_shape": list(data.samples.sample_shape),  # what the model takes (data as read, not cached features)
        "input_kind": "idx" if data.samples.in_memory else "image",
        "settings_changes": list(state.settings_changes),
    }


def position(progress, train_samples: int | None = None) -> str:
    """Where a checkpoint stands, 1-based as the log's epochs are."""
    if progress.seen == 0:
        return f"end of epoch {progress.epoch}"
    return f"epoch {progress.epoch + 1}, sample {progress.seen}{f'/{train_samples}' if train_samples else ''}"


def restore(saved: dict, name: str, settings, module: torch.nn.Module, state, data, run_uri: str,
            device: torch.device | None = None) -> None:
    """Continue from a checkpoint after checking it belongs to this experiment and data. Every
    rank loads the same state: the partial-epoch sums in it are all ranks' together, and every
    rank keeps them so (loop.add_sums adds the all-reduced sums of later steps on every rank).
    `device`: the training device, whose CUDA generator takes the saved state.
    A checkpoint whose fields are malformed (it verified against its manifest: written so, or
    edited and re-signed by hand) is exit 3 naming it, never a traceback."""
    try:
        _restore(saved, name, settings, module, state, data, run_uri)
        _restore_device_state(saved, state, device or torch.device("cpu"))
    except MALFORMED as exc:
        raise DataError(
            f"checkpoints/{name}.pt in {storage.redact_uri(run_uri)} cannot be resumed: {exc.__class__.__name__}: "
            f"{' '.join(str(exc).split())[:200]}; use a new JOB_RUN_NAME to start a separate run"
        ) from None


def _restore(saved: dict, name: str, settings, module: torch.nn.Module, state, data, run_uri: str) -> None:
    from job.loop import Progress

    problems = []
    fixed, changes = settings_changes(saved, settings)
    for key, (old, new) in fixed.items():
        problems.append(f"JOB_{key.upper()} was {old}, now {new}")
    if saved["class_names"] != data.class_names:
        problems.append(f"classes {saved['class_names']} != {data.class_names}")
    if saved["dataset_fingerprint"] != data.fingerprint:
        problems.append("the dataset changed (fingerprint differs)")
    split = saved["split"]
    if len(split["train"]) + len(split["val"]) != len(data.samples):
        problems.append("the saved split does not fit the dataset")
    if problems:
        raise DataError(
            f"the checkpoint in {storage.redact_uri(run_uri)} does not fit these settings: "
            f"{'; '.join(problems)}; use a new JOB_RUN_NAME to start a separate run"
        )
    module.load_state_dict(saved["model"])
    current = [{k: v for k, v in group.items() if k != "params"} for group in state.optimizer.param_groups]
    state.optimizer.load_state_dict(saved["optimizer"])
    for group, settings_now in zip(state.optimizer.param_groups, current, strict=True):
        group.update(settings_now)  # load_state_dict restores the saved momentum, weight decay, lr scales
    state.progress = Progress(**saved["progress"])
    for key, value in vars(state.progress).items():  # a dataclass checks nothing: a hand edit may put text here
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"progress.{key} is {value!r}, not a number of at least 0")
    state.history = list(saved["history"])
    state.best_epoch, state.best_val_accuracy = saved["best_epoch"], saved["best_val_accuracy"]
    state.train_idx, state.val_idx = split["train"], split["val"]
    state.val_confusion = saved.get("val_confusion")  # absent from checkpoints of trainjob <= 0.1
    torch.set_rng_state(saved["rng"])
    state.settings_changes = list(saved.get("settings_changes") or [])
    if changes:
        p = state.progress
        state.settings_changes.append(
            {"epoch": p.epoch, "seen": p.seen, "global_step": p.global_step,
             "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}}
        )
        log.info(
            f"settings changed since the checkpoint, from {position(p, len(state.train_idx))} on: "
            + ", ".join(f"JOB_{k.upper()} {old} -> {new}" for k, (old, new) in changes.items())
        )
    log.info(
        f"resumed from checkpoints/{name}.pt ({position(state.progress, len(state.train_idx))}; "
        f"global step {state.progress.global_step}, written by {saved['world_size']} process(es)); "
        f"{len(state.history)} epochs in the history"
    )


def _restore_device_state(saved: dict, state, device: torch.device) -> None:
    """The GradScaler's and the CUDA generator's state, where this run has them. Older
    checkpoints (and those written on the CPU) hold neither: the run goes on without, saying so."""
    scaler = saved.get("scaler")
    if scaler is not None:
        scaler = _checked_scaler(scaler)  # checked even when unused: every field is data to check
    if state.scaler is not None and scaler is not None:
        state.scaler.load_state_dict(scaler)
    elif state.scaler is not None:
        log.info("the checkpoint holds no GradScaler state (written without fp16, or by an older trainjob): "
                 "the loss scale starts afresh")
    cuda_rng = saved.get("cuda_rng")
    if cuda_rng is not None and not (isinstance(cuda_rng, torch.Tensor) and cuda_rng.dtype == torch.uint8):
        raise TypeError(f"cuda_rng is {getattr(cuda_rng, 'dtype', type(cuda_rng).__name__)}, not a byte tensor")
    on_cuda = device.type == "cuda"
    if on_cuda and cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    elif on_cuda or cuda_rng is not None:
        written = "on the CPU or by an older trainjob" if cuda_rng is None else "on a GPU"
        log.info(
            f"the CUDA random state was not restored (the checkpoint was written {written}, this run trains on "
            f"the {'GPU' if on_cuda else 'CPU'}): random draws on the device differ from an uninterrupted run's"
        )


def _checked_scaler(value) -> dict:
    """A GradScaler state_dict whose values are what GradScaler would make: load_state_dict takes
    a text or NaN scale as it is (torch 2.14), to fail at the first step or skip every step after."""
    if not isinstance(value, dict):
        raise TypeError(f"scaler is {type(value).__name__}, not a dict")
    reals = [value[k] for k in ("scale", "growth_factor", "backoff_factor")]
    wholes = [value[k] for k in ("growth_interval", "_growth_tracker")]
    if not (
        all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in reals)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in wholes)
        and reals[0] > 0 and reals[1] > 1 and 0 < reals[2] < 1 and wholes[0] > 0 and wholes[1] >= 0
    ):
        raise ValueError(f"scaler holds {value!r}, not a GradScaler's state")
    return value


def settings_changes(saved: dict, settings) -> tuple[dict, dict]:
    """({setting: (old, new)} that a resume refuses, {setting: (old, new)} that it records): this
    run's settings against the checkpoint's, by kind (FIXED_ON_RESUME, SCHEDULE_SETTINGS). A
    setting the checkpoint does not record (an older trainjob) is not compared."""
    old, new = saved["settings"], settings.public_dict()
    changed = {k: (old[k], new[k]) for k in (*FIXED_ON_RESUME, *SCHEDULE_SETTINGS) if k in old and old[k] != new[k]}
    if saved.get("input_kind") == "idx":
        changed.pop("image_size", None)  # IDX images keep their own size
    if old.get("model") in ("mlp", "cnn") and new["model"] in ("mlp", "cnn"):
        changed.pop("pretrained", None)  # only torchvision models load pretrained weights
    fixed = {k: v for k, v in changed.items() if k in FIXED_ON_RESUME}
    return fixed, {k: v for k, v in changed.items() if k in SCHEDULE_SETTINGS}


# where and how the data is read: the dataset's fingerprint is compared with the checkpoint's
# only where it is read, so a run whose data comes from elsewhere is not answered from its records
DATA_SETTINGS = ("data_uri", "data_format")


def finished(run_uri: str, settings) -> dict | None:
    """latest.json when it says the run is at JOB_EPOCHS or past under settings a resume takes
    (settings_changes: no refused change, the same data URI and format) and JOB_RESUME allows
    resuming; None otherwise, or when the pointer cannot tell (written by trainjob <= 0.1, or
    unreadable): the run then loads the checkpoint to know. Whether the run completed is the
    summary's to say (report.completed)."""
    if settings.resume == "never":
        return None  # a run that holds a checkpoint is refused, complete or not
    try:
        latest = storage.read_json(storage.join(_dir(run_uri), "latest.json"))
        epoch, saved = int(latest["epoch"]), latest["settings"]
        if not isinstance(saved, dict) or not isinstance(latest["file"], str):
            raise TypeError(saved)
        fixed, _ = settings_changes({"settings": saved, "input_kind": latest.get("input_kind")}, settings)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    now = settings.public_dict()
    if fixed or epoch < settings.epochs or any(saved.get(k) != now[k] for k in DATA_SETTINGS):
        return None
    file = _own_file(run_uri, "latest.json", latest["file"], ".pt")  # as the run would refuse it
    # its manifest as the pointer copied it, and its file: one the resume would find corrupt or
    # missing (and fall back from, or refuse) is not answered from records; its bytes are not read
    try:
        manifest = storage.read_json(storage.join(_dir(run_uri), file[:-3] + ".json"))
    except (FileNotFoundError, ValueError):
        return None
    return latest if manifest == latest and storage.exists(storage.join(_dir(run_uri), file)) else None


def load_resume_state(settings, run_uri: str, move: bool = True) -> tuple[dict | None, str | None]:
    """Apply JOB_RESUME to the run's newest good checkpoint: never silently restart a run that
    has history from scratch. Returns (checkpoint, its name) or (None, None)."""
    shown = storage.redact_uri(run_uri)
    with storage.errors(run_uri, DataError, "read checkpoints from"):
        saved, name = load_latest(run_uri, move)
        has_history = storage.exists(storage.join(run_uri, "history.jsonl"))
    if saved is not None and settings.resume == "never":
        raise DataError(
            f"{shown} already holds a checkpoint and JOB_RESUME=never; "
            "set a new JOB_RUN_NAME, delete the run, or use JOB_RESUME=auto"
        )
    if saved is None and settings.resume == "require":
        raise DataError(f"JOB_RESUME=require but {shown} holds no checkpoint")
    if saved is None and has_history and settings.resume == "auto":
        raise DataError(
            f"{shown} has a history but no readable checkpoint; refusing to restart it from scratch. "
            "Set JOB_RESUME=never with a new JOB_RUN_NAME to start over"
        )
    return saved, name


class Checkpointer:
    """When and how a run saves, called by the loop at step and epoch edges.

    Rank 0 snapshots the state (a few milliseconds: serialize()) and commits it in the background
    (Uploader); the run's records (the `records` callback: run.py's history, summary, plots and
    tracking) are published after the checkpoint that holds them, so no history row ever runs
    ahead of a checkpoint; what to publish is not this class's business. Epoch-end checkpoints are taken at
    most once per JOB_CHECKPOINT_MIN_SECONDS: tiny epochs would otherwise spend their time
    publishing (scripts/bench_mlp.py measured the job at 0.24x its loop's speed when every 40 ms
    epoch was published). The last epoch, a stop and JOB_CHECKPOINT_EVERY_STEPS always save; a
    new best epoch between two checkpoints is snapshotted and written as best.pt with the next."""

    def __init__(
        self, settings, runtime, run_uri: str, module: torch.nn.Module, state, data, lease, started: float,
        records: Callable[[], Callable[[], None]] | None = None,
    ):
        self.settings, self.rt, self.run_uri, self.module, self.state, self.data = (
            settings,
            runtime,
            run_uri,
            module,
            state,
            data,
        )
        # records() is called when a checkpoint is taken and returns what publishes the run's records
        # as they are then (history, summary, plots, tracking: run.py's), run after the commit
        self.lease, self.started, self.records = lease, started, records
        self.uploader = Uploader(run_uri, runtime.stop, settings.stop_grace_seconds, settings.log_every_seconds)
        self.valid = "no checkpoint saved"  # the newest committed checkpoint, for the last log line
        self.last_save = time.monotonic()
        self.pending_best: tuple[bytes, dict] | None = None
        self.published_epochs = -1  # the history length the published curves show

    def resumed(self, name: str) -> None:
        self.valid = f"checkpoints/{name}.pt ({position(self.state.progress, len(self.state.train_idx))})"

    def _snapshot(self) -> tuple[bytes, dict]:
        p = self.state.progress
        blob = serialize(contents(self.settings, self.rt, self.module, self.state, self.data))
        # the settings also in the manifest (so in latest.json): a rerun of a completed run is
        # answered from it without the dataset or the checkpoint (finished())
        return blob, {"epoch": p.epoch, "seen": p.seen, "global_step": p.global_step,
                      "settings": self.settings.public_dict(),
                      "input_kind": "idx" if self.data.samples.in_memory else "image"}

    def save(self, best: bool = False, epoch_end: bool = False) -> bool:
        """Checkpoint now (or, at an epoch end, when one is due). True when a checkpoint is on its
        way; False when none was due, or it could not even start (the previous upload had not
        ended by a stop's deadline). Other ranks: True (rank 0 decides)."""
        if not self.rt.is_main:
            return True
        s, p = self.settings, self.state.progress
        if epoch_end and p.epoch < s.epochs and time.monotonic() - self.last_save < s.checkpoint_min_seconds:
            if best:
                self.pending_best = self._snapshot()
            return False
        if not self.uploader.wait():
            return False
        self.last_save = time.monotonic()
        blob, meta = self._snapshot()
        best_blob, self.pending_best = (None if best else self.pending_best), None
        name = f"step-{p.global_step:09d}"
        where = f"checkpoints/{name}.pt ({position(p, len(self.state.train_idx))})"
        epochs = len(self.state.history)
        after = self.records() if self.records is not None else None

        def publish():
            commit(self.run_uri, name, blob, meta, best, s.keep_checkpoints, self.lease, best_blob)
            self.valid = where
            if after is not None:
                after()
            self.published_epochs = epochs

        return self.uploader.submit(publish)

    def stop(self, signum: int, saving: bool) -> NoReturn:
        """Wait for the stop checkpoint within the grace period, then end every rank with
        128+signal, saying truthfully which checkpoint is the valid one. The other ranks wait for
        rank 0's upload: a rank that left early would make torchrun kill rank 0 in the middle of it."""
        saved = saving and self.rt.is_main and self.uploader.wait()
        if self.rt.is_main and not saved:
            log.warning(
                f"the stop checkpoint was not saved within JOB_STOP_GRACE_SECONDS="
                f"{self.settings.stop_grace_seconds:g}; the valid checkpoint is {self.valid}"
            )
        saved, valid = self.rt.broadcast((saved, self.valid))  # rank 0 knows what was committed
        self.rt.barrier()
        if saved:
            raise Stopped(signum, f"after saving a checkpoint: {valid}")
        raise Stopped(signum, f"without a new checkpoint; the valid one is {valid}")

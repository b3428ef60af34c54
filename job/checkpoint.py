"""Checkpoints: plain dicts, committed in a verifiable order, loaded with weights_only=True.

Commit protocol (object stores have no rename and no symlinks):
  1. checkpoints/step-<global step>.pt    the bytes (a PUT is atomic on S3; local: temp + rename)
  2. checkpoints/step-<global step>.json  its manifest: size and sha256
  3. checkpoints/last.pt                  a server-side copy, for people and tools
  4. checkpoints/latest.json              the pointer; only now is the checkpoint "last"
A kill at any point leaves the previous pointer and checkpoint valid. Resume verifies the sha256
and falls back to older checkpoints, moving one that fails verification to checkpoints/corrupt/;
a signal or a storage error while reading moves nothing. The pointer never moves to an older
step than the one it names (unless that one is gone), and every commit first renews the run's
lease, so a second writer cannot turn the run back.
"""

import hashlib
import io
import logging
import threading
import time
from concurrent.futures import Future

import torch

from job import storage
from job.errors import DataError, OutputError
from job.lease import LeaseLost

FORMAT_VERSION = 1
log = logging.getLogger("job")


def _dir(run_uri: str) -> str:
    return storage.join(run_uri, "checkpoints")


def serialize(state: dict) -> bytes:
    """Snapshot the state now: the bytes are independent of tensors that keep training."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def commit(run_uri: str, name: str, blob: bytes, meta: dict, best: bool, keep: int, lease=None) -> None:
    """Publish one checkpoint (steps 1-4 above), then prune old ones. Runs in the uploader thread."""
    ckpt_dir = _dir(run_uri)
    manifest = {"file": f"{name}.pt", "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), **meta}
    if lease is not None:
        lease.renew()
    storage.write_bytes(storage.join(ckpt_dir, f"{name}.pt"), blob)
    storage.write_json(storage.join(ckpt_dir, f"{name}.json"), manifest)
    storage.copy(storage.join(ckpt_dir, f"{name}.pt"), storage.join(ckpt_dir, "last.pt"))
    if best:
        storage.copy(storage.join(ckpt_dir, f"{name}.pt"), storage.join(ckpt_dir, "best.pt"))
        storage.write_json(storage.join(ckpt_dir, "best.json"), {**manifest, "file": "best.pt"})
    _advance_pointer(ckpt_dir, manifest)
    for old in _step_names(run_uri)[:-keep]:
        storage.remove(storage.join(ckpt_dir, f"{old}.pt"))
        storage.remove(storage.join(ckpt_dir, f"{old}.json"))


def _advance_pointer(ckpt_dir: str, manifest: dict) -> None:
    """Point latest.json at `manifest`, never back at an older step while the newer one exists."""
    pointer = storage.join(ckpt_dir, "latest.json")
    try:
        current = storage.read_json(pointer)
        newer = current["global_step"] > manifest["global_step"] and storage.exists(storage.join(ckpt_dir, current["file"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        newer = False
    if newer:
        raise LeaseLost(f"checkpoints/latest.json names {current['file']}, newer than {manifest['file']}: another "
                        "job is writing this run; not moving it back")
    storage.write_json(pointer, manifest)


def _step_names(run_uri: str) -> list[str]:
    """Committed checkpoints (those with a manifest), oldest first."""
    names = storage.list_names(_dir(run_uri))
    return sorted(n[:-5] for n in names if n.startswith("step-") and n.endswith(".json"))


class Corrupt(Exception):
    """A checkpoint failed verification: its manifest is unreadable or its bytes do not match it."""


def _verified(run_uri: str, name: str) -> dict:
    """The checkpoint `name`, its bytes checked against its manifest. FileNotFoundError when it
    is incomplete (a manifest without its file); Corrupt when it fails verification; storage
    errors and signals propagate untouched."""
    ckpt_dir = _dir(run_uri)
    try:
        manifest = storage.read_json(storage.join(ckpt_dir, f"{name}.json"))
        size, sha256, file = int(manifest["size"]), manifest["sha256"], manifest["file"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Corrupt(f"its manifest is unreadable ({exc.__class__.__name__})") from None
    blob = storage.read_bytes(storage.join(ckpt_dir, file), nbytes=size)
    if len(blob) != size or hashlib.sha256(blob).hexdigest() != sha256:
        raise Corrupt(f"size {len(blob)} / sha256 differ from its manifest (expected {size} bytes)")
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # the bytes are what was written: not corruption, a format this version cannot read
        raise DataError(f"checkpoint {file} in {storage.redact_uri(run_uri)} matches its sha256 but cannot be loaded "
                        f"({exc.__class__.__name__}: {str(exc)[:200]}); was it written by another version of trainjob?") from None


def _quarantine(run_uri: str, name: str) -> None:
    ckpt_dir = _dir(run_uri)
    for suffix in (".pt", ".json"):
        src = storage.join(ckpt_dir, name + suffix)
        if storage.exists(src):
            storage.copy(src, storage.join(ckpt_dir, "corrupt", name + suffix))
            storage.remove(src)


def load_latest(run_uri: str) -> tuple[dict | None, str | None]:
    """(state, name) of the newest checkpoint that verifies, or (None, None) when the run has none.

    Tries the one latest.json points at first, then older ones; each that fails verification is
    reported and moved to checkpoints/corrupt/. Raises DataError when checkpoints exist but none
    is readable: that run must never silently restart from scratch.
    """
    ckpt_dir = _dir(run_uri)
    candidates = list(reversed(_step_names(run_uri)))
    try:
        pointed = storage.read_json(storage.join(ckpt_dir, "latest.json"))["file"][:-3]
        candidates = [pointed] + [c for c in candidates if c != pointed]
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError):
        log.warning("checkpoints/latest.json is unreadable; looking for the newest good checkpoint")
    tried = []
    for name in candidates:
        try:
            state = _verified(run_uri, name)
        except FileNotFoundError:
            continue
        except Corrupt as exc:
            log.warning(f"checkpoint {name}.pt failed verification ({exc}); moving it to checkpoints/corrupt/ "
                        "and trying an older one")
            _quarantine(run_uri, name)
            tried.append(name)
            continue
        if tried:
            log.warning(f"resuming from {name}.pt instead of {tried[0]}.pt, which was corrupt")
        return state, name
    if tried:
        raise DataError(f"no readable checkpoint in {storage.join(ckpt_dir, '')}: {', '.join(tried)} failed verification "
                        "and were moved to checkpoints/corrupt/; restore one, or set a new JOB_RUN_NAME to start over")
    return None, None


class Uploader:
    """Runs checkpoint commits in a background thread, at most one in flight, so training does
    not stall on object-store uploads (ray-project/ray#48801). A daemon thread: if the process
    must exit before an upload ends, the previous checkpoint stays the valid one. After a stop
    signal every wait ends with the grace period, whatever the storage does."""

    def __init__(self, run_uri: str, stop=None, grace_seconds: float = 0.0):
        self.run_uri, self.stop, self.grace_seconds = run_uri, stop, grace_seconds
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
        while True:
            end = deadline
            if self.stop is not None and self.stop.signum:
                grace_end = self.stop.deadline(self.grace_seconds)
                end = grace_end if end is None else min(end, grace_end)
            timeout = 0.5 if end is None else max(0.0, min(0.5, end - time.monotonic()))
            try:
                self._pending.exception(timeout=timeout)  # polls, so a signal's deadline is noticed
                break
            except TimeoutError:
                if end is not None and time.monotonic() >= end:
                    return False
        pending, self._pending = self._pending, None
        with storage.errors(self.run_uri, OutputError, "write checkpoint or report to"):
            pending.result()
        return True

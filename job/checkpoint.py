"""Checkpoints: plain dicts, committed in a verifiable order, loaded with weights_only=True.

Commit protocol (object stores have no rename and no symlinks):
  1. checkpoints/step-<global step>.pt    the bytes (a PUT is atomic on S3; local: temp + rename)
  2. checkpoints/step-<global step>.json  its manifest: size and sha256
  3. checkpoints/last.pt                  a server-side copy, for people and tools
  4. checkpoints/latest.json              the pointer; only now is the checkpoint "last"
A kill at any point leaves the previous pointer and checkpoint valid. Resume verifies the sha256
and falls back to older checkpoints, moving a bad one to checkpoints/corrupt/.
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

FORMAT_VERSION = 1
log = logging.getLogger("job")


def _dir(run_uri: str) -> str:
    return storage.join(run_uri, "checkpoints")


def serialize(state: dict) -> bytes:
    """Snapshot the state now: the bytes are independent of tensors that keep training."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def commit(run_uri: str, name: str, blob: bytes, meta: dict, best: bool, keep: int) -> None:
    """Publish one checkpoint (steps 1-4 above), then prune old ones. Runs in the uploader thread."""
    ckpt_dir = _dir(run_uri)
    manifest = {"file": f"{name}.pt", "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), **meta}
    storage.write_bytes(storage.join(ckpt_dir, f"{name}.pt"), blob)
    storage.write_json(storage.join(ckpt_dir, f"{name}.json"), manifest)
    storage.copy(storage.join(ckpt_dir, f"{name}.pt"), storage.join(ckpt_dir, "last.pt"))
    if best:
        storage.copy(storage.join(ckpt_dir, f"{name}.pt"), storage.join(ckpt_dir, "best.pt"))
        storage.write_json(storage.join(ckpt_dir, "best.json"), {**manifest, "file": "best.pt"})
    storage.write_json(storage.join(ckpt_dir, "latest.json"), manifest)
    for old in _step_names(run_uri)[:-keep]:
        storage.remove(storage.join(ckpt_dir, f"{old}.pt"))
        storage.remove(storage.join(ckpt_dir, f"{old}.json"))


def _step_names(run_uri: str) -> list[str]:
    """Committed checkpoints (those with a manifest), oldest first."""
    names = storage.list_names(_dir(run_uri))
    return sorted(n[:-5] for n in names if n.startswith("step-") and n.endswith(".json"))


def _verified(run_uri: str, manifest: dict) -> dict:
    blob = storage.read_bytes(storage.join(_dir(run_uri), manifest["file"]))
    if len(blob) != manifest["size"] or hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise ValueError(f"size {len(blob)} / sha256 differ from its manifest (expected {manifest['size']} bytes)")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _quarantine(run_uri: str, name: str) -> None:
    ckpt_dir = _dir(run_uri)
    for suffix in (".pt", ".json"):
        src = storage.join(ckpt_dir, name + suffix)
        if storage.exists(src):
            storage.copy(src, storage.join(ckpt_dir, "corrupt", name + suffix))
            storage.remove(src)


def load_latest(run_uri: str) -> dict | None:
    """The newest checkpoint that verifies, or None when the run has none at all.

    Tries the one latest.json points at first, then older ones; each that fails its check is
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
            manifest = storage.read_json(storage.join(ckpt_dir, f"{name}.json"))
            state = _verified(run_uri, manifest)
        except FileNotFoundError:
            continue
        except Exception as exc:  # corrupt bytes, bad manifest, unpicklable content
            log.warning(f"checkpoint {name}.pt failed verification ({exc.__class__.__name__}: {str(exc)[:200]}); "
                        "moving it to checkpoints/corrupt/ and trying an older one")
            _quarantine(run_uri, name)
            tried.append(name)
            continue
        if tried:
            log.warning(f"resuming from {name}.pt instead of {tried[0]}.pt, which was corrupt")
        return state
    if tried:
        raise DataError(f"no readable checkpoint in {storage.join(ckpt_dir, '')}: {', '.join(tried)} failed verification "
                        "and were moved to checkpoints/corrupt/; restore one, or set a new JOB_RUN_NAME to start over")
    return None


class Uploader:
    """Runs checkpoint commits in a background thread, at most one in flight, so training does
    not stall on object-store uploads (ray-project/ray#48801). A daemon thread: if the process
    must exit before an upload ends, the previous checkpoint stays the valid one."""

    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self._pending: Future | None = None

    def submit(self, fn, *args) -> None:
        self.wait()
        future: Future = Future()

        def work():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=work, name="checkpoint-upload", daemon=True).start()
        self._pending = future

    def wait(self, deadline: float | None = None) -> bool:
        """Wait for the upload in flight; re-raise its error. False if the deadline passed first."""
        if self._pending is None:
            return True
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self._pending.exception(timeout=timeout)
        except TimeoutError:
            return False
        pending, self._pending = self._pending, None
        with storage.errors(self.run_uri, OutputError, "write checkpoint or report to"):
            pending.result()
        return True

"""The bounded local shard cache: shards on local disk, fetched ahead of need, checked against
the index's sha256, least recently used out first, never more than JOB_SHARD_CACHE_BYTES."""

import fcntl
import hashlib
import logging
import os
import tarfile
import threading
import time

from job import report, storage
from job.data.index import INDEX
from job.errors import DataError, SettingsError, StoppedWaitingForData

log = logging.getLogger("job")
WINDOW = 4  # shards a source reads at a time (their samples shuffled together); the cache looks ahead two windows


class ShardCache:
    """Shards on local disk, never more than `limit` bytes (space is reserved before a download
    starts), least recently used out first, fetched ahead of need in a background thread. Each
    shard is checked against its sha256 from the index: a mismatch is fetched once more, then
    refused (exit 3). A shard in use (pinned) is never evicted."""

    def __init__(self, uri: str, folder: str, limit: int, shards: list[dict], classes: int):
        self.uri, self.folder, self.limit, self.classes = uri, folder, limit, classes
        self.meta = {s["name"]: s for s in shards}
        self.local: dict[str, dict] = {}  # name -> {"path", "samples": [(offset, size, label, key)], "used"}
        self.pins: dict[str, int] = {}
        self.reserved = 0  # bytes on disk or being written
        self.error: Exception | None = None
        self.fetching: set[str] = set()
        self.plan: list[str] = []
        self.urgent: str | None = None  # the shard the training thread waits for: fetched first
        self.cursor = 0  # the plan's position of the last shard asked for: prefetch goes on from there
        self.peak = 0  # most bytes reserved at once (the limit is never passed)
        self.disk_peak = 0  # most bytes measured on disk, after each download
        self.downloads, self.downloaded = 0, 0  # shards and bytes downloaded so far (progress lines)
        self.said = 0.0  # when get() last said what it waits for
        self.lock = threading.Condition()
        folder = self.folder = claim(folder)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # a previous process's files: the budget starts from scratch
            os.remove(os.path.join(folder, name))
        threading.Thread(target=self._prefetch, name="shard-prefetch", daemon=True).start()

    def bytes_on_disk(self) -> int:
        total = 0
        for entry in os.scandir(self.folder):  # a file renamed or evicted meanwhile is simply not counted
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def want(self, sequence: list[str]) -> None:
        """The order the shards will be needed in: the prefetcher works down it."""
        with self.lock:
            self.plan, self.cursor = list(sequence), 0
            self.lock.notify_all()

    def get(self, name: str) -> dict:
        """The local shard, pinned until release(). Every download runs in the prefetch thread
        (this one asks for the shard first and waits), so the training thread stays free to
        answer a stop: a stalled download is given up at half the grace period, leaving the
        loop the other half to save its last step. While it waits, a line says so whenever the
        log has been quiet for JOB_LOG_EVERY_SECONDS: the first batches of a pass can need a
        dozen shards, each quick to fetch, and the run said nothing for 69 s (issue 24)."""
        with self.lock:
            if name in self.plan[self.cursor :]:
                self.cursor += self.plan[self.cursor :].index(name)
            while True:
                if self.error:
                    raise self.error
                if name in self.local:
                    self.pins[name] = self.pins.get(name, 0) + 1
                    self.local[name]["used"] = time.monotonic()
                    return self.local[name]
                self.urgent = name
                self.lock.notify_all()
                due = report.quiet_since(self.said) + storage.log_every()
                if time.monotonic() >= due:
                    self.said = time.monotonic()
                    log.info(self._waiting(name))
                    due = self.said + storage.log_every()
                self.lock.wait(min(0.5, max(0.0, due - time.monotonic())))
                signum, deadline = storage.stop_pending(share=0.5)
                if signum and time.monotonic() >= deadline:
                    raise StoppedWaitingForData(signum, f"while waiting for shard {name} to download")

    def _waiting(self, name: str) -> str:
        """What get() waits for, and how far the cache has come (call with the lock held)."""
        here = self.plan[self.cursor:][:1] == [name]
        where = f" (shard {self.cursor + 1}/{len(self.plan)} of this pass)" if here else ""
        return (f"waiting for shard {name} to download{where}; {self.downloads} shards "
                f"({self.downloaded / 1e6:,.1f} MB) downloaded so far")

    def release(self, name: str) -> None:
        with self.lock:
            self.pins[name] -= 1
            self.lock.notify_all()

    def _room(self, size: int, for_now: bool) -> bool:
        """Reserve `size` bytes, evicting unpinned shards (least recently used first). Without
        room, the prefetcher waits; a shard needed now means the limit is too small (raise)."""
        # fetching ahead never evicts a shard of the look-ahead itself: with room for fewer shards
        # than it looks ahead, it would evict what it just fetched, again and again
        ahead = set() if for_now else set(self.plan[self.cursor:self.cursor + 2 * WINDOW])
        while self.reserved + size > self.limit:
            idle = [(s["used"], n) for n, s in self.local.items() if not self.pins.get(n) and n not in ahead]
            if not idle:
                if not for_now:
                    return False
                raise SettingsError(
                    f"JOB_SHARD_CACHE_BYTES={self.limit} cannot hold the shards in use at once plus the next one "
                    f"({size} bytes): raise it (at least {2 * WINDOW + 2} shards of this dataset is safe)"
                )
            _, victim = min(idle)
            path = self.local.pop(victim)["path"]
            self.reserved -= self.meta[victim]["bytes"]
            os.remove(path)
        self.reserved += size
        self.peak = max(self.peak, self.reserved)
        return True

    def _fetch(self, name: str, for_now: bool) -> bool:
        size = self.meta[name]["bytes"]
        with self.lock:
            if name in self.local or name in self.fetching:
                return True
            if not self._room(size, for_now):
                return False
            self.fetching.add(name)
        try:
            path = self._download(name)
            samples = _members(path, self.meta[name]["samples"], self.classes)
        except Exception as exc:
            with self.lock:
                self.reserved -= size
                self.fetching.discard(name)
                # a shard needed now: any failure is the run's (get raises it); ahead of need,
                # only a verdict on the data is, the rest is tried again when it is needed
                if for_now or isinstance(exc, (DataError, SettingsError)):
                    self.error = self.error or exc
                self.lock.notify_all()
            return False
        with self.lock:
            self.local[name] = {"path": path, "samples": samples, "used": time.monotonic()}
            self.fetching.discard(name)
            self.lock.notify_all()
        return True

    def _download(self, name: str) -> str:
        meta = self.meta[name]
        uri = storage.join(self.uri, name)
        for attempt in (1, 2):  # a shard whose bytes do not match the index is fetched once more
            with storage.errors(uri, DataError, "read shard"):  # never more than the index says, plus one byte
                blob = storage.read_bytes(uri, max_bytes=meta["bytes"], nbytes=meta["bytes"])
            if len(blob) > meta["bytes"]:  # replaced or appended to: no second read will make it fit
                raise DataError(
                    f"shard {storage.redact_uri(uri)} is larger than the {meta['bytes']} bytes its entry in {INDEX} "
                    "says: replaced, or not this dataset's; prepare the dataset again"
                )
            if len(blob) == meta["bytes"] and hashlib.sha256(blob).hexdigest() == meta["sha256"]:
                path = os.path.join(self.folder, name)
                tmp = storage.tmp_name(path)
                with open(tmp, "wb") as f:
                    f.write(blob)
                os.replace(tmp, path)
                with self.lock:
                    self.disk_peak = max(self.disk_peak, self.bytes_on_disk())
                    self.downloads, self.downloaded = self.downloads + 1, self.downloaded + len(blob)
                return path
            log.warning(
                f"shard {storage.redact_uri(uri)} does not match its sha256 in {INDEX} "
                f"({len(blob)} bytes, expected {meta['bytes']}){'; fetching it again' if attempt == 1 else ''}"
            )
        raise DataError(
            f"shard {storage.redact_uri(uri)} does not match its sha256 in {INDEX}, twice: it is corrupt "
            "or was replaced; prepare the dataset again"
        )

    def _prefetch(self) -> None:
        while True:
            with self.lock:
                urgent, self.urgent = self.urgent, None
                if urgent and urgent not in self.local and not self.error:
                    todo, for_now = [urgent], True  # the loop waits for it
                else:
                    ahead = self.plan[self.cursor : self.cursor + 2 * WINDOW]
                    todo, for_now = [n for n in ahead if n not in self.local and n not in self.fetching], False
                if not todo or self.error:
                    self.lock.wait(0.5)
                    continue
            try:
                fetched = self._fetch(todo[0], for_now=for_now)
            except SettingsError as exc:  # no room for the shard needed now: the cache is too small
                with self.lock:
                    self.error = self.error or exc
                    self.lock.notify_all()
                continue
            if not fetched:
                with self.lock:
                    self.lock.wait(0.2)  # no room yet: after the next release


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    f = tar.extractfile(member)
    if f is None:  # a regular file always has its bytes; only links and devices have none
        raise ValueError(f"{member.name} has no data")
    return f.read(limit)


def _members(path: str, expected: int, classes: int) -> list[tuple[int, int, int, str]]:
    """[(offset, size, label, key)] of a shard's samples, in order, from its tar headers. A shard
    whose sha256 matched can still have been written by someone else: labels outside the
    classes, text that is not a number, or another count of samples than the index says are a
    DataError (exit 3), named."""
    samples: list[tuple[int, int, int, str]] = []
    pending: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed only: offsets index the file itself
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                entry = pending.setdefault(key, {})
                if ext == "cls":
                    entry["cls"] = int(_read_member(tar, member, 32).decode("ascii").strip())
                    if not 0 <= entry["cls"] < classes:
                        raise ValueError(f"label {entry['cls']} outside the {classes} classes")
                elif ext in ("jpg", "jpeg", "png"):
                    entry["image"] = (member.offset_data, member.size)
                if "cls" in entry and "image" in entry:
                    samples.append((*entry["image"], entry["cls"], key))
                    del pending[key]
    except (tarfile.TarError, ValueError, UnicodeDecodeError, EOFError, OSError) as exc:
        raise DataError(
            f"shard {os.path.basename(path)} is not a readable trainjob shard: "
            f"{str(exc)[:200]}; prepare the dataset again"
        ) from None
    if len(samples) != expected:
        raise DataError(
            f"shard {os.path.basename(path)} holds {len(samples)} samples, its index says {expected}; "
            "prepare the dataset again"
        )
    return samples



def claim(folder: str) -> str:
    """`folder`, or `folder-1`, `folder-2`, ... the first that no live process holds: each is held
    through an flock on `<folder>.lock` beside it, held while the process lives (as the cache's
    prefetch thread does) and released by the kernel when it ends, kill -9 included. A cache
    empties its folder at start, so a --check, a predict or a second job streaming the same dataset
    through the same JOB_CACHE_DIR once deleted the shards a running job was reading."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    for n in range(1000):
        candidate = folder if n == 0 else f"{folder}-{n}"
        fd = os.open(candidate + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return candidate  # fd stays open: the flock is this process's until it ends
    raise SettingsError(f"1000 processes hold shard cache folders beside {folder}; is JOB_CACHE_DIR shared by all?")


def cache_folder(settings, uri: str, local_rank: int) -> str:
    return os.path.join(
        settings.cache_dir, "shards", hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16], f"process-{local_rank}"
    )


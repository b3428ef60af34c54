"""One writer per run: a lease in the run directory.

Kubernetes can briefly run an old and a new pod of one Job, and a person can start the same
settings twice; two writers on one run prune each other's files and move `latest.json` back.
Object stores have no locks, but they have exclusive creation (S3 `If-None-Match: *`, a local
`open(..., "x")`), so the lease is a numbered series of objects, `<run>/lease/<generation>.json`:
the newest generation is the lease. A writer takes it by *creating* the next generation, which
only one writer can do, when the newest is expired or held by a process that is gone from this
machine (or there is none). Expired means *seen unchanged* for its JOB_LEASE_SECONDS on the
waiter's own monotonic clock: every renewal writes a new `renewal` id, and no two nodes' wall
clocks are compared (a node whose clock ran 2 h ahead took a live run's lease at once). The
holder rewrites its own generation to renew it (in a background thread and before every commit)
and deletes it at exit, which releases it. A second writer waits up to JOB_LEASE_SECONDS for it,
then exits 75 so that the scheduler tries again later.
"""

import logging
import os
import socket
import threading
import time
import uuid

from job import storage
from job.errors import TransientStorageError

log = logging.getLogger("job")
KEEP_GENERATIONS = 1  # ours: older generations only matter until ours exists
# how long release() waits for a renewal in flight: a healthy one takes milliseconds, a longer one
# is a write to a frozen store, which would hold a stop for up to JOB_STORAGE_TIMEOUT_SECONDS
RELEASE_WAIT_SECONDS = 1.0


class LeaseLost(TransientStorageError):
    """Another writer holds the run: stop writing (exit 75; a retry resumes from the checkpoint)."""


def _process_identity() -> dict:
    """Where this process runs, precisely enough to tell later whether it still does: a pid means
    something only on the same machine (boot) and in the same pid namespace (container)."""

    def read(path):
        try:
            return open(path).read().strip() if not path.startswith("/proc/self/ns") else os.readlink(path)
        except OSError:
            return ""

    return {"host": socket.gethostname(), "pid": os.getpid(), "boot": read("/proc/sys/kernel/random/boot_id"),
            "pidns": read("/proc/self/ns/pid")}


def _gone(holder: dict) -> bool:
    """True when the holder ran on this machine, in this pid namespace, and its process is gone
    (a kill -9 leaves an unreleased lease; no need to wait for it to expire)."""
    here = _process_identity()
    if not here["boot"] or any(holder.get(k) != here[k] for k in ("host", "boot", "pidns")):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError):
        return False
    return False


def _lease_seconds(holder: dict, ours: float) -> float:
    """How long the holder's lease lasts unrenewed: its own JOB_LEASE_SECONDS when it recorded a
    plausible one, else ours."""
    theirs = holder.get("lease_seconds")
    if isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and 0 < theirs < 86400:
        return float(theirs)
    return ours


class Lease:
    def __init__(self, run_uri: str, seconds: float):
        self.dir = storage.join(run_uri, "lease")
        self.seconds = seconds
        self.owner = uuid.uuid4().hex
        self.generation = 0  # ours, once held
        self.lost: str | None = None  # why we no longer hold it
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _uri(self, generation: int) -> str:
        return storage.join(self.dir, f"{generation:012d}.json")

    def _record(self) -> dict:
        # "expires" is for people reading the file; waiters judge by `renewal` changing (see above)
        return {"owner": self.owner, **_process_identity(), "expires": time.time() + self.seconds,
                "lease_seconds": self.seconds, "renewal": uuid.uuid4().hex[:12]}

    def _generations(self) -> list[int]:
        return sorted(int(n[:-5]) for n in storage.list_names(self.dir) if n.endswith(".json") and n[:-5].isdigit())

    def _newest(self) -> tuple[int, dict | None]:
        generations = self._generations()
        if not generations:
            return 0, None
        try:
            return generations[-1], storage.read_json(self._uri(generations[-1]))
        except (FileNotFoundError, ValueError):  # pruned or being written: treat as held, look again
            return generations[-1], {"expires": time.time() + 1, "host": "?", "pid": "?"}

    def acquire(self, take: bool = True) -> None:
        """Take the lease, waiting up to JOB_LEASE_SECONDS for another holder to release it or
        to expire; raise LeaseLost (exit 75) if it does not. take=False (--check) waits and
        refuses exactly so, but leaves the lease free once it is."""
        give_up = time.monotonic() + self.seconds + 5
        announced = False
        first_seen: dict[tuple, float] = {}  # (generation, renewal) -> when this process first saw it
        while True:
            generation, holder = self._newest()
            seen = first_seen.setdefault((generation, (holder or {}).get("renewal")), time.monotonic())
            unchanged = time.monotonic() - seen
            if holder is None or unchanged > _lease_seconds(holder, self.seconds) or _gone(holder):  # free
                if not take:
                    return
                try:
                    storage.create_json(self._uri(generation + 1), self._record())
                except FileExistsError:  # another writer took this generation first: look at it
                    if time.monotonic() > give_up:  # never spin on a store that refuses a create it does not list
                        raise LeaseLost(
                            f"could not take the run's lease: the store refuses to create "
                            f"{storage.redact_uri(self._uri(generation + 1))} but lists no newer generation; exit 75 "
                            "so that the scheduler retries later"
                        ) from None
                    time.sleep(0.05)  # a listing that lags the other writer's create shows it in moments
                    continue
                self.generation = generation + 1
                self._prune()
                threading.Thread(target=self._heartbeat, name="lease", daemon=True).start()
                return
            who = f"host {holder.get('host')} pid {holder.get('pid')}"
            if time.monotonic() > give_up:
                run = storage.redact_uri(self.dir.rsplit('/', 1)[0])
                raise LeaseLost(f"another job is writing {run} ({who}, its lease renewed {unchanged:.0f} s ago); "
                                "a run has one writer. Exit 75 so the scheduler retries later; if that job is gone, "
                                "its lease expires within JOB_LEASE_SECONDS")
            if not announced:
                log.warning(f"the run is held by another job ({who}); waiting up to {self.seconds:.0f} s "
                            "(JOB_LEASE_SECONDS) for it to finish or for its lease to go unrenewed that long")
                announced = True
            time.sleep(min(1.0, max(0.1, self.seconds / 10)))

    def renew(self) -> None:
        """Check we still hold the lease and extend it; raise LeaseLost if another writer took it.
        Called before every commit and by the heartbeat."""
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            if not self.generation:
                return
            if self._stop.is_set():  # released: a late commit or heartbeat must not hold the run again
                raise LeaseLost("lost the run's lease: this job gave it back as it ends, and writes no more")
            generation, holder = self._newest()
            if generation != self.generation or (holder or {}).get("owner") != self.owner:
                self.lost = (f"lost the run's lease to another job (host {(holder or {}).get('host')} pid "
                             f"{(holder or {}).get('pid')}) after ours expired; stopping without writing more. "
                             "Exit 75: a retry resumes from the last checkpoint")
                raise LeaseLost(self.lost)
            storage.write_json(self._uri(self.generation), self._record())

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.2, self.seconds / 4)):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception as exc:  # storage trouble: the next commit reports it; keep trying
                log.warning(f"could not renew the run's lease ({exc.__class__.__name__}); retrying")

    def _prune(self) -> None:
        try:
            for generation in self._generations()[:-KEEP_GENERATIONS]:
                storage.remove(self._uri(generation))
        except Exception:  # best effort: old generations are harmless
            pass

    def release(self) -> None:
        """Give the lease back by deleting our generation (best effort: an unreleased lease
        expires on its own). The newest generation is then an older, released or expired one.
        Does not wait for a renewal stuck on a frozen store: the job is stopping."""
        self._stop.set()  # renew() writes no more after this
        if not self._lock.acquire(timeout=RELEASE_WAIT_SECONDS):
            log.warning("a renewal of the run's lease is still writing (slow storage); not waiting for it: the lease "
                        f"expires on its own within JOB_LEASE_SECONDS={self.seconds:g}")
            return
        try:
            if self.generation and not self.lost:
                storage.remove(self._uri(self.generation))
                storage.remove_empty_dir(self.dir)
        finally:
            self._lock.release()

"""The code where threads meet, tested directly in process: the shard cache (a prefetch thread, a
Condition, bytes reserved before a download, LRU eviction, pins), the checkpoint uploader (one
upload in flight, deadlines, a stop's grace period), storage.bounded (a frozen call abandoned at
its deadline) and the run's lease (renewal, takeover, release).

A frozen store is a call blocked on an Event the test holds and always sets in a `finally`. Every
wait has a deadline (HANG: a guard against a hang, never the thing tested), and times are only
asserted as lower bounds ("not before its deadline"), so a machine ten times slower gives the
same verdict. memory:// (fsspec's in-process store) stands in for an object store."""

import errno
import hashlib
import logging
import os
import random
import signal
import threading
import time
import uuid

import pytest

from job import lease, storage
from job.checkpoint import Uploader
from job.errors import DataError, OutputError, SettingsError, Stopped, StoppedWaitingForData, TransientStorageError
from job.settings import Settings
from job.data.cache import WINDOW, ShardCache
from job.data.prepare_shards import tar_shard
from job.stop import StopRequest

HANG = 30.0  # seconds: far beyond any wait here; reaching it means a hang
CLASSES = 3


def fresh_uri() -> str:
    return f"memory://t-{uuid.uuid4().hex[:8]}"


class Background:
    """fn() in a daemon thread. join() waits for it (at most HANG s) and returns its result or
    raises its error; `ended` is when it finished (time.monotonic())."""

    def __init__(self, fn):
        self.box: dict = {}
        self.ended = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.box["result"] = fn()
        except BaseException as exc:
            self.box["error"] = exc
        finally:
            self.ended = time.monotonic()
            self.done.set()

    def join(self):
        self.thread.join(HANG)
        assert not self.thread.is_alive(), f"still running after {HANG} s"
        if "error" in self.box:
            raise self.box["error"]
        return self.box["result"]


def frozen(gate: threading.Event, entered: threading.Event, then=lambda *a, **kw: None):
    """A store call that hangs: it sets `entered`, waits for `gate` (HANG s at most), then does
    then(*args)."""

    def call(*args, **kwargs):
        entered.set()
        gate.wait(HANG)
        return then(*args, **kwargs)

    return call


@pytest.fixture
def store_config(monkeypatch):
    """storage's configuration at its defaults, and back as it was after the test."""
    monkeypatch.setattr(storage, "_config", storage.Config())


def configure(stop=None, **settings) -> None:
    storage.configure(Settings(data_uri="/x", **settings), stop)


# --- ShardCache ------------------------------------------------------------------------------


def write_shards(uri: str, n: int, samples: int = 2) -> list[dict]:
    """n real shards (the writer's tar layout) in the store at `uri`; their index entries."""
    metas = []
    for i in range(n):
        blob = tar_shard([(f"{k:06d}-{i:06d}", bytes([i, k]) * 50, k % CLASSES) for k in range(samples)], "png")
        name = f"train-{i:06d}.tar"
        storage.write_bytes(storage.join(uri, name), blob)
        metas.append({"name": name, "samples": samples, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
    return metas


@pytest.fixture
def caches(tmp_path):
    """make(uri, metas, held) -> a ShardCache with room for `held` of these shards. ShardCache
    has no close(): after the test its prefetchers are given nothing more to do."""
    made = []

    def make(uri: str, metas: list[dict], held: int) -> ShardCache:
        limit = held * max(m["bytes"] for m in metas)
        made.append(ShardCache(uri, str(tmp_path / f"cache-{len(made)}"), limit, metas, CLASSES))
        return made[-1]

    yield make
    for cache in made:
        cache.want([])


def get(cache: ShardCache, name: str) -> dict:
    """cache.get(name), with a hang guard."""
    return Background(lambda: cache.get(name)).join()


def use(cache: ShardCache, name: str) -> None:
    get(cache, name)
    cache.release(name)


def count_reads(monkeypatch) -> list[str]:
    """The URIs storage.read_bytes is called with from now on."""
    reads: list[str] = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, **kw: reads.append(uri) or real(uri, **kw))
    return reads


def intact(cache: ShardCache, name: str) -> bool:
    with open(os.path.join(cache.folder, name), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest() == cache.meta[name]["sha256"]


def test_the_least_recently_used_idle_shard_is_evicted_first(caches):
    uri = fresh_uri()
    metas = write_shards(uri, 3)
    a, b, c = (m["name"] for m in metas)
    cache = caches(uri, metas, held=2)
    for name in (a, b, a):  # b is now the least recently used
        use(cache, name)
    use(cache, c)
    assert set(cache.local) == {a, c}
    assert sorted(os.listdir(cache.folder)) == [a, c]
    use(cache, b)  # then a is the least recently used
    assert sorted(os.listdir(cache.folder)) == [b, c]


def test_a_shard_in_use_is_never_evicted(caches):
    uri = fresh_uri()
    metas = write_shards(uri, 4)
    a, b, c, d = (m["name"] for m in metas)
    cache = caches(uri, metas, held=2)
    get(cache, a)  # in use (not released), and the least recently used
    use(cache, b)
    use(cache, c)  # room for c: b goes, not a
    assert sorted(os.listdir(cache.folder)) == [a, c] and intact(cache, a)
    get(cache, c)
    with pytest.raises(SettingsError, match="JOB_SHARD_CACHE_BYTES"):
        get(cache, d)  # both in use: no room, and neither is given up for it
    assert intact(cache, a) and intact(cache, c)


def read_pinned(cache: ShardCache, names: list[str], seen: list[int]) -> None:
    """One training process's reader: get each shard, check it on disk while it is in use, release it."""
    for name in names:
        entry = cache.get(name)
        try:
            assert intact(cache, name), f"{name} changed while in use"
            assert len(entry["samples"]) == cache.meta[name]["samples"]
            seen.append(cache.bytes_on_disk())
            assert cache.local.get(name) is entry, f"{name} was evicted while in use"
        finally:
            cache.release(name)


def test_concurrent_readers_never_pass_the_byte_limit_nor_lose_a_shard_in_use(caches, monkeypatch):
    uri = fresh_uri()
    readers = 4
    held = readers + 2 * WINDOW + 1  # one in use per reader, the prefetcher's window, the next one
    metas = write_shards(uri, 2 * held)  # twice what fits: shards are evicted all along
    names = [m["name"] for m in metas]
    reads = count_reads(monkeypatch)
    cache = caches(uri, metas, held)
    cache.want(names)
    seen: list[int] = []
    orders = [random.Random(r).sample(names * 3, 3 * len(names)) for r in range(readers)]
    threads = [Background(lambda order=order: read_pinned(cache, order, seen)) for order in orders]
    for thread in threads:
        thread.join()
    assert len(reads) > len(names)  # shards were evicted and fetched again: the limit was pressed
    assert max(seen) <= cache.limit
    assert cache.peak <= cache.limit and cache.disk_peak <= cache.limit
    assert cache.bytes_on_disk() <= cache.limit


def test_a_reader_waiting_on_a_stalled_download_gives_up_at_half_the_grace_period(store_config, caches, monkeypatch):
    uri = fresh_uri()
    metas = write_shards(uri, 1)
    name = metas[0]["name"]
    gate, entered = threading.Event(), threading.Event()
    monkeypatch.setattr(storage, "read_bytes", frozen(gate, entered, storage.read_bytes))
    stop = StopRequest(deferred=True)
    configure(stop, stop_grace_seconds=0.4)
    cache = caches(uri, metas, held=1)
    try:
        reader = Background(lambda: cache.get(name))
        assert entered.wait(HANG)  # the download has started, and hangs
        stop.record(signal.SIGTERM)
        with pytest.raises(StoppedWaitingForData, match=f"waiting for shard {name}") as info:
            reader.join()  # while the download still hangs: the gate is not open yet
        assert info.value.exit_code == 128 + signal.SIGTERM
        assert reader.ended >= stop.deadline(0.4 * 0.5)  # the loop keeps the other half to save
    finally:
        gate.set()


def test_a_shard_that_does_not_match_its_sha256_is_fetched_twice_then_refused(caches, monkeypatch):
    uri = fresh_uri()
    metas = write_shards(uri, 1)
    shard = storage.join(uri, metas[0]["name"])
    blob = bytearray(storage.read_bytes(shard))
    blob[600] ^= 0xFF  # one byte of the first sample's image: the same size, another sha256
    storage.write_bytes(shard, bytes(blob))
    reads = count_reads(monkeypatch)
    cache = caches(uri, metas, held=1)
    with pytest.raises(DataError, match="does not match its sha256 in index.json, twice"):
        get(cache, metas[0]["name"])
    assert reads == [shard, shard]
    assert cache.bytes_on_disk() == 0  # none of its bytes are kept


def test_fetching_ahead_into_a_small_cache_never_evicts_what_it_fetched_ahead(caches, monkeypatch):
    """Room for fewer shards than the prefetcher looks ahead (2 x WINDOW): it fills the room and
    waits for a reader, instead of evicting one look-ahead shard to fetch another, forever."""
    uri = fresh_uri()
    metas = write_shards(uri, 3 * WINDOW)
    room = WINDOW + 2
    assert room < 2 * WINDOW
    reads = count_reads(monkeypatch)
    cache = caches(uri, metas, room)
    cache.want([m["name"] for m in metas])
    deadline = time.monotonic() + HANG
    while len(cache.local) < room:
        assert time.monotonic() < deadline, f"only {len(cache.local)} shards fetched ahead in {HANG} s"
        time.sleep(0.01)
    settled = len(reads)
    time.sleep(1.0)  # the prefetcher looks again every 0.2 s: five chances to thrash
    assert len(reads) == settled == room, reads
    use(cache, metas[0]["name"])
    use(cache, metas[1]["name"])  # the reader moved past shard 0: it makes room for the next one ahead
    deadline = time.monotonic() + HANG
    while metas[room]["name"] not in cache.local:
        assert time.monotonic() < deadline, "the prefetcher did not move on after a read"
        time.sleep(0.01)


# --- checkpoint.Uploader ---------------------------------------------------------------------


class WatchedUploader(Uploader):
    """An Uploader that says when it begins waiting for the upload in flight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.waiting = threading.Event()

    def wait(self, deadline=None):
        self.waiting.set()
        return super().wait(deadline)


def test_an_upload_starts_only_after_the_previous_one_ended():
    up = WatchedUploader(fresh_uri())
    lock, running, most, ended = threading.Lock(), [0], [0], []

    def upload(name, gate=None):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        if gate is not None:
            gate.wait(HANG)
        with lock:
            running[0] -= 1
            ended.append(name)

    gate = threading.Event()
    try:
        assert up.submit(upload, "first", gate)
        up.waiting.clear()
        second = Background(lambda: up.submit(upload, "second"))
        assert up.waiting.wait(HANG)  # the second submit waits for the first upload...
        assert not second.done.is_set()  # ...which cannot end before the gate opens
    finally:
        gate.set()
    assert second.join() is True
    assert up.wait(time.monotonic() + HANG) is True
    assert ended == ["first", "second"] and most[0] == 1


def test_a_failed_upload_is_raised_as_an_output_error_once():
    up = Uploader(fresh_uri())

    def disk_full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    up.submit(disk_full)
    with pytest.raises(OutputError, match="cannot write checkpoint or report to memory://.*No space left") as info:
        up.wait(time.monotonic() + HANG)
    assert info.value.exit_code == 4
    assert up.wait() is True  # reported once
    up.submit(disk_full)
    started: list[str] = []
    with pytest.raises(OutputError):
        up.submit(started.append, "next")  # the next upload does not start after a failed one
    assert started == []


def test_wait_returns_false_at_its_deadline_while_the_upload_runs():
    up = Uploader(fresh_uri())
    gate, finished = threading.Event(), threading.Event()
    try:
        up.submit(lambda: gate.wait(HANG) and finished.set())
        deadline = time.monotonic() + 0.3
        assert up.wait(deadline) is False
        assert time.monotonic() >= deadline
        assert not finished.is_set()
    finally:
        gate.set()
    assert up.wait(time.monotonic() + HANG) is True  # the upload still ends, and is waited for later
    assert finished.is_set()


def test_after_a_stop_wait_gives_up_when_the_grace_period_ends():
    stop = StopRequest(deferred=True)
    up = Uploader(fresh_uri(), stop=stop, grace_seconds=0.3)
    gate, started = threading.Event(), []
    try:
        up.submit(gate.wait, HANG)
        stop.record(signal.SIGTERM)
        waiter = Background(up.wait)  # no deadline of its own: only the grace period ends it
        assert waiter.join() is False
        assert waiter.ended >= stop.deadline(0.3)
        assert up.submit(started.append, "next") is False and started == []  # nothing new starts
    finally:
        gate.set()


# --- storage.bounded -------------------------------------------------------------------------


def test_a_frozen_call_is_abandoned_at_the_storage_timeout(store_config):
    configure(storage_timeout_seconds=1)
    gate = threading.Event()
    try:
        start = time.monotonic()
        with pytest.raises(TransientStorageError, match=r"memory://b/x: no .*JOB_STORAGE_TIMEOUT_SECONDS=1\b") as info:
            storage.bounded("read", "memory://b/x", lambda: gate.wait(HANG))
        assert time.monotonic() - start >= 1
        assert info.value.exit_code == 75
    finally:
        gate.set()


def test_a_time_limit_shortens_the_bound(store_config):
    gate = threading.Event()  # the configured bound stays 300 s
    try:
        start = time.monotonic()
        with storage.time_limit(0.3), pytest.raises(TransientStorageError, match="JOB_STORAGE_TIMEOUT_SECONDS"):
            storage.bounded("write", "memory://b/x", lambda: gate.wait(HANG))
        assert time.monotonic() - start >= 0.3
    finally:
        gate.set()


def test_an_error_inside_the_call_propagates_unchanged(store_config):
    error = ConnectionResetError("reset by peer")

    def fail():
        raise error

    with pytest.raises(ConnectionResetError) as info:
        storage.bounded("read", "memory://b/x", fail)
    assert info.value is error


def test_the_result_is_returned(store_config):
    result = object()
    assert storage.bounded("read", "memory://b/x", lambda: result) is result


def test_after_a_stop_a_frozen_call_ends_with_the_grace_period(store_config):
    stop = StopRequest(deferred=True)  # as the training loop holds it: able to save
    configure(stop, stop_grace_seconds=0.3)  # the storage bound stays 300 s
    gate = threading.Event()

    def signal_then_hang():  # SIGTERM arrives while bounded() waits
        stop.record(signal.SIGTERM)
        gate.wait(HANG)

    try:
        with pytest.raises(Stopped, match="grace period ran out, still trying to write memory://b/x") as info:
            storage.bounded("write", "memory://b/x", signal_then_hang)
        assert info.value.exit_code == 128 + signal.SIGTERM
        assert time.monotonic() >= stop.deadline(0.3)
    finally:
        gate.set()


# --- lease.Lease -----------------------------------------------------------------------------


def expires(holder: lease.Lease) -> float:
    return storage.read_json(holder._uri(holder.generation))["expires"]


def test_an_expired_lease_is_taken_over_and_its_old_holder_stops_writing(monkeypatch):
    monkeypatch.setattr(lease.Lease, "_heartbeat", lambda self: None)  # a paused process never renews
    run = fresh_uri()
    old = lease.Lease(run, seconds=1)
    old.acquire()
    taken = time.monotonic()
    new = lease.Lease(run, seconds=1)
    new.acquire()  # waits to see the lease unrenewed for its seconds (its own hang guard: seconds + 5)
    assert time.monotonic() - taken >= 1  # never before
    with pytest.raises(lease.LeaseLost, match="lost the run's lease"):
        old.renew()
    old.release()  # after losing it: the new holder's generation is left alone
    new.renew()
    new.release()


def test_a_node_whose_clock_runs_ahead_does_not_take_a_live_lease(monkeypatch):
    """Expiry is judged by seeing the lease unrenewed, on the waiter's own monotonic clock: a
    waiter whose wall clock runs 2 h ahead of the holder's used to take the lease at once."""
    run = fresh_uri()
    holder = lease.Lease(run, seconds=1)  # renewed by its heartbeat every 0.25 s
    holder.acquire()
    try:
        real = time.time
        monkeypatch.setattr(lease.time, "time", lambda: real() + 7200)  # the waiter's clock (and only its records)
        with pytest.raises(lease.LeaseLost, match="another job is writing"):
            lease.Lease(run, seconds=1).acquire()
        monkeypatch.undo()
        holder.renew()  # still the holder
    finally:
        holder.release()


def test_a_store_refusing_every_create_it_does_not_list_ends_in_exit_75_not_a_spin(monkeypatch):
    """A store that answers "exists" (412) to a create while listing no such object (a lagging
    listing, or a misbehaving store) made acquire loop at once and for ever."""
    def refuse(uri, obj):
        attempts.append(uri)
        raise FileExistsError(uri)

    attempts: list[str] = []
    monkeypatch.setattr(lease.storage, "create_json", refuse)
    with pytest.raises(lease.LeaseLost, match="refuses to create .* but lists no newer generation"):
        lease.Lease(fresh_uri(), seconds=0.1).acquire()
    assert len(set(attempts)) == 1  # always the same generation, none listed


def test_a_live_holder_keeps_a_second_writer_out():
    run = fresh_uri()
    holder = lease.Lease(run, seconds=30)
    holder.acquire()
    try:
        second = lease.Lease(run, seconds=0.2)
        start = time.monotonic()
        with pytest.raises(lease.LeaseLost, match="another job is writing"):
            second.acquire()
        assert time.monotonic() - start >= 0.2  # it waited its JOB_LEASE_SECONDS first
        holder.renew()  # still the holder
    finally:
        holder.release()


def test_release_gives_the_lease_back_at_once():
    run = fresh_uri()
    first = lease.Lease(run, seconds=30)
    first.acquire()
    first_expiry = expires(first)
    first.release()
    second = lease.Lease(run, seconds=30)
    second.acquire()
    assert time.time() < first_expiry  # taken while the first was still good: released, not expired
    with pytest.raises(lease.LeaseLost):
        first.renew()
    second.release()
    assert storage.list_names(second.dir) == []


def test_release_does_not_wait_for_a_renewal_in_flight(monkeypatch, caplog):
    monkeypatch.setattr(logging.getLogger("job"), "propagate", True)  # to caplog, whatever set up logging before
    run = fresh_uri()
    first = lease.Lease(run, seconds=1)  # its heartbeat renews every 0.25 s
    first.acquire()
    gate, entered, written = threading.Event(), threading.Event(), threading.Event()
    real = storage.write_json

    def write_then_say(uri, obj):
        real(uri, obj)
        written.set()

    monkeypatch.setattr(storage, "write_json", frozen(gate, entered, write_then_say))
    try:
        assert entered.wait(HANG)  # a renewal is writing to a frozen store
        Background(first.release).join()
        assert not written.is_set()  # release returned while the renewal still hangs
    finally:
        gate.set()
    assert "expires on its own within JOB_LEASE_SECONDS" in caplog.text
    assert written.wait(HANG)  # the late renewal lands: the lease is good for `seconds` from it
    late_expiry = expires(first)
    with pytest.raises(lease.LeaseLost):
        first.renew()  # released: no more writes, although our generation is still there
    second = lease.Lease(run, seconds=1)
    second.acquire()  # nothing renews the old lease after that: it expires on its own
    assert time.time() >= late_expiry
    second.release()


def test_a_stop_never_outlives_its_grace_period():
    """The handler only records a signal; a main thread stuck where no stop point is reached (here
    a 10-minute sleep) is ended by the watchdog shortly after the grace period, with exit 143 and
    a line saying so. (A real process: the watchdog ends the interpreter.)"""
    import subprocess
    import sys

    script = ("import os, signal, time\nfrom job.stop import StopRequest\n"
              "StopRequest(grace=1.0).install()\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(600)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)  # hang guard
    assert done.returncode == 143, done
    assert "stopped by signal 15: still running" in done.stdout and "exit 143" in done.stdout, done.stdout


def test_before_training_a_stop_is_raised_at_the_next_stop_point_only():
    stop = StopRequest()
    stop.check()  # no signal: nothing
    stop.record(signal.SIGTERM)
    assert stop.ends_waits()  # before training a storage wait gives way at once
    with pytest.raises(Stopped) as stopped:
        stop.check("while checking images: nothing to save")
    assert stopped.value.exit_code == 143 and stopped.value.signum == signal.SIGTERM
    assert not stop.ends_waits()  # raised: the records and the lease's release may use the grace period
    stop.deferred = True  # training saves first: the loop polls, check() leaves it be
    stop.check()
    assert stop.deadline(20) > time.monotonic() + 10


def test_a_signal_is_recorded_where_it_lands_never_raised_into_the_code_it_interrupts():
    """A library's broad `except Exception` around the point a signal lands (an import, a retry
    loop) used to swallow the stop raised from the handler: the job ran on. Now the handler only
    records it, and the job's next stop point sees it. (A real signal, so a real process.)"""
    import subprocess
    import sys

    script = ("import os, signal, time\nfrom job.stop import StopRequest\nstop = StopRequest().install()\n"
              "try:\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(0.5)\n    seen = 'recorded'\n"
              "except Exception as exc:\n    seen = 'swallowed ' + type(exc).__name__\n"
              "print(seen, stop.signum, flush=True)\nos._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "recorded 15", done


def test_a_shard_cache_folder_held_by_a_live_process_is_never_taken_and_a_dead_ones_is(tmp_path):
    """A cache empties its folder at start: a --check, a predict or a second job streaming the same
    dataset through the same JOB_CACHE_DIR deleted the shards a running job was reading."""
    import subprocess
    import sys

    from job.data.cache import claim

    folder = str(tmp_path / "shards" / "abc" / "process-0")
    code = f"from job.data.cache import claim; print(claim({folder!r}), flush=True); import time; time.sleep(300)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == folder  # the running job's folder
        assert claim(folder) == folder + "-1"  # the second process gets its own
    finally:
        holder.kill()  # kill -9: the kernel releases its lock
        holder.wait()
    assert claim(folder) == folder  # a dead process's folder is taken over (and emptied by the cache)

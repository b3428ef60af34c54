"""The job on Google Cloud Storage (issue 25): what the S3 tests prove, on gs://, against
gcp-storage-emulator (tests/gcs_emulator.py) through the real job, with tests/faultproxy.py in
front of it for what the emulator never does. The bodies are store-generic: `bucket` gives the
URIs, a filesystem on the store and the variable that points the job at a proxy.

What gcp-storage-emulator (2026.7.19) lacks, each seen in a probe: it ignores `ifGenerationMatch=0`
(a second create overwrites: the lease's exclusive creation is tested through a proxy answering
GCS's 412, see test_a_create_is_conditional...), accepts any credentials or none (refusals are
the proxy's 401/403, in GCS's JSON), and never fails (5xx and resets are the proxy's)."""

import json
import re
import signal
import time
import urllib.request

import pytest
import stage_dataset
from conftest import (
    DIGITS,
    assert_same_history,
    read_history,
    run_job,
    start_job,
    stop_within_grace,
    time_unit,
    wait_for,
    wait_for_epochs,
)
from faultproxy import FaultProxy

from job import storage

RECIPE = dict(epochs=4, **DIGITS)
# GCS's answers to a failed precondition and to callers it does not let in
# (cloud.google.com/storage/docs/json_api/v1/status-codes)
PRECONDITION_FAILED = json.dumps({"error": {"code": 412, "message": "At least one of the pre-conditions you specified "
                                            "did not hold.", "errors": [{"reason": "conditionNotMet"}]}}).encode()
REFUSALS = {
    401: "Anonymous caller does not have storage.objects.list access to the Google Cloud Storage bucket.",
    403: "trainjob@example.iam.gserviceaccount.com does not have storage.objects.create access to the bucket.",
}


@pytest.fixture
def bucket(gcs):
    return gcs


@pytest.fixture
def digits_uri(bucket, digits_arrays):
    uri = bucket.uri("data/digits")
    stage_dataset.stage(digits_arrays, uri)
    return uri


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_arrays):
    """An uninterrupted run's history on a local disk, for the runs on the store to equal."""
    root = tmp_path_factory.mktemp("reference")
    stage_dataset.stage(digits_arrays, str(root / "digits"))
    result = run_job(data_uri=str(root / "digits"), output_uri=str(root / "runs"), run_name="ref", **RECIPE)
    assert result.returncode == 0, result.stdout
    return read_history(root / "runs" / "ref")


@pytest.fixture
def proxy_for(bucket, monkeypatch):
    """A FaultProxy in front of the store, the job and this process pointed at it."""
    proxies = []

    def make(fraction=0.0, **options):
        proxies.append(FaultProxy(bucket.endpoint, fraction, seed=len(proxies), **options))
        monkeypatch.setenv(bucket.endpoint_variable, proxies[-1].url)
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


def test_train_a_second_writer_kill_9_and_resume(bucket, digits_uri, reference):
    """One run serves it all: it trains and checkpoints on the store; a second job on the run is
    kept out by the lease; a kill -9 and a rerun give the uninterrupted run's history."""
    settings = dict(data_uri=digits_uri, output_uri=bucket.uri("out"), run_name="r", **RECIPE)
    run = (bucket.fs, "out/r")
    first = start_job(**settings)
    try:
        wait_for_epochs(run, 2, first)
        # stopped, it is alive and its lease is good for its JOB_LEASE_SECONDS (60 s) unrenewed:
        # the second job waits its own 1 s (+5) and gives up, whatever the machine's speed
        first.send_signal(signal.SIGSTOP)
        history, latest = read_history(run), bucket.fs.cat_file("out/r/checkpoints/latest.json")
        second = run_job(lease_seconds=1, **settings)
    finally:
        first.kill()  # the kill -9, wherever the stopped job was
        first.wait()
    assert second.returncode == 75, second.stdout
    assert "another job is writing" in second.stdout and f"pid {first.pid}" in second.stdout, second.stdout
    assert read_history(run) == history and bucket.fs.cat_file("out/r/checkpoints/latest.json") == latest

    rerun = run_job(**settings)
    assert rerun.returncode == 0, rerun.stdout
    assert "resumed from checkpoints/step-" in rerun.stdout
    assert_same_history(read_history(run), reference)
    summary = json.loads(bucket.fs.cat_file("out/r/summary.json"))
    assert summary["status"] == "completed" and summary["epochs_completed"] == RECIPE["epochs"]
    pointer = json.loads(bucket.fs.cat_file("out/r/checkpoints/latest.json"))
    assert bucket.fs.size(f"out/r/checkpoints/{pointer['file']}") == pointer["size"]
    assert not bucket.fs.exists("out/r/lease") or not bucket.fs.ls("out/r/lease")  # given back at the end


def test_a_create_is_conditional_and_a_412_is_file_exists(bucket, proxy_for):
    """The lease takes a generation by creating it only if absent. The emulator ignores the
    precondition, so a proxy gives GCS's answer to it: the request must carry it, and the job
    must read the answer as "another writer has it"."""
    uri = bucket.uri("out/r/lease/000000000001.json")
    storage.create_bytes(uri, b"first")
    storage.create_bytes(uri, b"second")  # the emulator's gap, probed: GCS answers this with 412
    assert bucket.fs.cat_file("out/r/lease/000000000001.json") == b"second", "the emulator now honours " \
        "ifGenerationMatch=0: test the exclusive creation on it directly and drop the proxy below"
    proxy = proxy_for()
    proxy.answer(r"[?&]ifGenerationMatch=0(&|$)", 412, PRECONDITION_FAILED)
    with pytest.raises(FileExistsError):
        storage.create_bytes(uri, b"third")
    assert proxy.counts["answered"] == 1  # sent with the precondition, answered at once (no retry)
    storage.write_bytes(uri, b"renewed")  # a renewal overwrites: no precondition, forwarded
    assert proxy.counts["answered"] == 1 and bucket.fs.cat_file("out/r/lease/000000000001.json") == b"renewed"


def test_failing_requests_change_nothing(bucket, digits_uri, reference, proxy_for):
    # gcsfs sleeps 1-2 s before its first retry: 5% of the run's ~230 requests keeps it short
    proxy = proxy_for(0.05)
    result = run_job(data_uri=digits_uri, output_uri=bucket.uri("out"), run_name="faulty", **RECIPE)
    assert result.returncode == 0, result.stdout
    assert proxy.counts["slowdown"] + proxy.counts["internal"] + proxy.counts["reset"] >= 2, proxy.counts
    assert_same_history(read_history((bucket.fs, "out/faulty")), reference)
    assert json.loads(bucket.fs.cat_file("out/faulty/summary.json"))["status"] == "completed"


def test_a_store_failing_every_request_ends_with_75_within_its_bound(bucket, digits_dir, proxy_for):
    proxy_for(1.0, faults=("slowdown", "drop"))  # half 503s, half connections closed unanswered
    unit = time_unit()
    start = time.monotonic()
    result = run_job(data_uri=str(digits_dir), output_uri=bucket.uri("out"), storage_timeout_seconds=6,
                     log_every_seconds=2)
    took = time.monotonic() - start
    assert result.returncode == 75, result.stdout
    # gcsfs's own 6 attempts take ~31 s of backoff: JOB_STORAGE_TIMEOUT_SECONDS is what bounds them
    assert took < 6 + 3 * unit, (took, unit)
    assert re.search(rf"storage: still trying to \w+ {bucket.uri('out/')}", result.stdout)  # not silent meanwhile
    errors = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "JOB_STORAGE_TIMEOUT_SECONDS=6" in errors[0], result.stdout


def test_a_frozen_store_cannot_outlast_the_grace_period(bucket, digits_dir, proxy_for):
    proxy = proxy_for()
    unit = time_unit()
    grace = max(4.0, 2 * unit)  # inside it the job reaches a step edge and starts its stop checkpoint: work too
    proc = start_job(data_uri=str(digits_dir), output_uri=bucket.uri("out"), run_name="r", epochs=100000,
                     stop_grace_seconds=grace, log_every_seconds=1, **DIGITS)
    wait_for_epochs((bucket.fs, "out/r"), 1, proc)
    proxy.freeze()
    wait_for(lambda: proxy.counts["frozen"] > 0, proc, what="a request to the frozen store")
    out = stop_within_grace(proc, grace, unit)
    assert proc.returncode == 143, out
    last = out.strip().splitlines()[-1]
    assert "without a new checkpoint; the valid one is checkpoints/step-" in last and "(exit 143" in last, last


@pytest.mark.parametrize("status", sorted(REFUSALS))
def test_refused_credentials_exit_2_with_the_fix(bucket, digits_uri, proxy_for, tmp_path, status):
    """401: no credentials found, so gcsfs went anonymous; 403: an identity without the role."""
    proxy = proxy_for()
    proxy.answer("", status, json.dumps({"error": {"code": status, "message": REFUSALS[status]}}).encode())
    result = run_job(data_uri=digits_uri, output_uri=bucket.uri("out"), cache_dir=str(tmp_path / "cache"))
    assert result.returncode == 2, result.stdout
    error = next(line for line in result.stdout.splitlines() if " ERROR " in line)
    assert "refused our credentials" in error and "GOOGLE_APPLICATION_CREDENTIALS" in error, error
    assert "Workload Identity" in error and "Traceback" not in result.stdout


@pytest.mark.parametrize("escape", ["absolute", "relative"])
def test_object_names_that_escape_the_cache_are_refused(bucket, digits_uri, proxy_for, tmp_path, escape):
    """GCS lets an object name hold `../` segments; the emulator cannot store one (it answers by
    closing the connection), so the proxy lists one beside the real objects, as a hostile bucket
    would: the job must refuse it before it fetches anything."""
    target = tmp_path / "escaped" / "pwned.txt"
    name = ("digits/" + "../" * 30 + str(target).lstrip("/") if escape == "absolute"
            else "digits/sub/../../../escaped/pwned.txt")  # cache/<hash>/sub/../../../ is tmp_path
    listing = json.loads(urllib.request.urlopen(f"{bucket.endpoint}/storage/v1/b/data/o?prefix=digits/").read())
    listing["items"].append({**listing["items"][0], "name": name})
    proxy_for().answer(r"^/storage/v1/b/data/o\?", 200, json.dumps(listing).encode())  # listings, not objects
    result = run_job(data_uri=digits_uri, output_uri=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    assert result.returncode == 3, result.stdout
    error = next(line for line in result.stdout.splitlines() if " ERROR " in line)
    assert name in error and "refusing" in error, error
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.gz"))  # nothing fetched


def test_shards_prepared_on_the_store_stream_through_a_small_cache(bucket, digits_uri, tmp_path):
    shards = bucket.uri("data/digit-shards")
    prepared = run_job("prepare", digits_uri, shards, shard_bytes=100_000, cache_dir=str(tmp_path / "prep-cache"))
    assert prepared.returncode == 0, prepared.stdout
    index = json.loads(bucket.fs.cat_file("data/digit-shards/index.json"))
    total = sum(s["bytes"] for split in index["splits"].values() for s in split)
    limit = total // 3  # the cache holds a third of the dataset: training must stream
    result = run_job(data_uri=shards, output_uri=bucket.uri("out"), run_name="s", epochs=2, batch_size=16,
                     num_workers=0, shard_cache_bytes=limit, cache_dir=str(tmp_path / "cache"), log_level="debug",
                     **DIGITS)
    assert result.returncode == 0, result.stdout
    peaks = [int(m) for m in re.findall(r"shard cache: (\d+) bytes on disk", result.stdout)]
    assert peaks and max(peaks) <= limit, (peaks, limit)
    history = read_history((bucket.fs, "out/s"))
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["val_accuracy"] > 0.5

"""Azure Blob Storage (az://) through the real job, against Azurite started by the suite
(tests/azurite.py): the guarantees the S3 tests prove, on Azure. Each test takes `store` (the
emulator's URIs, the variables that point the job at it or at a FaultProxy, a filesystem to read
back), so the same bodies can run on any object store.

Where Azurite differs from the service, probed with azure-storage-blob 12.31 on Azurite 3.35:
- conditional create: both answer Put Blob with If-None-Match: * by 409 BlobAlreadyExists (the
  lease test runs on it for real);
- a wrong key: both answer 403 (Azurite's code is AuthorizationFailure, the service's
  AuthenticationFailed); a token refused by Entra ID (workload identity) cannot be emulated;
- throttling and server errors Azurite never gives: the FaultProxy answers 503 and 500 in front of it;
- hostile keys: a key with '.' or '..' segments cannot be written through the SDK (the URL is
  normalised before it is signed, and the store refuses the signature), so escaping the cache by
  '..' is no attack on Azure; '//' (an empty segment) can be, and is tested. A newline in a key
  reaches the job's listing without it (adlfs), and a key with another C0 control character breaks
  Azurite's listing (500; the service encodes such names in its XML): neither is tried here."""

import io
import json
import signal
import time

import pytest
import stage_dataset
import torch
from azurite import KEY, connection_string
from conftest import (
    DIGITS,
    SECRET,
    assert_same_history,
    read_history,
    reference_history,
    run_job,
    start_job,
    stop_within_grace,
    time_unit,
    wait_for,
    wait_for_epochs,
)
from faultproxy import FaultProxy

RECIPE = dict(epochs=10, **DIGITS)  # epochs enough for a kill after the 2nd to land mid-run


@pytest.fixture
def store(azure):
    """The store under test: one line to parametrize these tests over S3, GCS and Azure."""
    return azure


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_arrays):
    """An uninterrupted run's history on local disk: what every run on the store must equal."""
    return reference_history(tmp_path_factory.mktemp("reference"), digits_arrays, **RECIPE)


@pytest.fixture
def proxy_for(store, monkeypatch):
    """A FaultProxy in front of the store, with the job pointed at it."""
    proxies = []

    def make(fraction, **options):
        proxies.append(FaultProxy(store.endpoint, fraction, seed=len(proxies), **options))
        for k, v in store.env(proxies[-1].url).items():
            monkeypatch.setenv(k, v)
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


def no_secret_in(text: str) -> bool:
    return SECRET not in text and KEY not in text


def test_train_kill_9_and_resume_equal_an_uninterrupted_run(store, digits_arrays, reference):
    stage_dataset.stage(digits_arrays, store.uri("data/digits"))
    settings = dict(data_uri=store.uri("data/digits"), output_uri=store.uri("out/runs"), run_name="r", **RECIPE)
    proc = start_job(**settings)
    wait_for_epochs((store.fs, "out/runs/r"), 2, proc)
    proc.kill()
    proc.wait()
    rerun = run_job(**settings)
    assert rerun.returncode == 0, rerun.stdout
    assert "resumed from checkpoints/step-" in rerun.stdout and no_secret_in(rerun.stdout)
    run = "out/runs/r"
    assert_same_history(read_history((store.fs, run)), reference)
    summary = json.loads(store.fs.cat_file(f"{run}/summary.json"))
    assert summary["status"] == "completed" and summary["epochs_completed"] == RECIPE["epochs"]
    for name in ("settings.json", "summary.json", "history.jsonl"):
        assert no_secret_in(store.fs.cat_file(f"{run}/{name}").decode())
    latest = json.loads(store.fs.cat_file(f"{run}/checkpoints/latest.json"))
    assert len(store.fs.cat_file(f"{run}/checkpoints/{latest['file']}")) == latest["size"]
    last = torch.load(io.BytesIO(store.fs.cat_file(f"{run}/checkpoints/last.pt")), weights_only=True,
                      map_location="cpu")
    assert last["progress"]["epoch"] == RECIPE["epochs"]
    assert not store.fs.exists(f"{run}/lease") or not store.fs.ls(f"{run}/lease")  # given back at the end


def test_a_second_writer_is_refused_while_the_first_holds_the_run(store, digits_dir):
    """The lease through the store's conditional create (Azure: If-None-Match: *)."""
    settings = dict(data_uri=str(digits_dir), output_uri=store.uri("out"), run_name="r", epochs=100000,
                    lease_seconds=3, **DIGITS)
    first = start_job(**settings)
    try:
        wait_for_epochs((store.fs, "out/r"), 2, first)
        assert store.fs.ls("out/r/lease", detail=False)  # the lease is an object in the store
        second = run_job(**settings)
        assert second.returncode == 75, second.stdout
        assert "another job is writing" in second.stdout and f"pid {first.pid}" in second.stdout
        rows = len(read_history((store.fs, "out/r")))
        wait_for_epochs((store.fs, "out/r"), rows + 2, first)  # the first job goes on undisturbed
    finally:
        first.send_signal(signal.SIGTERM)
        out = first.communicate(timeout=300)[0]
    assert first.returncode == 143, out
    history = read_history((store.fs, "out/r"))
    assert [r["epoch"] for r in history] == list(range(1, len(history) + 1))


def test_twenty_percent_failing_requests_change_nothing(store, digits_arrays, reference, proxy_for):
    stage_dataset.stage(digits_arrays, store.uri("data/digits"))
    proxy = proxy_for(0.2)
    # 3 epochs (~150 requests, ~30 of them failing): under a step schedule the first epochs of a
    # run do not depend on how many follow, so they equal the reference's first 3
    result = run_job(data_uri=store.uri("data/digits"), output_uri=store.uri("out"), run_name="faulty",
                     **{**RECIPE, "epochs": 3})
    assert result.returncode == 0, result.stdout
    assert proxy.counts["slowdown"] + proxy.counts["internal"] + proxy.counts["reset"] > 5, proxy.counts
    assert_same_history(read_history((store.fs, "out/faulty")), reference[:3])
    assert json.loads(store.fs.cat_file("out/faulty/summary.json"))["status"] == "completed"


def test_a_store_failing_every_request_exits_75_within_its_bound(store, digits_dir, proxy_for):
    proxy_for(1.0)
    unit = time_unit()
    start = time.monotonic()
    result = run_job(data_uri=str(digits_dir), output_uri=store.uri("out"), storage_retries=2,
                     storage_timeout_seconds=60)
    took = time.monotonic() - start
    assert result.returncode == 75, result.stdout
    assert took < 60 + 3 * unit, (took, unit)  # as on S3: one operation's bound, the job's start and exit
    errors = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and store.uri("out/") in errors[0] and "after retries" in errors[0], result.stdout
    assert "Traceback" not in result.stdout


def test_a_frozen_store_cannot_outlast_the_grace_period(store, digits_dir, proxy_for):
    """The store stops answering while the job trains; SIGTERM still ends the job within
    JOB_STOP_GRACE_SECONDS, naming the valid checkpoint."""
    unit = time_unit()
    grace = max(4.0, 2 * unit)
    proxy = proxy_for(0.0)
    proc = start_job(data_uri=str(digits_dir), output_uri=store.uri("out"), run_name="r", epochs=100000,
                     stop_grace_seconds=grace, log_every_seconds=1, **DIGITS)
    wait_for_epochs((store.fs, "out/r"), 1, proc)
    proxy.freeze()
    wait_for(lambda: proxy.counts["frozen"] > 0, proc, what="a request to the frozen store")
    out = stop_within_grace(proc, grace, unit)
    assert proc.returncode == 143, out
    last = out.strip().splitlines()[-1]
    assert "without a new checkpoint; the valid one is checkpoints/step-" in last and "(exit 143" in last, last
    assert "Traceback" not in out


def test_sigterm_during_a_slow_data_pull_exits_143_promptly(store, digits_arrays, proxy_for, tmp_path):
    stage_dataset.stage(digits_arrays, store.uri("data/digits"))
    # every request is delayed 3 units: the signal lands in the pull's first, and the job's exit takes
    # less than a unit, so waiting for the pull (a listing, then the files) would take a delay more
    delay = max(5.0, 3 * time_unit())
    proxy = proxy_for(0.0, delay_seconds=delay)
    proc = start_job(data_uri=store.uri("data/digits"), output_uri=str(tmp_path), run_name="r",
                     cache_dir=str(tmp_path / "cache"))
    wait_for(lambda: proxy.counts["delayed"] > 0, proc, what="the pull's first request at the slow store")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    took = time.monotonic() - signalled
    assert proc.returncode == 143, out
    assert took < delay, (took, delay)
    assert " INFO dataset " not in out and not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()], out
    assert "stopped by signal 15" in out and "Traceback" not in out
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "stopped"


def test_a_wrong_key_is_exit_2_in_one_line_without_the_key(store, digits_dir, monkeypatch):
    wrong = KEY[::-1]  # a well-formed key of the same length: the store refuses the signature
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection_string(store.endpoint, key=wrong))
    result = run_job(data_uri=str(digits_dir), output_uri=store.uri("out"))
    assert result.returncode == 2, result.stdout
    errors = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "refused our credentials" in errors[0] and store.uri("out") in errors[0], errors
    assert "AZURE_STORAGE_CONNECTION_STRING" in errors[0]  # the fix names where the key comes from
    assert wrong not in result.stdout and "Traceback" not in result.stdout


def test_a_key_that_would_write_beside_the_cache_is_refused_by_name(store, digits_arrays, tmp_path):
    stage_dataset.stage(digits_arrays, store.uri("data/mnist"))
    key = "mnist/sub//x.py"  # an empty segment: a path join would climb out of the dataset's cache folder
    store.fs.pipe_file(f"data/{key}", b"import os  # would run at every Python start\n")
    result = run_job(data_uri=store.uri("data/mnist"), output_uri=str(tmp_path / "out"),
                     cache_dir=str(tmp_path / "cache"))
    assert result.returncode == 3, result.stdout
    error = next(line for line in result.stdout.splitlines() if " ERROR " in line)
    assert "refusing" in error and key in error, error
    assert not list(tmp_path.rglob("x.py"))


def test_shards_prepared_into_the_store_stream_through_a_small_cache(store, digits_dir, tmp_path):
    prepared = run_job("prepare", str(digits_dir), store.uri("data/shards"), shard_bytes=40_000)
    assert prepared.returncode == 0, prepared.stdout
    index = json.loads(store.fs.cat_file("data/shards/index.json"))
    total = sum(s["bytes"] for split in index["splits"].values() for s in split)
    limit = total // 3
    result = run_job(data_uri=store.uri("data/shards"), output_uri=store.uri("out"), run_name="s", epochs=2,
                     batch_size=32, num_workers=1, shard_cache_bytes=limit, cache_dir=str(tmp_path / "cache"),
                     log_level="debug", **DIGITS)
    assert result.returncode == 0, result.stdout
    peaks = [int(m) for m in __import__("re").findall(r"shard cache: (\d+) bytes on disk", result.stdout)]
    assert peaks and max(peaks) <= limit, (peaks, limit)
    history = read_history((store.fs, "out/s"))
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["val_accuracy"] > 0.5

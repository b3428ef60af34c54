"""Google Cloud Storage and Azure Blob Storage through the real job (issue 25): the guarantees the
S3 tests prove, on gs:// against gcp-storage-emulator (tests/gcs_emulator.py) and on az:// against
Azurite (tests/azurite.py), with tests/faultproxy.py in front of either for what an emulator never
does. Every test takes `store` (tests/conftest.py's ObjectStore: the URIs, a filesystem on the
store, the variables that point the job at it or at a proxy, the service's own refusals) and runs
on both, but where one emulator cannot show the point: such a test names its store and says why.

What gcp-storage-emulator (2026.7.19) lacks, each seen in a probe: it ignores `ifGenerationMatch=0`
(a second create overwrites: the lease's exclusive creation is tested through a proxy answering
GCS's 412, see test_a_create_is_conditional...), accepts any credentials or none (refusals are the
proxy's 401/403, in GCS's JSON), and never fails (5xx and resets are the proxy's).

Where Azurite differs from the service, probed with azure-storage-blob 12.31 on Azurite 3.35:
- conditional create: both answer Put Blob with If-None-Match: * by 409 BlobAlreadyExists (the
  lease test runs on it for real);
- a wrong key: both answer 403 (Azurite's code is AuthorizationFailure, the service's
  AuthenticationFailed); a token refused by Entra ID (workload identity) cannot be emulated (the
  service's 401 and 403 to a token are the proxy's, in Azure's XML);
- throttling and server errors Azurite never gives: the FaultProxy answers 503 and 500 in front of it;
- hostile keys: a key with '.' or '..' segments cannot be written through the SDK (the URL is
  normalised before it is signed, and the store refuses the signature), so escaping the cache by
  '..' is no attack on Azure; '//' (an empty segment) can be, and is tested. A newline in a key
  reaches the job's listing without it (adlfs), and a key with another C0 control character breaks
  Azurite's listing (500; the service encodes such names in its XML): neither is tried here."""

import io
import json
import re
import signal
import time
import urllib.request

import pytest
import stage_dataset
import torch
from azurite import KEY, connection_string
from conftest import (
    DIGITS,
    assert_same_history,
    assert_sigterm_interrupts_a_slow_pull,
    error_line,
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

from job import storage

RECIPE = dict(epochs=4, **DIGITS)
# GCS's answer to a failed precondition (cloud.google.com/storage/docs/json_api/v1/status-codes)
PRECONDITION_FAILED = json.dumps({"error": {"code": 412, "message": "At least one of the pre-conditions you specified "
                                            "did not hold.", "errors": [{"reason": "conditionNotMet"}]}}).encode()
# a test that one emulator cannot run: @ONLY_GCS or @ONLY_AZURE, with a comment saying why
ONLY_GCS = pytest.mark.parametrize("store", ["gcs"], indirect=True)
ONLY_AZURE = pytest.mark.parametrize("store", ["azure"], indirect=True)


@pytest.fixture(params=["gcs", "azure"])
def store(request):
    """The store under test, emptied, with this process and the job pointed at its emulator."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def digits_uri(store, digits_arrays):
    uri = store.uri("data/digits")
    stage_dataset.stage(digits_arrays, uri)
    return uri


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_arrays):
    """An uninterrupted run's history on a local disk, for the runs on the stores to equal."""
    return reference_history(tmp_path_factory.mktemp("reference"), digits_arrays, **RECIPE)


@pytest.fixture
def proxy_for(store, monkeypatch):
    """A FaultProxy in front of the store, the job and this process pointed at it."""
    proxies = []

    def make(fraction=0.0, **options):
        proxies.append(FaultProxy(store.endpoint, fraction, seed=len(proxies), **options))
        for k, v in store.env(proxies[-1].url).items():
            monkeypatch.setenv(k, v)
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


def no_secret_in(store, text: str) -> bool:
    return not any(secret in text for secret in store.secrets)


def test_train_a_second_writer_kill_9_and_resume(store, digits_uri, reference):
    """One run serves it all: it trains and checkpoints on the store; a second job on the run is
    kept out by the lease; a kill -9 and a rerun give the uninterrupted run's history."""
    settings = dict(data_uri=digits_uri, output_uri=store.uri("out"), run_name="r", **RECIPE)
    run = (store.fs, "out/r")
    first = start_job(**settings)
    try:
        wait_for_epochs(run, 2, first)
        # stopped, it is alive and its lease is good for its JOB_LEASE_SECONDS (60 s) unrenewed:
        # the second job waits its own 1 s (+5) and gives up, whatever the machine's speed
        first.send_signal(signal.SIGSTOP)
        assert store.fs.ls("out/r/lease", detail=False)  # the lease is an object in the store
        history, latest = read_history(run), store.fs.cat_file("out/r/checkpoints/latest.json")
        second = run_job(lease_seconds=1, **settings)
    finally:
        first.kill()  # the kill -9, wherever the stopped job was
        first.wait()
    assert second.returncode == 75, second.stdout
    assert "another job is writing" in second.stdout and f"pid {first.pid}" in second.stdout, second.stdout
    assert read_history(run) == history and store.fs.cat_file("out/r/checkpoints/latest.json") == latest

    rerun = run_job(**settings)
    assert rerun.returncode == 0, rerun.stdout
    assert "resumed from checkpoints/step-" in rerun.stdout and no_secret_in(store, rerun.stdout)
    assert_same_history(read_history(run), reference)
    summary = json.loads(store.fs.cat_file("out/r/summary.json"))
    assert summary["status"] == "completed" and summary["epochs_completed"] == RECIPE["epochs"]
    for name in ("settings.json", "summary.json", "history.jsonl"):
        assert no_secret_in(store, store.fs.cat_file(f"out/r/{name}").decode())
    pointer = json.loads(store.fs.cat_file("out/r/checkpoints/latest.json"))
    assert store.fs.size(f"out/r/checkpoints/{pointer['file']}") == pointer["size"]
    last = torch.load(io.BytesIO(store.fs.cat_file("out/r/checkpoints/last.pt")), weights_only=True,
                      map_location="cpu")
    assert last["progress"]["epoch"] == RECIPE["epochs"]
    assert not store.fs.exists("out/r/lease") or not store.fs.ls("out/r/lease")  # given back at the end


@ONLY_GCS  # Azurite honours If-None-Match: * itself: the test above runs the lease on it for real
def test_a_create_is_conditional_and_a_412_is_file_exists(store, proxy_for):
    """The lease takes a generation by creating it only if absent. The emulator ignores the
    precondition, so a proxy gives GCS's answer to it: the request must carry it, and the job
    must read the answer as "another writer has it"."""
    uri = store.uri("out/r/lease/000000000001.json")
    storage.create_bytes(uri, b"first")
    storage.create_bytes(uri, b"second")  # the emulator's gap, probed: GCS answers this with 412
    assert store.fs.cat_file("out/r/lease/000000000001.json") == b"second", "the emulator now honours " \
        "ifGenerationMatch=0: test the exclusive creation on it directly and drop the proxy below"
    proxy = proxy_for()
    proxy.answer(r"[?&]ifGenerationMatch=0(&|$)", 412, PRECONDITION_FAILED)
    with pytest.raises(FileExistsError):
        storage.create_bytes(uri, b"third")
    assert proxy.counts["answered"] == 1  # sent with the precondition, answered at once (no retry)
    storage.write_bytes(uri, b"renewed")  # a renewal overwrites: no precondition, forwarded
    assert proxy.counts["answered"] == 1 and store.fs.cat_file("out/r/lease/000000000001.json") == b"renewed"


def test_failing_requests_change_nothing(store, digits_uri, reference, proxy_for):
    # both clients wait before a retry (gcsfs 1-2 s, the job's Azure client up to 1 s): 5% of the
    # ~170 requests of 3 epochs keeps it short. Under a step schedule the first epochs of a run do
    # not depend on how many follow, so they equal the reference's first 3.
    proxy = proxy_for(0.05)
    result = run_job(data_uri=digits_uri, output_uri=store.uri("out"), run_name="faulty", **{**RECIPE, "epochs": 3})
    assert result.returncode == 0, result.stdout
    assert proxy.counts["slowdown"] + proxy.counts["internal"] + proxy.counts["reset"] >= 2, proxy.counts
    assert_same_history(read_history((store.fs, "out/faulty")), reference[:3])
    assert json.loads(store.fs.cat_file("out/faulty/summary.json"))["status"] == "completed"


def test_a_store_failing_every_request_exits_75_within_its_bound(store, digits_dir, proxy_for):
    proxy_for(1.0, faults=("slowdown", "drop"))  # half 503s, half connections closed unanswered
    unit = time_unit()
    start = time.monotonic()
    # gcsfs's own 6 attempts take ~31 s of backoff, and JOB_STORAGE_RETRIES=100 as many on Azure:
    # JOB_STORAGE_TIMEOUT_SECONDS is what bounds them (the retries running out, "after retries" and
    # exit 75 too, is tests/unit/test_azure_store_in_process.py's and the S3 tests')
    result = run_job(data_uri=str(digits_dir), output_uri=store.uri("out"), storage_timeout_seconds=6,
                     storage_retries=100, log_every_seconds=2)
    took = time.monotonic() - start
    assert result.returncode == 75, result.stdout
    assert took < 6 + 3 * unit, (took, unit)  # one operation's bound, the job's start and exit
    assert re.search(rf"storage: still trying to \w+ {store.uri('out/')}", result.stdout)  # not silent meanwhile
    assert "JOB_STORAGE_TIMEOUT_SECONDS=6" in error_line(result)


def test_a_frozen_store_cannot_outlast_the_grace_period(store, digits_dir, proxy_for):
    """The store stops answering while the job trains; SIGTERM still ends the job within
    JOB_STOP_GRACE_SECONDS, naming the valid checkpoint."""
    proxy = proxy_for()
    unit = time_unit()
    grace = max(4.0, 2 * unit)  # inside it the job reaches a step edge and starts its stop checkpoint: work too
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


def test_sigterm_during_a_slow_data_pull_exits_143_promptly(store, digits_uri, proxy_for, tmp_path):
    proxy = proxy_for(delay_seconds=max(5.0, 3 * time_unit()))
    assert_sigterm_interrupts_a_slow_pull(proxy, digits_uri, tmp_path)


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_exit_2_in_one_line_with_the_fix(store, proxy_for, tmp_path, status):
    """401: no valid credentials (gcsfs gone anonymous, an expired token); 403: an identity
    without the role. Every request is refused, so the dataset need not be there."""
    proxy_for().answer("", status, *store.refusals[status])
    result = run_job(data_uri=store.uri("data/digits"), output_uri=store.uri("out"), cache_dir=str(tmp_path / "c"))
    assert result.returncode == 2, result.stdout
    error = error_line(result)
    assert "refused our credentials" in error and store.credentials_variable in error, error
    assert "Workload Identity" in error and no_secret_in(store, result.stdout)


@ONLY_AZURE  # gcp-storage-emulator accepts any credentials; Azurite checks the key's signature
def test_a_wrong_key_is_exit_2_in_one_line_without_the_key(store, digits_dir, monkeypatch):
    wrong = KEY[::-1]  # a well-formed key of the same length: the store refuses the signature
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection_string(store.endpoint, key=wrong))
    result = run_job(data_uri=str(digits_dir), output_uri=store.uri("out"))
    assert result.returncode == 2, result.stdout
    error = error_line(result)
    assert "refused our credentials" in error and store.uri("out") in error, error
    assert "AZURE_STORAGE_CONNECTION_STRING" in error  # the fix names where the key comes from
    assert wrong not in result.stdout


def test_a_key_that_would_write_beside_the_cache_is_refused_by_name(store, digits_uri, tmp_path):
    key = "digits/sub//x.py"  # an empty segment: a path join would climb out of the dataset's cache folder
    store.fs.pipe_file(f"data/{key}", b"import os  # would run at every Python start\n")
    result = run_job(data_uri=digits_uri, output_uri=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    assert result.returncode == 3, result.stdout
    error = error_line(result)
    assert "refusing" in error and key in error, error
    assert not list(tmp_path.rglob("x.py"))


@ONLY_GCS  # Azure cannot hold a key with '..' segments (the module's docstring): no attack there
@pytest.mark.parametrize("escape", ["absolute", "relative"])
def test_object_names_that_escape_the_cache_are_refused(store, digits_uri, proxy_for, tmp_path, escape):
    """GCS lets an object name hold `../` segments; the emulator cannot store one (it answers by
    closing the connection), so the proxy lists one beside the real objects, as a hostile bucket
    would: the job must refuse it before it fetches anything."""
    target = tmp_path / "escaped" / "pwned.txt"
    name = ("digits/" + "../" * 30 + str(target).lstrip("/") if escape == "absolute"
            else "digits/sub/../../../escaped/pwned.txt")  # cache/<hash>/sub/../../../ is tmp_path
    listing = json.loads(urllib.request.urlopen(f"{store.endpoint}/storage/v1/b/data/o?prefix=digits/").read())
    listing["items"].append({**listing["items"][0], "name": name})
    proxy_for().answer(r"^/storage/v1/b/data/o\?", 200, json.dumps(listing).encode())  # listings, not objects
    result = run_job(data_uri=digits_uri, output_uri=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    assert result.returncode == 3, result.stdout
    error = error_line(result)
    assert name in error and "refusing" in error, error
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.gz"))  # nothing fetched


def test_shards_prepared_on_the_store_stream_through_a_small_cache(store, digits_uri, tmp_path):
    shards = store.uri("data/digit-shards")
    prepared = run_job("prepare", digits_uri, shards, shard_bytes=100_000, cache_dir=str(tmp_path / "prep-cache"))
    assert prepared.returncode == 0, prepared.stdout
    index = json.loads(store.fs.cat_file("data/digit-shards/index.json"))
    total = sum(s["bytes"] for split in index["splits"].values() for s in split)
    limit = total // 3  # the cache holds a third of the dataset: training must stream
    result = run_job(data_uri=shards, output_uri=store.uri("out"), run_name="s", epochs=2, batch_size=16,
                     num_workers=0, shard_cache_bytes=limit, cache_dir=str(tmp_path / "cache"), log_level="debug",
                     **DIGITS)
    assert result.returncode == 0, result.stdout
    peaks = [int(m) for m in re.findall(r"shard cache: (\d+) bytes on disk", result.stdout)]
    assert peaks and max(peaks) <= limit, (peaks, limit)
    history = read_history((store.fs, "out/s"))
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["val_accuracy"] > 0.5

"""Object-store faults through a fault-injecting proxy in front of the real S3 server: transient
errors are retried with backoff and change nothing; persistent ones end with exit 75."""

import json
import time

import pytest
import stage_dataset
from conftest import (
    DIGITS,
    assert_same_history,
    assert_sigterm_interrupts_a_slow_pull,
    read_history,
    run_job,
    start_job,
    time_unit,
    wait_for_epochs,
)
from faultproxy import FaultProxy


@pytest.fixture
def proxy_for(s3_server):
    proxies = []

    def make(fraction):
        proxies.append(FaultProxy(s3_server, fraction, seed=len(proxies)))
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


def test_twenty_percent_failing_requests_change_nothing(s3, digits_arrays, proxy_for, monkeypatch):
    stage_dataset.stage(digits_arrays, "s3://data/digits")
    common = dict(data_uri="s3://data/digits", output_uri="s3://out", epochs=3, **DIGITS)
    clean = run_job(run_name="clean", **common)
    assert clean.returncode == 0, clean.stdout
    proxy = proxy_for(0.2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    faulty = run_job(run_name="faulty", **common)
    assert faulty.returncode == 0, faulty.stdout
    assert proxy.counts["slowdown"] + proxy.counts["internal"] + proxy.counts["reset"] > 5, proxy.counts
    assert_same_history(read_history((s3, "out/faulty")), read_history((s3, "out/clean")))
    assert json.loads(s3.cat_file("out/faulty/summary.json"))["status"] == "completed"


def test_all_requests_failing_exits_75_in_bounded_time(s3, digits_dir, proxy_for, monkeypatch):
    proxy = proxy_for(1.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    unit = time_unit()
    start = time.monotonic()
    result = run_job(data_uri=str(digits_dir), output_uri="s3://out", storage_retries=2, storage_timeout_seconds=60)
    took = time.monotonic() - start
    assert result.returncode == 75, result.stdout
    # the bound is the job's own: one storage operation within JOB_STORAGE_TIMEOUT_SECONDS, retries
    # included; around it the job's start (a unit: it imports torch), the local dataset and the exit
    assert took < 60 + 3 * unit, (took, unit)
    errors = [l for l in result.stdout.splitlines() if " ERROR " in l]
    assert len(errors) == 1 and "s3://out/" in errors[0] and "after retries" in errors[0]  # not the timeout
    assert "Traceback" not in result.stdout


def test_sigterm_during_a_slow_data_pull_exits_143_promptly(s3, digits_arrays, s3_server, tmp_path, monkeypatch):
    stage_dataset.stage(digits_arrays, "s3://data/digits")
    proxy = FaultProxy(s3_server, 0.0, delay_seconds=max(5.0, 3 * time_unit()))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert_sigterm_interrupts_a_slow_pull(proxy, "s3://data/digits", tmp_path)
    finally:
        proxy.close()


def test_credentials_rotated_in_a_file_keep_a_long_run_going(s3, s3_server, digits_dir, tmp_path, monkeypatch):
    """A sidecar rewrites the shared credentials file and the old key is revoked mid-run: the job
    reloads its credentials instead of failing its next upload."""
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = old-key\naws_secret_access_key = old-secret\n")
    proxy = FaultProxy(s3_server, 0.0)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        proc = start_job(data_uri=str(digits_dir), output_uri="s3://out", run_name="r", epochs=25, **DIGITS)
        wait_for_epochs((s3, "out/r"), 2, proc)
        creds.write_text("[default]\naws_access_key_id = new-key\naws_secret_access_key = new-secret\n")
        proxy.revoked_keys.add("old-key")
        out = proc.communicate(timeout=600)[0]
    finally:
        proxy.close()
    assert proc.returncode == 0, out
    assert proxy.counts["expired"] >= 1  # the old key was really refused, and the run went on
    assert "refused our credentials (The provided token has expired.); reloading them" in out
    assert len(read_history((s3, "out/r"))) == 25

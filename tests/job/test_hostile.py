"""Attacks by a careless or hostile bucket owner and an unlucky operator (issue 11), each through
the real job: a subprocess, the moto S3 server, real signals and the fault proxy."""

import json
import os
import re
import signal
import struct
import subprocess
import time
import zlib

import boto3
import numpy as np
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
from PIL import Image

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR) ")
FORGED = "2026-01-01T00:00:00 INFO forged line"
SMALL_IMAGES = dict(model="mlp", image_size=16, epochs=1, batch_size=16, num_workers=0, **DIGITS)


def png_bomb(side: int) -> bytes:
    """A real, decodable grayscale PNG of side x side zero pixels: a few hundred KB that decode to
    side^2 bytes (13000 -> 169 MB; 30000 -> 900 MB)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z, row, idat = zlib.compressobj(9), b"\0" * (side + 1), b""
    for _ in range(side):
        idat += z.compress(row)
    idat += z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def images(folder, n: int, color, start: int = 0) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        pixels = np.clip(np.array(color) + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.png"))


@pytest.fixture(scope="module")
def hostile_tree(tmp_path_factory):
    """Class folders with, among 40 good images: a link to /dev/zero and a FIFO named .png, two
    decompression bombs, images in nested subfolders, a file name that is not UTF-8, and a class
    folder whose name holds a newline and a forged log line."""
    root = tmp_path_factory.mktemp("hostile") / "data"
    train = root / "train"
    images(train / "rose", 12, (220, 40, 40))
    images(train / "rose" / "sub" / "deeper", 3, (220, 40, 40), start=100)
    images(train / "tulip", 12, (40, 40, 220))
    images(train / f"lily\n{FORGED}", 12, (40, 220, 40))
    os.symlink("/dev/zero", train / "rose" / "zero.png")
    os.mkfifo(train / "rose" / "fifo.png")
    (train / "tulip" / "bomb-30000.png").write_bytes(png_bomb(30000))
    (train / "tulip" / "bomb-13000.png").write_bytes(png_bomb(13000))
    good = (train / "tulip" / "000.png").read_bytes()
    fd = os.open(os.path.join(os.fsencode(train / "tulip"), b"caf\xe9.png"), os.O_WRONLY | os.O_CREAT)
    os.write(fd, good)
    os.close(fd)
    return root


@pytest.fixture(scope="module")
def hostile_run(hostile_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile-out")
    result = run_job(data_uri=str(hostile_tree), output_uri=str(out), run_name="r", max_bad_fraction=0.2,
                     **SMALL_IMAGES)
    summary = json.loads((out / "r" / "summary.json").read_text()) if (out / "r" / "summary.json").exists() else {}
    return result, summary


def test_files_that_are_not_regular_files_are_skipped_and_named(hostile_run, hostile_tree):
    result, summary = hostile_run
    assert result.returncode == 0, result.stdout
    assert f"skipping {hostile_tree}/train/rose/zero.png: not a regular file" in result.stdout  # no MemoryError
    assert f"skipping {hostile_tree}/train/rose/fifo.png: not a regular file" in result.stdout  # no hang
    assert "Traceback" not in result.stdout


def test_decompression_bombs_are_bad_files(hostile_run, hostile_tree):
    result, summary = hostile_run
    for side in (30000, 13000):
        assert f"skipping {hostile_tree}/train/tulip/bomb-{side}.png: more than JOB_MAX_IMAGE_PIXELS" in result.stdout
    assert summary["bad_files"] == 4


def test_images_in_subfolders_of_a_class_folder_belong_to_it(hostile_run):
    result, summary = hostile_run
    assert result.returncode == 0, result.stdout
    # 12 + 3 nested roses, 12 tulips + the non-UTF-8 name, 12 lilies: every good file is used
    assert summary["train_samples"] + summary["val_samples"] == 40
    assert "IsADirectoryError" not in result.stdout and "UnicodeEncodeError" not in result.stdout


def test_names_from_the_data_cannot_forge_log_lines(hostile_run):
    result, summary = hostile_run
    lines = result.stdout.splitlines()
    assert all(LOG_LINE.match(line) for line in lines), [l for l in lines if not LOG_LINE.match(l)]
    assert not any(line.startswith(FORGED) for line in lines)
    assert summary["class_names"][0] == f"lily\n{FORGED}"  # kept as it is in the outputs, escaped in the log


def test_a_class_folder_name_that_is_not_utf8_is_refused(tmp_path):
    root = tmp_path / "data"
    images(root / "train" / "rose", 3, (220, 40, 40))
    images(os.path.join(os.fsencode(root / "train"), b"tulip\xff").decode(errors="surrogateescape"), 3, (40, 40, 220))
    result = run_job(data_uri=str(root), output_uri=str(tmp_path / "out"), **SMALL_IMAGES)
    assert result.returncode == 3, result.stdout
    assert "is not valid UTF-8" in result.stdout and "Traceback" not in result.stdout


@pytest.mark.parametrize("escape", ["absolute", "relative"])
def test_object_keys_that_escape_the_cache_are_refused(s3, digits_arrays, tmp_path, escape):
    stage_dataset.stage(digits_arrays, "s3://data/mnist")
    target = tmp_path / "escaped" / "pwned.txt"
    key = ("mnist/" + "../" * 30 + str(target).lstrip("/") if escape == "absolute"
           else "mnist/sub/../../../escaped/pwned.txt")  # cache/<hash>/sub/../../../ is tmp_path
    boto3.client("s3").put_object(Bucket="data", Key=key, Body=b"import os  # would run at every Python start\n")
    result = run_job(data_uri="s3://data/mnist", output_uri=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    assert result.returncode == 3, result.stdout
    error = next(l for l in result.stdout.splitlines() if " ERROR " in l)
    assert key in error and "refusing" in error
    assert not target.exists() and not list(tmp_path.rglob("pwned.txt"))


def test_objects_deleted_from_the_bucket_are_not_trained_on(s3, digits_arrays, tmp_path):
    stage_dataset.stage(digits_arrays, "s3://data/digits")
    common = dict(data_uri="s3://data/digits", output_uri=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                  epochs=1, **DIGITS)
    assert run_job(run_name="before", **common).returncode == 0
    for name in s3.ls("data/digits"):
        if "t10k" in name:
            s3.rm(name)  # the test set is gone from the bucket
    after = run_job(run_name="after", **common)
    assert after.returncode == 0, after.stdout
    summary = json.loads((tmp_path / "out" / "after" / "summary.json").read_text())
    assert summary.get("test_accuracy") is None and "test set: no" in after.stdout
    assert not list((tmp_path / "cache").rglob("t10k*"))


def test_sigterm_while_reading_the_checkpoint_at_resume_moves_nothing(s3, s3_server, digits_dir, tmp_path, monkeypatch):
    proxy = FaultProxy(s3_server, 0.0, delay_paths=r"step-\d+\.pt$")
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        settings = dict(data_uri=str(digits_dir), output_uri="s3://out", run_name="r", **DIGITS)
        assert run_job(epochs=2, **settings).returncode == 0
        latest = s3.cat_file("out/r/checkpoints/latest.json")
        # from now on, reading the checkpoint is slow: the signal is sent as soon as the proxy holds
        # the resume's read, and lands while it waits whatever the machine's speed; the delay only
        # has to outlast the test's reaction (a poll and a kill: far less than a unit)
        proxy.delay_seconds = max(6.0, 3 * time_unit())
        proc = start_job(epochs=4, **settings)
        wait_for(lambda: proxy.counts["delayed"] > 0, proc, what="the resume's checkpoint read at the slow store")
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 143, out
        assert not s3.exists("out/r/checkpoints/corrupt"), s3.find("out/r/checkpoints")
        assert s3.cat_file("out/r/checkpoints/latest.json") == latest
        proxy.delay_seconds = 0.0
        rerun = run_job(epochs=4, **settings)
        assert rerun.returncode == 0 and "(end of epoch 2; global step" in rerun.stdout, rerun.stdout
    finally:
        proxy.close()


def test_a_storage_error_while_reading_the_checkpoint_exits_75_and_moves_nothing(s3, s3_server, digits_dir, monkeypatch):
    proxy = FaultProxy(s3_server, 1.0, faults=("internal",), fail_paths=r"step-\d+\.pt$")
    try:
        settings = dict(data_uri=str(digits_dir), output_uri="s3://out", run_name="r", **DIGITS)
        assert run_job(epochs=1, **settings).returncode == 0
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        result = run_job(epochs=2, storage_retries=2, **settings)
        assert result.returncode == 75, result.stdout
        assert proxy.counts["internal"] >= 2
        assert not s3.exists("out/r/checkpoints/corrupt")
    finally:
        proxy.close()


def test_frozen_storage_cannot_outlast_the_grace_period(s3, s3_server, digits_dir, monkeypatch):
    """The store stops answering (like a SIGSTOPped server) while the job runs; SIGTERM must still
    end the job within JOB_STOP_GRACE_SECONDS, saying which checkpoint is the valid one."""
    unit = time_unit()
    grace = max(4.0, 2 * unit)  # inside it the job reaches a step edge and starts its stop checkpoint: work too
    proxy = FaultProxy(s3_server, 0.0)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proc = start_job(data_uri=str(digits_dir), output_uri="s3://out", run_name="r", epochs=100000,
                         stop_grace_seconds=grace, log_every_seconds=1, **DIGITS)
        wait_for_epochs((s3, "out/r"), 1, proc)
        proxy.freeze()
        wait_for(lambda: proxy.counts["frozen"] > 0, proc, what="a request to the frozen store")
        out = stop_within_grace(proc, grace, unit)
    finally:
        proxy.close()
    assert proc.returncode == 143, out
    last = out.strip().splitlines()[-1]
    assert "without a new checkpoint; the valid one is checkpoints/step-" in last and "(exit 143" in last, last
    assert "Traceback" not in out


def test_persistent_storage_failure_ends_with_exit_75_within_its_bound(s3, s3_server, digits_dir, monkeypatch):
    proxy = FaultProxy(s3_server, 1.0, faults=("slowdown", "drop"))  # half throttled, half dropped connections
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        result = run_job(data_uri=str(digits_dir), output_uri="s3://out", storage_timeout_seconds=6,
                         log_every_seconds=2)  # botocore's default retries
    finally:
        proxy.close()
    assert result.returncode == 75, result.stdout
    assert re.search(r"storage: still trying to \w+ s3://out/", result.stdout)  # not silent while it retries
    errors = [l for l in result.stdout.splitlines() if " ERROR " in l]
    assert len(errors) == 1 and "JOB_STORAGE_TIMEOUT_SECONDS=6" in errors[0], result.stdout


def test_a_second_job_on_a_running_run_exits_75_and_changes_nothing(tmp_path, digits_dir):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", epochs=100000, lease_seconds=3,
                    **DIGITS)
    first = start_job(**settings)
    try:
        wait_for_epochs(tmp_path / "r", 2, first)
        second = run_job(**settings)
        assert second.returncode == 75, second.stdout
        assert "another job is writing" in second.stdout and f"pid {first.pid}" in second.stdout
        rows = len(read_history(tmp_path / "r"))
        wait_for_epochs(tmp_path / "r", rows + 2, first)  # the first job goes on undisturbed
    finally:
        first.send_signal(signal.SIGTERM)
        out = first.communicate(timeout=300)[0]
    assert first.returncode == 143, out
    history = read_history(tmp_path / "r")
    assert [r["epoch"] for r in history] == list(range(1, len(history) + 1))


def test_a_job_that_lost_its_lease_stops_without_turning_the_run_back(tmp_path, digits_dir):
    """An old pod is frozen long enough for its lease to expire; a new pod takes the run over; the
    old one wakes up: it must stop (exit 75) without moving latest.json or the history back."""
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", lease_seconds=2, **DIGITS)
    reference = run_job(**{**settings, "output_uri": str(tmp_path / "ref")}, epochs=12)
    assert reference.returncode == 0
    old = start_job(**settings, epochs=100000)
    wait_for_epochs(tmp_path / "r", 2, old)
    old.send_signal(signal.SIGSTOP)
    try:
        time.sleep(3)  # the old lease expires
        new = start_job(**settings, epochs=12)
        lease = tmp_path / "r" / "lease"  # gone: the new job took the lease, finished and gave it back
        wait_for(lambda: not lease.exists() or len(os.listdir(lease)) >= 2, new, what="the new job's lease")
    finally:
        old.send_signal(signal.SIGCONT)
    old_out = old.communicate(timeout=300)[0]
    new_out = new.communicate(timeout=600)[0]
    assert new.returncode == 0, new_out
    assert old.returncode == 75, old_out
    assert "lost the run's lease" in old_out or "another job is writing this run" in old_out, old_out
    latest = json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())
    assert latest["epoch"] == 12
    assert_same_history(read_history(tmp_path / "r"), read_history(tmp_path / "ref" / "r"))


def test_a_full_cache_is_named_with_the_space_needed(s3, digits_arrays, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        stage_dataset.stage(digits_arrays, "s3://data/digits")
        result = run_job(data_uri="s3://data/digits", output_uri=str(tmp_path / "out"), cache_dir=str(cache))
    finally:
        subprocess.run(["umount", str(cache)], check=True)
    assert result.returncode == 4, result.stdout
    error = next(l for l in result.stdout.splitlines() if " ERROR " in l)
    assert f"JOB_CACHE_DIR={cache}" in error and "MB free but the dataset needs" in error, error


def test_a_completed_run_leaves_no_failure_record_or_temporary_files(tmp_path, digits_dir):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", epochs=1, **DIGITS)
    failed = run_job(**{**settings, "lr": "1e30"})  # diverges: exit 65 and a failure.json
    assert failed.returncode == 65 and (tmp_path / "r" / "failure.json").exists()
    stale = [tmp_path / "r" / "history.jsonl.tmp-0badc0de", tmp_path / "r" / "checkpoints" / "step-000000001.pt.tmp-deadbeef"]
    for path in stale:  # what a kill -9 in the middle of a local write leaves
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    result = run_job(**settings)
    assert result.returncode == 0, result.stdout
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "completed"
    assert not (tmp_path / "r" / "failure.json").exists()
    assert not any(p.exists() for p in stale)


# --- the end of a run: trackers, reruns, exports ----------------------------------------------------

def test_a_hanging_tracker_cannot_cost_the_stop_record(tmp_path, digits_dir, monkeypatch):
    proxy = FaultProxy("http://127.0.0.1:9", 0.0)
    proxy.freeze()  # an MLflow server that accepts connections and never answers
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
        unit = time_unit()
        # inside the grace period the job writes its stop checkpoint, summary and lease (local files: well
        # under a unit each), and the tracker gets what is left of it but a second
        grace = max(5.0, 3 * unit)
        proc = start_job(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", epochs=100000,
                         stop_grace_seconds=grace, **DIGITS)
        wait_for_epochs(tmp_path / "r", 1, proc)
        out = stop_within_grace(proc, grace, unit)  # a pod is killed after its grace period
    finally:
        proxy.close()
    assert proc.returncode == 143, out
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "stopped"
    assert not (tmp_path / "r" / "lease").exists()  # given back: a rerun need not wait for it to expire
    assert "experiment tracking did not finish" in out


def test_a_stopped_rerun_of_a_completed_run_keeps_its_record_and_a_lost_export_is_redone(
        s3, s3_server, digits_dir, tmp_path, monkeypatch):
    settings = dict(output_uri=str(tmp_path), run_name="r", epochs=2, **DIGITS)
    assert run_job(data_uri=str(digits_dir), **settings).returncode == 0
    summary = (tmp_path / "r" / "summary.json").read_text()
    # killed while exporting: model.safetensors written, config.json (written last) not; a rerun
    # then reads the dataset (the export verifies on it), where a complete one is answered without
    (tmp_path / "r" / "model" / "config.json").unlink()
    # a rerun stopped before training (its dataset read hangs on a frozen store) changes nothing
    s3.put(str(digits_dir), "data/digits", recursive=True)
    proxy = FaultProxy(s3_server, 0.0)
    proxy.freeze()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proc = start_job(data_uri="s3://data/digits", **settings)
        wait_for(lambda: proxy.counts["frozen"] > 0, proc, what="the rerun reading its dataset")
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=300)[0]
    finally:
        proxy.close()
    assert proc.returncode == 143, out
    assert (tmp_path / "r" / "summary.json").read_text() == summary
    rerun = run_job(data_uri=str(digits_dir), **settings)
    assert rerun.returncode == 0 and "exporting it" in rerun.stdout and "already complete" in rerun.stdout, rerun.stdout
    assert json.loads((tmp_path / "r" / "model" / "config.json").read_text())["num_classes"] == 10

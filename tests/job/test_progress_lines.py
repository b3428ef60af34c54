"""No silent phase (issue 24): with JOB_LOG_EVERY_SECONDS=1, the waits for shards before a streamed
run's first step (and before its val and test passes) log what they wait for, every feature pass
of a frozen backbone logs its progress, and no two lines are further apart than the interval plus
a slack measured in the same run. A store that answers every shard read in 0.7 s (under the
interval, so no storage line says a read is slow) makes each phase several seconds long."""

import re
from datetime import datetime

import stage_dataset
from conftest import DIGITS, run_job, time_unit
from faultproxy import FaultProxy
from test_transfer import weights_file

SHARD_DELAY = 0.7  # seconds a shard read takes


def slow_shards(s3, monkeypatch, source: str, dest: str, shard_bytes: int) -> FaultProxy:
    """`source` prepared into shards, put in the S3 server at s3://data/<dest>, and the job's
    requests for them (through AWS_ENDPOINT_URL) answered in SHARD_DELAY seconds each."""
    prepared = run_job("prepare", source, f"{source}-shards", shard_bytes=shard_bytes)
    assert prepared.returncode == 0, prepared.stdout
    s3.put(f"{source}-shards", f"data/{dest}", recursive=True)
    proxy = FaultProxy(s3.aws_env["AWS_ENDPOINT_URL"], 0.0, delay_seconds=SHARD_DELAY, delay_paths=r"\.tar")
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    return proxy


def stamped(out: str) -> list[tuple[datetime, str]]:
    """(timestamp, line) of the job's log lines (job.report.setup_logging: the time comes first)."""
    return [(datetime.fromisoformat(line[:23]), line) for line in out.splitlines()
            if re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} ", line)]


def between(lines: list[tuple[datetime, str]], first: str, last: str) -> list[tuple[datetime, str]]:
    """The lines from the first that holds `first` to the next that holds `last`, both included."""
    start = next(i for i, (_, line) in enumerate(lines) if first in line)
    end = next(i for i in range(start, len(lines)) if last in lines[i][1])
    return lines[start:end + 1]


def longest_silence(lines: list[tuple[datetime, str]]) -> tuple[float, str]:
    """(seconds, the line that ended it) of the longest gap between consecutive lines."""
    return max(((b - a).total_seconds(), line) for (a, _), (b, line) in zip(lines, lines[1:], strict=False))


def seconds(lines: list[tuple[datetime, str]]) -> float:
    return (lines[-1][0] - lines[0][0]).total_seconds()


def test_a_streamed_run_says_what_it_waits_for_before_each_pass(s3, digits_dir, tmp_path, monkeypatch):
    """The first batches of a pass need a dozen shards, fetched one after another: the run said
    nothing for 9 s (with 1 s asked) before its first step, its val and its test pass."""
    proxy = slow_shards(s3, monkeypatch, str(digits_dir), "digit-shards", 16_000)  # 9 samples a shard
    try:
        unit = time_unit()
        result = run_job(data_uri="s3://data/digit-shards", output_uri=str(tmp_path / "out"), run_name="r", epochs=1,
                         batch_size=32, num_workers=1, limit_train_batches=2, limit_val_batches=1,
                         cache_dir=str(tmp_path / "cache"), log_every_seconds=1, **DIGITS)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stdout
    lines = stamped(result.stdout)
    first_step = between(lines, "mixed precision", "epoch 1/1 step 1/2")
    assert seconds(first_step) > 3, first_step  # the premise: the wait lasts several intervals
    gap, line = longest_silence(between(lines, "sharded dataset s3://data/digit-shards", "test_loss="))
    assert gap <= 1 + 2 * unit, (gap, line, unit)
    # each pass's waits name the shards it waits for: train shards before the first step, then val, then test
    for text, first, last in (("train-", "mixed precision", "epoch 1/1 step 1/2"),
                              ("val-", "epoch 1/1 step 2/2", "evaluating val"),
                              ("test-", "epoch 1 train_loss=", "test_loss=")):
        waits = [line for _, line in between(lines, first, last) if "waiting for shard" in line]
        assert waits and all(f"waiting for shard {text}" in line for line in waits), (text, waits)


def test_every_feature_pass_logs_its_progress_and_nothing_between_is_silent(s3, digits_arrays, tmp_path,
                                                                             monkeypatch):
    """A frozen backbone's feature passes (train and val images, then test images) each took one
    batch here, as they often do (a batch holds up to 1024 images): they logged nothing until the
    batch was done, and nothing from the end of one pass to the end of the next one's first batch."""
    for split in ("train", "test"):
        stage_dataset.png_folder(digits_arrays[f"{split}_images"], digits_arrays[f"{split}_labels"],
                                 str(tmp_path / "digits" / split))
    proxy = slow_shards(s3, monkeypatch, str(tmp_path / "digits"), "digit-images", 160_000)
    try:
        unit = time_unit()
        result = run_job(data_uri="s3://data/digit-images", output_uri=str(tmp_path / "out"), run_name="r",
                         model="resnet18", image_size=32, freeze="all", pretrained=weights_file(str(tmp_path / "w.pt")),
                         epochs=1, batch_size=16, num_workers=0, cache_dir=str(tmp_path / "cache"),
                         log_every_seconds=1, **DIGITS)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stdout
    lines = stamped(result.stdout)
    passes = between(lines, "feature cache: computing backbone features", "mixed precision")  # to the training
    assert seconds(passes) > 3, passes  # the premise: the passes last several intervals
    gap, line = longest_silence(passes)
    assert gap <= 1 + 2 * unit, (gap, line, unit)
    for what in ("train and val images", "test images"):  # each pass says how far it has come while it runs
        during = between(passes, f"feature cache: {what} ...", f"feature cache: {what} done in ")
        assert any(re.search(rf"feature cache: {what}: \d+/\d+[ ,]", line) for _, line in during), during

"""What the operator sees (issue 14), through the real job: progress without silences, defaults
that learn, warnings that explain, readable names, reruns said plainly, one record for a run that
failed early, a complete --check, errors that name the URI and the fix, and the pictures."""

import datetime
import json
import os
import re
import subprocess
import sys

import numpy as np

import stage_dataset
from conftest import DIGITS, ROOT, job_env, read_history, run_job, time_unit
from faultproxy import FaultProxy
from test_transfer import make_tree, weights_file

STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}) ")


def gaps(out: str) -> list[float]:
    """Seconds between consecutive log lines."""
    times = [datetime.datetime.fromisoformat(m[1]) for m in map(STAMP.match, out.splitlines()) if m]
    return [(b - a).total_seconds() for a, b in zip(times, times[1:])]


def test_a_feature_cache_run_never_goes_quiet(tmp_path):
    make_tree(str(tmp_path / "data"), per_class=80, bad=False)  # 240 training and 120 validation images
    weights = weights_file(str(tmp_path / "w.pt"))
    unit = time_unit()
    result = run_job(data_uri=str(tmp_path / "data"), output_uri=str(tmp_path / "out"), run_name="r", model="resnet18",
                     pretrained=weights, freeze="all", image_size=64, num_workers=0, epochs=2, log_every_seconds=1.5)
    assert result.returncode == 0, result.stdout
    assert "checking 360 image files" in result.stdout and "feature cache: computing" in result.stdout
    longest = max(gaps(result.stdout))  # from the job's own timestamps
    # the interval, and the job's longest piece of work between two looks at the clock (measured:
    # checking the images and setting up the data, ~0.85 of a unit whether the machine is idle or
    # loaded) - it stretches with the machine as the unit does (measured before and after the run:
    # the larger, should the load have grown)
    unit = max(unit, time_unit())
    assert longest <= 1.5 + unit, (longest, unit, result.stdout)
    row = read_history(tmp_path / "out" / "r")[-1]
    assert row["train_seconds"] + row["val_seconds"] <= row["epoch_seconds"]  # the honest wall time of the epoch


def test_progress_lines_say_where_the_run_is(tmp_path, digits_dir):
    result = run_job(data_uri=str(digits_dir), output_uri=str(tmp_path), epochs=2, log_every_seconds=0.001, **DIGITS)
    assert result.returncode == 0, result.stdout
    line = next(l for l in result.stdout.splitlines() if " step " in l)
    for part in ("epoch 1/2 step ", "%)", "train_loss=", "lr=", "samples/s", "elapsed", "epoch ETA", "run ETA", "peak memory"):
        assert part in line, (part, line)
    first, last = result.stdout.strip().splitlines()[0], result.stdout.strip().splitlines()[-1]
    run = re.search(r"run (\S+):", first)[1]
    assert run.startswith(str(tmp_path)) and run in last  # the run's URI in the first and the last line


def test_a_transfer_learning_run_with_only_model_and_weights_set_learns(tmp_path):
    """The flowers tutorial's choices and nothing else: with the MNIST defaults (SGD lr 0.5, batch
    100) 90 images made one step per epoch and validation stayed at chance."""
    make_tree(str(tmp_path / "data"), per_class=30, bad=False)
    result = run_job(data_uri=str(tmp_path / "data"), output_uri=str(tmp_path / "out"), model="resnet18",
                     pretrained=weights_file(str(tmp_path / "w.pt")), freeze="all")
    assert result.returncode == 0, result.stdout
    assert ("defaults for transfer learning (set the variable to choose otherwise): JOB_OPTIMIZER=adam JOB_LR=0.001 "
            "JOB_BATCH_SIZE=32 JOB_LR_SCHEDULE=constant") in result.stdout
    summary = json.loads(next((tmp_path / "out").glob("*/summary.json")).read_text())
    assert summary["best_val_accuracy"] > 0.8, summary  # 3 classes: chance is 0.33
    assert "at chance" not in result.stdout


def test_a_run_that_cannot_learn_is_warned_about(tmp_path, digits_arrays):
    blank = {"train_images": np.zeros((200, 28, 28), np.uint8), "train_labels": np.arange(200, dtype=np.uint8) % 10}
    stage_dataset.stage(blank, str(tmp_path / "blank"))  # every image the same: nothing to learn
    result = run_job(data_uri=str(tmp_path / "blank"), output_uri=str(tmp_path / "out"), epochs=4, **DIGITS)
    assert result.returncode == 0, result.stdout
    assert "each epoch is only 2 optimizer step(s)" in result.stdout
    assert "validation accuracy has stayed at chance" in result.stdout and "JOB_LR" in result.stdout


def test_rerunning_a_completed_run_says_so_and_trains_nothing(tmp_path, digits_dir):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), epochs=2, **DIGITS)
    assert run_job(**settings).returncode == 0
    run_dir = next(tmp_path.glob("mlp-digits-*"))
    assert re.fullmatch(r"mlp-digits-[0-9a-f]{8}", run_dir.name)  # readable: model, dataset, short hash
    latest = (run_dir / "checkpoints" / "latest.json").read_text()
    again = run_job(**settings)
    assert again.returncode == 0 and "is already complete: 2 epochs" in again.stdout, again.stdout
    assert "epoch 1 train_loss" not in again.stdout
    assert (run_dir / "checkpoints" / "latest.json").read_text() == latest


def test_a_run_started_by_an_earlier_version_keeps_its_name(tmp_path, digits_dir):
    from job.settings import Settings

    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path / "out"), **DIGITS)
    legacy = Settings(**{k: str(v) for k, v in settings.items()}).legacy_run_name()  # model-hash, trainjob <= 0.1
    assert run_job(run_name=legacy, epochs=1, **settings).returncode == 0
    result = run_job(epochs=2, **settings)
    assert result.returncode == 0, result.stdout
    assert f"continuing the run {legacy}" in result.stdout and "(end of epoch 1; global step" in result.stdout
    assert [p.name for p in (tmp_path / "out").iterdir()] == [legacy]


def test_a_run_that_failed_before_training_leaves_one_record(tmp_path):
    result = run_job(data_uri=str(tmp_path / "missing"), output_uri=str(tmp_path / "out"), run_name="r")
    assert result.returncode == 3, result.stdout
    assert sorted(p.name for p in (tmp_path / "out" / "r").iterdir()) == ["failure.json"]
    failure = json.loads((tmp_path / "out" / "r" / "failure.json").read_text())
    assert failure["exit_code"] == 3 and "missing" in failure["reason"] and failure["settings"]["run_name"] == "r"


def test_check_verifies_what_the_run_needs_and_says_where_it_stands(tmp_path, digits_dir):
    common = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", **DIGITS)
    fresh = run_job("--check", **common)
    assert fresh.returncode == 0 and "run " in fresh.stdout and ": new" in fresh.stdout, fresh.stdout
    assert not (tmp_path / "r").exists()  # --check leaves no run directory behind
    assert run_job(epochs=1, **common).returncode == 0
    done = run_job("--check", epochs=1, **common)
    assert done.returncode == 0 and "complete (1 epochs)" in done.stdout, done.stdout
    more = run_job("--check", epochs=3, **common)
    assert "resumable from checkpoints/step-000000012.pt (end of epoch 1)" in more.stdout, more.stdout
    missing = run_job("--check", pretrained=str(tmp_path / "nope.pt"), **common)
    assert missing.returncode == 3 and "nope.pt" in missing.stdout, missing.stdout


def test_settings_errors_come_before_the_heavy_imports(tmp_path):
    code = "import sys; from job.cli import main; c = main([]); print('torch loaded:', 'torch' in sys.modules); sys.exit(c)"
    result = subprocess.run([sys.executable, "-c", code], env=job_env(data_uri=str(tmp_path), model="resnet15"),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "did you mean resnet152" in result.stdout and "torch loaded: False" in result.stdout


def test_a_uri_one_level_too_deep_names_the_uri_and_its_parent(s3, tmp_path):
    make_tree(str(tmp_path / "data"), per_class=3, bad=False)
    s3.put(str(tmp_path / "data"), "data/flowers", recursive=True)
    result = run_job(data_uri="s3://data/flowers/train", output_uri=str(tmp_path / "out"), model="resnet18",
                     cache_dir=str(tmp_path / "cache"))
    assert result.returncode == 3, result.stdout
    error = next(l for l in result.stdout.splitlines() if " ERROR " in l)
    assert "s3://data/flowers/train" in error and "did you mean JOB_DATA_URI=s3://data/flowers" in error
    assert str(tmp_path / "cache") not in error


def test_refused_credentials_are_one_exit_code_wherever_they_show(s3, s3_server, digits_arrays, tmp_path, monkeypatch):
    stage_dataset.stage(digits_arrays, "s3://data/digits")
    proxy = FaultProxy(s3_server, 0.0)
    proxy.revoked_keys.add(s3.aws_env["AWS_ACCESS_KEY_ID"])  # every request answered ExpiredToken
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        common = dict(data_uri="s3://data/digits", output_uri="s3://out", cache_dir=str(tmp_path / "cache"))
        run, check = run_job(**common), run_job("--check", **common)
    finally:
        proxy.close()
    for result in (run, check):
        assert result.returncode == 2, result.stdout
        assert "refused our credentials" in result.stdout and "Traceback" not in result.stdout


def test_plots_and_per_class_accuracy_name_the_classes(tmp_path):
    make_tree(str(tmp_path / "data"), per_class=12, bad=False)
    os.makedirs(tmp_path / "data" / "test")
    for c in ("daisy", "rose", "tulip"):
        os.symlink(tmp_path / "data" / "valid" / c, tmp_path / "data" / "test" / c)
    result = run_job(data_uri=str(tmp_path / "data"), output_uri=str(tmp_path / "out"), run_name="r", model="resnet18",
                     pretrained=weights_file(str(tmp_path / "w.pt")), image_size=32, num_workers=0, epochs=2)
    assert result.returncode == 0, result.stdout
    summary = json.loads((tmp_path / "out" / "r" / "summary.json").read_text())
    assert set(summary["per_class_val_accuracy"]) == set(summary["per_class_test_accuracy"]) == {"daisy", "rose", "tulip"}
    assert summary["recipe"] == "resnet18, adam lr 0.001, batch 32, constant schedule"
    for plot in ("accuracy", "loss", "confusion_val", "confusion_test"):
        assert (tmp_path / "out" / "r" / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"

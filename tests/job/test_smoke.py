"""Smoke mode against the S3 server: the whole path in seconds, only under smoke/, every step
reported; broken paths caught with the right exit code."""

import json

import pytest

import stage_dataset
from conftest import run_job
from test_transfer import RECIPE, make_tree, weights_file

STEPS = ("output location", "dataset pulled and read", "model built with its weights", "loss sanity",
         "train and validate", "summary and test set", "checkpoint written, verified, reloaded",
         "history, summary and plots read back")


def assert_report(out: str, passed: bool):
    for name in STEPS if passed else STEPS[:1]:
        assert f"s  {name}" in out, name
    assert ("smoke: PASSED (exit 0)" if passed else "smoke: FAILED") in out


def test_smoke_on_mnist_format_data_in_s3(s3, digits_arrays):
    stage_dataset.stage(digits_arrays, "s3://data/digits")
    s3.pipe("out/real/history.jsonl", b'{"epoch": 1}\n')  # a real run's output, which smoke must not touch
    result = run_job(data_uri="s3://data/digits", output_uri="s3://out", run_name="real", smoke="true")
    assert result.returncode == 0, result.stdout
    assert_report(result.stdout, passed=True)
    written = s3.find("out/real")
    assert all(p.startswith("out/real/smoke/") for p in written if p != "out/real/history.jsonl")
    assert s3.cat_file("out/real/history.jsonl") == b'{"epoch": 1}\n'
    assert json.loads(s3.cat_file("out/real/smoke/summary.json"))["status"] == "completed"


def test_smoke_on_an_image_folder_pulls_a_sample(s3, tmp_path):
    make_tree(str(tmp_path / "data"), per_class=12)
    s3.put(str(tmp_path / "data"), "data/flowers", recursive=True)
    s3.put(weights_file(str(tmp_path / "w.pt")), "data/w.pt")
    result = run_job(data_uri="s3://data/flowers", output_uri="s3://out", run_name="f", smoke="true",
                     pretrained="s3://data/w.pt", cache_dir=str(tmp_path / "cache"), **{**RECIPE, "epochs": 5})
    assert result.returncode == 0, result.stdout
    assert_report(result.stdout, passed=True)
    pulled = [p for p in (tmp_path / "cache").rglob("*.*") if p.suffix in (".jpg", ".png")]
    assert 0 < len(pulled) <= 8 * 6  # a sample: at most 8 per class folder, not all 56 files
    summary = json.loads(s3.cat_file("out/f/smoke/summary.json"))
    assert summary["epochs_completed"] == 1


@pytest.mark.parametrize("settings, code, message", [
    ({"data_uri": "s3://no-such-bucket/digits"}, 3, "no-such-bucket"),
    ({"pretrained": "s3://data/missing-weights.pt", "model": "resnet18", "image_size": 32}, 3, "missing-weights.pt"),
    ({"lr": "1e-12"}, 65, "nothing is learning"),
    ({"output_uri": "s3://no-such-output"}, 4, "no-such-output"),
])
def test_smoke_catches_a_broken_path(s3, digits_arrays, settings, code, message):
    stage_dataset.stage(digits_arrays, "s3://data/digits")
    result = run_job(**{"data_uri": "s3://data/digits", "output_uri": "s3://out", "smoke": "true", **settings})
    assert result.returncode == code, result.stdout
    assert message in result.stdout and "Traceback" not in result.stdout
    assert f"smoke: FAILED (exit {code})" in result.stdout

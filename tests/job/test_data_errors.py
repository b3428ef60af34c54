"""A missing or broken dataset, or an unwritable output, is one clear line and a meaningful exit code."""

import gzip
import subprocess
import sys

import pytest

from conftest import ROOT, corrupt_copy, idx_images, job_env, run_job
from job.data.idx import idx_bytes


def assert_one_clear_error(result, code: int, *names: str) -> None:
    assert result.returncode == code, result.stdout
    assert "Traceback" not in result.stdout
    errors = [l for l in result.stdout.splitlines() if " ERROR " in l]
    assert len(errors) == 1, result.stdout
    for name in names:
        assert name in errors[0], errors[0]


def test_missing_bucket_exits_3_naming_it(s3, tmp_path):
    result = run_job(data_uri="s3://no-such-bucket/mnist", output_uri=str(tmp_path))
    assert_one_clear_error(result, 3, "s3://no-such-bucket/mnist")


def test_missing_files_exit_3(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("not a dataset")
    result = run_job(data_uri=str(tmp_path / "empty"), output_uri=str(tmp_path / "out"))
    assert_one_clear_error(result, 3, "train-images-idx3-ubyte")


def test_what_a_rerun_cannot_fix_is_not_exit_75(s3, tmp_path):
    """A name too long, a symlink loop, a FIFO where index.json should be: permanent (3), where
    every OSError used to be 75 and Kubernetes retried what can never work. No credentials at
    all is 2 with the fix, not 75."""
    import os

    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "index.json")
    for uri, words in ((str(tmp_path / ("x" * 300) / "data"), "too long"), (str(tmp_path / "a"), str(tmp_path / "a")),
                       (str(tmp_path / "fifo"), "not a regular file")):
        assert_one_clear_error(run_job(data_uri=uri, output_uri=str(tmp_path / "out")), 3, words)
    env = {k: v for k, v in job_env(data_uri="s3://data/mnist", output_uri=str(tmp_path / "out")).items()
           if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL"}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")  # nowhere to find credentials, as on a pod without its Secret
    anonymous = subprocess.run([sys.executable, "-m", "job"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=600)
    assert_one_clear_error(anonymous, 2, "no credentials found", "AWS_ACCESS_KEY_ID")


def test_missing_labels_file_exit_3(tmp_path, digits_dir):
    (digits_dir / "train-labels-idx1-ubyte.gz").unlink()
    result = run_job(data_uri=str(digits_dir), output_uri=str(tmp_path / "out"))
    assert_one_clear_error(result, 3, "train-labels-idx1-ubyte")


# Explicit ids: pytest would name a bytes parameter by its value, and a gzip header holds the
# second it was written (mtime=0 here as well), so the two xdist workers' collections differed.
@pytest.mark.parametrize("name, data, reason", [
    ("train-images-idx3-ubyte.gz", gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 64, mtime=0), "bad magic number"),
    ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(idx_images(2000)), mtime=0)[:5000], "corrupt or truncated"),
    ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(idx_images(5))[:-100], mtime=0), "truncated"),
    ("train-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(idx_images(3)[:, 0, 0]), mtime=0), "labels"),
], ids=["images-bad-magic", "images-cut-gzip-stream", "images-idx-short", "labels-too-few"])
def test_corrupt_idx_exits_3_naming_the_file(tmp_path, digits_dir, name, data, reason):
    broken = tmp_path / "broken"
    corrupt_copy(digits_dir, broken, name, data)
    result = run_job(data_uri=str(broken), output_uri=str(tmp_path / "out"))
    assert_one_clear_error(result, 3, name.removesuffix(".gz"), reason)
    failure = next((tmp_path / "out").glob("*/failure.json"))  # the output was reachable: the reason is recorded
    assert '"exit_code": 3' in failure.read_text()


def test_unwritable_output_exits_4(s3, digits_dir):
    result = run_job(data_uri=str(digits_dir), output_uri="s3://no-such-output-bucket/runs")
    assert_one_clear_error(result, 4, "s3://no-such-output-bucket/runs")


def test_output_under_a_file_exits_4(tmp_path, digits_dir):
    (tmp_path / "file").write_text("x")
    result = run_job(data_uri=str(digits_dir), output_uri=str(tmp_path / "file" / "runs"))
    assert_one_clear_error(result, 4, "file/runs")


def test_a_class_without_training_examples_exits_3(tmp_path, digits_arrays):
    import stage_dataset

    labels = digits_arrays["train_labels"].copy()
    labels[0] = 200  # labels 0..9 and one 200: classes 10..199 would have no example
    stage_dataset.stage({**digits_arrays, "train_labels": labels}, str(tmp_path / "digits"))
    result = run_job(data_uri=str(tmp_path / "digits"), output_uri=str(tmp_path / "out"))
    assert_one_clear_error(result, 3, "train-labels-idx1-ubyte", "190 of them have no training example", "10, 11, 12")


def test_a_cache_dir_that_cannot_be_written_is_its_own_error(s3, tmp_path, digits_arrays):
    import stage_dataset

    (tmp_path / "file").write_text("x")  # a cache dir under a file cannot be created, even by root
    stage_dataset.stage(digits_arrays, "s3://data/digits")
    common = dict(data_uri="s3://data/digits", output_uri=str(tmp_path / "out"), cache_dir=str(tmp_path / "file" / "cache"))
    for args in (("--check",), ()):
        result = run_job(*args, **common)
        assert_one_clear_error(result, 4, f"JOB_CACHE_DIR={tmp_path / 'file' / 'cache'} is not writable")
        assert "credentials" not in result.stdout

"""A rerun of a completed run is answered from the run's records (checkpoints/latest.json and
summary.json) before any data is pulled, by the rule a resume applies (issue 24): the proof is a
rerun whose dataset is gone. A changed setting that a resume refuses, other data, or more epochs
still go the long way, as before."""

import json
import shutil

from conftest import DIGITS, read_history, run_job

from job.errors import DataError


def test_a_completed_run_is_answered_without_its_data(tmp_path, digits_dir):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path / "out"), epochs=2, **DIGITS)
    assert run_job(**settings).returncode == 0
    run_dir = next((tmp_path / "out").iterdir())  # the derived name: model-dataset-hash
    records = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "lease"}
    shutil.rmtree(digits_dir)  # nothing left to pull, list or scan at JOB_DATA_URI
    again = run_job(**settings)
    assert again.returncode == 0, again.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (f"is already complete: 2 epochs, best_val_accuracy={summary['best_val_accuracy']:.4f} "
            f"(epoch {summary['best_epoch']})") in again.stdout, again.stdout
    assert f"dataset {digits_dir}" not in again.stdout  # the line a read dataset gets
    assert {p: p.read_bytes() for p in records} == records  # nothing rewritten


def test_what_a_resume_would_refuse_or_train_is_not_answered_complete(tmp_path, digits_dir):
    common = dict(data_uri=str(digits_dir), output_uri=str(tmp_path / "out"), run_name="r", **DIGITS)
    assert run_job(epochs=1, **common).returncode == 0
    # a setting a resume refuses under the same run name: refused as before, not "complete"
    changed = run_job(epochs=1, **{**common, "hidden_sizes": "64"})
    assert changed.returncode == 3 and "JOB_HIDDEN_SIZES was" in changed.stdout, changed.stdout
    assert "already complete" not in changed.stdout
    # data at another URI: read, and its fingerprint compared with the run's, as before
    shutil.copytree(digits_dir, tmp_path / "copy")
    moved = run_job(epochs=1, **{**common, "data_uri": str(tmp_path / "copy")})
    assert moved.returncode == 3 and "the dataset changed" in moved.stdout, moved.stdout
    # more epochs: trained further
    further = run_job(epochs=2, **common)
    assert further.returncode == 0 and "already complete" not in further.stdout, further.stdout
    assert [row["epoch"] for row in read_history(tmp_path / "out" / "r")] == [1, 2]


def test_every_process_under_torchrun_gets_the_answer(tmp_path, digits_dir):
    from test_distributed import torchrun

    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path / "out"), run_name="r", epochs=1, **DIGITS)
    first = torchrun("--standalone", "--nproc-per-node=2", **settings)
    assert first.returncode == 0, first.stdout
    shutil.rmtree(digits_dir)
    again = torchrun("--standalone", "--nproc-per-node=2", **settings)
    assert again.returncode == 0 and again.stdout.count("is already complete: 1 epochs") == 1, again.stdout


def test_check_refuses_a_changed_model_under_the_same_run_name_as_the_run_does(tmp_path, digits_dir):
    """--check said "complete" for a run name whose checkpoint holds another model; the run refuses
    it with exit 3. Both now refuse it, with the same words and exit code."""
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", epochs=2, **DIGITS)
    assert run_job(**settings).returncode == 0
    same = run_job("--check", **settings)
    assert same.returncode == 0 and "r: complete (2 epochs)" in same.stdout, same.stdout
    changed = {**settings, "model": "cnn"}
    refusal = "does not fit these settings: JOB_MODEL was mlp, now cnn; use a new JOB_RUN_NAME"
    check, run = run_job("--check", **changed), run_job(**changed)
    for result in (check, run):
        assert result.returncode == DataError.exit_code and refusal in result.stdout, result.stdout[-3000:]
        assert "Traceback" not in result.stdout

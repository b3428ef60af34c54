"""MLflow gets a run's results, not only its epochs (issue 24): best_val_accuracy and best_epoch,
test_accuracy and test_loss as metrics, so runs sort by them. Through the real job, with an MLflow
store that really runs (SQLite), as tests/job/test_export.py does."""

import json

import pytest
from conftest import DIGITS, run_job


def mlflow_store(tmp_path, monkeypatch):
    """(a client, the experiment id) of a SQLite MLflow store the job logs to (through its environment)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "digits")
    client = MlflowClient(tracking_uri=uri)
    return client, client.create_experiment("digits", artifact_location=(tmp_path / "artifacts").as_uri())


def test_runs_sort_by_their_best_and_test_accuracy_in_mlflow(tmp_path, digits_dir, monkeypatch):
    client, experiment = mlflow_store(tmp_path, monkeypatch)
    summaries = {}
    for name, lr in (("slow", "0.0003"), ("fast", DIGITS["lr"])):
        result = run_job(data_uri=str(digits_dir), output_uri=str(tmp_path / "runs"), run_name=name, epochs=2,
                         **{**DIGITS, "lr": lr})
        assert result.returncode == 0, result.stdout
        summaries[name] = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
    for key in ("best_val_accuracy", "test_accuracy"):
        assert summaries["slow"][key] != summaries["fast"][key], key  # an order to find
        ranked = client.search_runs([experiment], order_by=[f"metrics.{key} DESC"])
        assert [r.info.run_name for r in ranked] == sorted(summaries, key=lambda n: -summaries[n][key])
    for run in client.search_runs([experiment]):
        summary = summaries[run.info.run_name]
        for key in ("best_val_accuracy", "best_epoch", "test_accuracy", "test_loss"):
            assert run.data.metrics[key] == pytest.approx(summary[key]), key
        [best] = client.get_metric_history(run.info.run_id, "best_val_accuracy")
        [test] = client.get_metric_history(run.info.run_id, "test_accuracy")
        assert best.step == summary["best_epoch"] and test.step == summary["test_epoch"] == 2


def test_a_rerun_of_a_completed_run_leaves_its_mlflow_run_finished(tmp_path, digits_dir, monkeypatch):
    client, experiment = mlflow_store(tmp_path, monkeypatch)
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path / "runs"), run_name="r", epochs=1, **DIGITS)
    assert run_job(**settings).returncode == 0
    (tmp_path / "runs" / "r" / "model" / "config.json").unlink()  # killed while exporting: the long way
    redone = run_job(**settings)
    assert redone.returncode == 0 and "exporting it" in redone.stdout, redone.stdout
    answered = run_job(**settings)  # from its records: the tracker is not even started
    assert answered.returncode == 0 and "already complete" in answered.stdout, answered.stdout
    assert "experiment tracking" not in answered.stdout
    [run] = client.search_runs([experiment])
    assert run.info.status == "FINISHED"

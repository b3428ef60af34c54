"""Settings: bad input is one clear line and exit 2; --help documents every setting."""

import os

import pytest

from conftest import ROOT, run_job
from job.errors import EXIT_CODES
from job.settings import Settings


@pytest.mark.parametrize("variable, value, expected", [
    ("JOB_EPOCHS", "-1", "greater than or equal to 1"),
    ("JOB_EPOCHS", "ten", "valid integer"),
    ("JOB_LR", "0", "greater than 0"),
    ("JOB_OPTIMIZER", "rmsprop", "'sgd', 'adam' or 'adamw'"),
    ("JOB_DATA_URI", "ftp://host/data", "accepted: a local path or file://, s3://"),
    ("JOB_DATA_URI", "s3:/bucket/data", "malformed URI"),
    ("JOB_OUTPUT_URI", "s3://", "needs a bucket name"),
    ("JOB_HIDDEN_SIZES", "256,x", "comma-separated integers"),
    ("JOB_DEVICE", "tpu", "auto, cpu, cuda, cuda:N"),
    ("JOB_VAL_FRACTION", "1.5", "less than 1"),
])
def test_bad_setting_exits_2_naming_variable_and_accepted_values(tmp_path, variable, value, expected):
    settings = {"data_uri": str(tmp_path), variable[4:].lower(): value}
    result = run_job(**settings)
    assert result.returncode == 2, result.stdout
    assert variable in result.stdout and expected in result.stdout
    assert "Traceback" not in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1


def test_unknown_variable_suggests_the_setting(tmp_path):
    result = run_job(data_uri=str(tmp_path), epocs="3")
    assert result.returncode == 2
    assert "JOB_EPOCS is not a setting; did you mean JOB_EPOCHS?" in result.stdout
    assert "Traceback" not in result.stdout


def test_missing_data_uri_is_named():
    result = run_job()
    assert result.returncode == 2
    assert "JOB_DATA_URI" in result.stdout and "is required" in result.stdout


def test_help_lists_every_setting_with_type_default_and_meaning():
    result = run_job("--help")
    assert result.returncode == 0
    for name, info in Settings.model_fields.items():
        line = next(l for l in result.stdout.splitlines() if l.strip().startswith(f"JOB_{name.upper()} "))
        assert "default" in line or "required" in line
        assert info.description in result.stdout
    assert "auto|mnist|imagefolder" in result.stdout


def test_unknown_argument_is_rejected():
    result = run_job("--epochs=3")
    assert result.returncode == 2 and "JOB_*" in result.stdout


def test_run_name_is_stable_and_depends_on_the_experiment(monkeypatch):
    monkeypatch.setenv("JOB_DATA_URI", "s3://bucket/mnist")
    first = Settings().run_name
    assert first.startswith("mlp-") and Settings().run_name == first
    monkeypatch.setenv("JOB_EPOCHS", "40")  # more epochs continue the same run under a step schedule
    assert Settings().run_name == first
    monkeypatch.setenv("JOB_LR", "0.1")
    assert Settings().run_name != first


def test_public_settings_hide_uri_passwords(monkeypatch):
    monkeypatch.setenv("JOB_DATA_URI", "s3://user:hunter2@bucket/data")
    assert "hunter2" not in str(Settings().public_dict())


def test_readme_documents_every_setting_and_exit_code():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for name in Settings.model_fields:
        assert f"| `JOB_{name.upper()}` |" in readme, name
    for code, (meaning, action) in EXIT_CODES.items():
        assert f"| {code} | {meaning} | {action} |" in readme, code

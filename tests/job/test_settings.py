"""Settings: bad input is one clear line and exit 2; --help documents every setting. (The run
name, redaction, docs/settings.md and the README's exit codes are checked in process:
tests/unit/test_settings_in_process.py.)"""

import pytest

from conftest import run_job
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
    # values that pass a naive check and then crash the run (issue 11)
    ("JOB_SEED", "18446744073709551615", "less than 4294967296"),
    ("JOB_STOP_GRACE_SECONDS", "inf", "finite number"),
    ("JOB_DIST_TIMEOUT_SECONDS", "inf", "finite number"),
    ("JOB_LR", "nan", "finite number"),
    ("JOB_HIDDEN_SIZES", "2000000000", "from 1 to 65536"),
    ("JOB_BATCH_SIZE", "10000000000", "less than or equal to 1000000"),
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


@pytest.mark.parametrize("variable, uri, secret", [
    ("JOB_DATA_URI", "s3://AKIAEXAMPLE:se/cret-Value9@data/mnist", "se/cret-Value9"),  # a secret holding '/'
    ("JOB_OUTPUT_URI", "memory://u:pa55-w0rd@x/y", "pa55-w0rd"),
    ("JOB_PRETRAINED", "s3://user:hunter2-x@bucket/w.pt", "hunter2-x"),
    ("JOB_DATA_URI", "http://user:pass-1234@host/x", "pass-1234"),  # an unsupported scheme is echoed masked
])
def test_credentials_in_a_uri_are_refused_and_never_shown(tmp_path, variable, uri, secret):
    result = run_job(**{"data_uri": str(tmp_path), variable[4:].lower(): uri})
    assert result.returncode == 2, result.stdout
    assert variable in result.stdout and "credentials in a URI are refused" in result.stdout
    assert "put them in the store's variables (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)" in result.stdout and secret not in result.stdout

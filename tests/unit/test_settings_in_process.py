"""Settings in process (no job to start): the run name, the redaction of credentials, and the
README's settings and exit-code tables against the code. The settings errors a user meets are
tested through the job in tests/job/test_settings.py."""

import os

from conftest import ROOT
from job.errors import EXIT_CODES
from job.settings import Settings, redact_text, redact_uri


def test_run_name_is_stable_and_depends_on_the_experiment(monkeypatch):
    monkeypatch.setenv("JOB_DATA_URI", "s3://bucket/mnist")
    first = Settings().run_name
    assert first.startswith("mlp-") and Settings().run_name == first
    monkeypatch.setenv("JOB_EPOCHS", "40")  # more epochs continue the same run under a step schedule
    assert Settings().run_name == first
    monkeypatch.setenv("JOB_LR", "0.1")
    assert Settings().run_name != first


def test_redaction_masks_uri_credentials_and_secret_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    assert redact_uri("s3://AKIA:se/cret@data/x") == "s3://***@data/x"
    assert redact_uri("s3://bucket/a@b/c") == "s3://bucket/a@b/c"  # an '@' in a key is not a credential
    text = redact_text("failed: memory://u:pw@x/y and key wJalrXUtnFEMI/K7MDENG")
    assert "pw@" not in text and "wJalrXUtnFEMI" not in text and "memory://***@x/y" in text


def test_readme_documents_every_setting_and_exit_code():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for name, info in Settings.model_fields.items():
        row = next((l for l in readme.splitlines() if l.startswith(f"| `JOB_{name.upper()}` |")), "")
        assert row.endswith(f"| {info.description} |"), name  # the table says what --help says
    for code, (meaning, action) in EXIT_CODES.items():
        assert f"| {code} | {meaning} | {action} |" in readme, code


def test_a_lower_case_setting_is_refused_not_read_over_the_upper_case_one(monkeypatch):
    """pydantic-settings reads variables case-blind: `job_epochs=1` beside `JOB_EPOCHS=40` trained
    one epoch without a word. Settings are upper case; any other spelling is an error naming both."""
    import pytest

    from job.errors import SettingsError
    from job.settings import load_settings

    monkeypatch.setenv("JOB_DATA_URI", "s3://bucket/mnist")
    monkeypatch.setenv("JOB_EPOCHS", "40")
    monkeypatch.setenv("job_epochs", "1")
    with pytest.raises(SettingsError, match=r"job_epochs is not a setting: settings are upper case \(JOB_EPOCHS\)"):
        load_settings()


def test_a_huge_setting_is_refused_at_once_in_a_short_line(monkeypatch):
    """A whole file pasted into a variable (120 KB) took ~100 s to be refused (the masking was
    quadratic) and then became a 120 KB log line."""
    import pytest

    from job.errors import SettingsError
    from job.settings import load_settings

    monkeypatch.setenv("JOB_DATA_URI", "s3://bucket/mnist")
    monkeypatch.setenv("JOB_RUN_NAME", "a" * 120_000)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "JOB_RUN_NAME=" in str(refused.value) and "(120,000 characters)" in str(refused.value)
    assert len(str(refused.value)) < 1000

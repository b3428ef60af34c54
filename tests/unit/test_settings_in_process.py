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

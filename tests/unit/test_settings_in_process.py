"""Settings in process (no job to start): the run name, the redaction of credentials, the
settings page (docs/settings.md) and the README's exit-code table against the code. The settings
errors a user meets are tested through the job in tests/job/test_settings.py."""

import os
import re

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


def test_the_settings_page_is_what_the_code_generates():
    """docs/settings.md's tables are written from Settings by scripts/settings_doc.py: a field
    added, renamed or redescribed without regenerating them fails here, with the command to run."""
    import settings_doc

    text = open(os.path.join(ROOT, "docs", "settings.md")).read()
    assert settings_doc.render(text) == text, f"docs/settings.md is out of date: run `{settings_doc.COMMAND}`"


def test_the_settings_page_shows_each_workloads_own_defaults(monkeypatch):
    """What a user reads as a setting's default is what the job takes for the MLP and for a
    torchvision model, resolved by Settings itself (not by the generator's logic), and the meaning
    is what --help says."""
    import re

    import settings_doc

    for name in [k for k in os.environ if k.upper().startswith("JOB_")]:
        monkeypatch.delenv(name)
    text = open(os.path.join(ROOT, "docs", "settings.md")).read()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0].startswith("`JOB_"):
            rows[cells[0].strip("`")] = cells
    assert set(rows) == {f"JOB_{name.upper()}" for name in Settings.model_fields}
    mlp, resnet = (Settings(data_uri="s3://b/flowers", model=model) for model in ("mlp", "resnet18"))
    for name, info in Settings.model_fields.items():
        _, _, shown, meaning = rows[f"JOB_{name.upper()}"]
        assert meaning == settings_doc.cell(info.description), name
        if name in ("data_uri", "model", "run_name", "num_workers", "threads"):
            continue  # given above, or derived at run time (the meaning says how)
        small, transfer = (f"`{settings_doc.as_env(getattr(s, name))}`" for s in (mlp, resnet))
        if small == transfer:
            assert shown.startswith(small) and "torchvision" not in shown, (name, shown)
        else:
            assert shown.startswith(f"{small} (`mlp`, `cnn`)") and f"{transfer} (torchvision models)" in shown, name


def test_the_readme_run_name_model_names_what_a_resume_refuses_and_takes():
    """The README's one account of runs lists, by hand, the settings a resume refuses under the
    same JOB_RUN_NAME and those it takes: the code's lists, not an older copy of them."""
    from job.checkpoint import FIXED_ON_RESUME, SCHEDULE_SETTINGS

    readme = open(os.path.join(ROOT, "README.md")).read()
    bullet = readme.split("- **Changed settings, same `JOB_RUN_NAME`.**", 1)[1].split("\n- ", 1)[0]
    refused, taken = (set(re.findall(r"`JOB_([A-Z_]+)`", part)) for part in bullet.split("Schedule settings", 1))
    assert refused == {f.upper() for f in FIXED_ON_RESUME}
    assert taken == {f.upper() for f in SCHEDULE_SETTINGS}


def test_readme_documents_every_exit_code():
    readme = open(os.path.join(ROOT, "README.md")).read()
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

"""Azure Blob in process: the URIs the job accepts and how Azure credentials are masked. (The job
on the emulator, through a real subprocess: tests/job/test_azure_store.py.)"""

import pytest
from azurite import KEY, connection_string

from job.errors import SettingsError
from job.settings import load_settings, redact_text, redact_uri


@pytest.mark.parametrize("uri", ["az://data/digits", "abfs://data/digits", "abfss://data/digits",
                                 "abfss://data@account.dfs.core.windows.net/digits"])
def test_azure_uris_are_accepted_as_written(monkeypatch, uri):
    monkeypatch.setenv("JOB_DATA_URI", uri)
    assert load_settings().data_uri == uri
    assert redact_uri(uri) == uri  # container@account names no credentials


@pytest.mark.parametrize("uri, message", [
    ("az://", "az:// needs a container name"),
    ("abfss://user:key@account.dfs.core.windows.net/x", "credentials in a URI are refused"),
])
def test_bad_azure_uris_are_one_line(monkeypatch, uri, message):
    monkeypatch.setenv("JOB_DATA_URI", uri)
    with pytest.raises(SettingsError, match=message) as refused:
        load_settings()
    assert "key@" not in str(refused.value)


def test_an_account_key_and_a_connection_string_are_masked_whole_and_in_part(monkeypatch):
    for name in ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    conn = connection_string("http://127.0.0.1:1")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", conn)
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "sv=2024&sig=s3cr3t-signature")
    text = redact_text(f"failed with {conn}; key {KEY}; sas sv=2024&sig=s3cr3t-signature")
    assert KEY not in text and "s3cr3t-signature" not in text and "AccountKey" not in text, text
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", KEY)
    assert redact_text(f"key {KEY}") == "key ***"

"""Azure Blob in process: the URIs the job accepts, how Azure credentials are masked, and storage's
Azure row on Azurite (exclusive creation and the lease, retries, refused and missing credentials).
(The job on the emulator, through a real subprocess: tests/job/test_object_stores.py.)"""

import sys
import threading

import pytest
from azurite import ACCOUNT, KEY, connection_string
from conftest import _free_port
from faultproxy import FaultProxy

from job import lease, storage
from job.azure_blob import AzureBlob
from job.errors import CredentialsError, DataError, OutputError, SettingsError, TransientStorageError
from job.settings import Settings, help_text, load_settings, redact_text, redact_uri


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


# --- the Azure row of storage.STORES, on Azurite ------------------------------------------------


@pytest.fixture
def configured(azure, monkeypatch):
    """storage at its defaults but for the given settings, and back as it was after the test."""
    monkeypatch.setattr(storage, "_config", storage.Config())

    def configure(**settings):
        storage.configure(Settings(data_uri="/x", **settings))

    return configure


def test_racing_creators_one_wins_and_the_lease_keeps_a_second_writer_out(configured):
    configured()
    uri = "az://out/race/000000000001.json"
    outcomes = []

    def create(i):
        try:
            storage.create_bytes(uri, str(i).encode())
            outcomes.append(i)
        except FileExistsError:
            outcomes.append(None)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i in outcomes if i is not None]
    assert len(outcomes) == 8 and len(winners) == 1  # If-None-Match: *, 409 for the 7 others
    assert storage.read_bytes(uri) == str(winners[0]).encode()

    first = lease.Lease("az://out/run", seconds=30)
    first.acquire()
    with pytest.raises(lease.LeaseLost, match="another job is writing"):
        lease.Lease("az://out/run", seconds=0.1).acquire()
    first.release()


def test_job_storage_retries_is_the_number_of_attempts(azure, configured, monkeypatch):
    """What JOB_STORAGE_RETRIES means on S3 (botocore's max_attempts) holds on Azure: adlfs's own
    client would make 4 attempts whatever the setting (fsspec/adlfs#502)."""
    azure.fs.pipe_file("data/x", b"x")
    proxy = FaultProxy(azure.endpoint, 1.0, faults=("internal",))
    try:
        for k, v in azure.env(proxy.url).items():
            monkeypatch.setenv(k, v)
        configured(storage_retries=3)
        with pytest.raises(Exception) as failed:
            storage.read_bytes("az://data/x")
    finally:
        proxy.close()
    assert proxy.counts["internal"] == 3 and proxy.counts["forwarded"] == 0, proxy.counts
    found = storage.classify(failed.value, "az://data/x", DataError, "read")
    assert isinstance(found, TransientStorageError) and "after retries" in str(found)  # exit 75


def test_a_refusal_and_missing_credentials_are_exit_2_naming_the_azure_variables(azure, configured, monkeypatch):
    configured()
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection_string(azure.endpoint, key=KEY[::-1]))
    AzureBlob.clear_instance_cache()  # as a new process: the variables are read when the filesystem is made
    with pytest.raises(Exception) as refused:
        storage.read_bytes("az://data/x")
    found = storage.classify(refused.value, "az://data/x", DataError, "read")
    assert isinstance(found, CredentialsError) and "refused our credentials" in str(found)
    assert "AZURE_STORAGE_CONNECTION_STRING" in str(found) and KEY[::-1] not in str(found)

    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")  # and no other AZURE_* (the fixture): nothing to try
    AzureBlob.clear_instance_cache()
    with pytest.raises(Exception) as missing:
        storage.read_bytes("az://data/x")
    found = storage.classify(missing.value, "az://data/x", DataError, "read")
    assert isinstance(found, CredentialsError) and "no credentials found" in str(found), found


def test_the_three_uri_forms_reach_the_same_blob(azure, configured):
    configured()
    storage.write_bytes("az://data/forms/x", b"same")
    for uri in ("abfs://data/forms/x", "abfss://data/forms/x", f"abfss://data@{ACCOUNT}.dfs.core.windows.net/forms/x"):
        assert storage.read_bytes(uri) == b"same", uri
    assert storage.list_names("abfs://data/forms") == ["x"]


def test_help_names_the_azure_variables():
    assert "AZURE_STORAGE_CONNECTION_STRING" in help_text() and "Workload Identity" in help_text()


def test_without_adlfs_an_azure_uri_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "adlfs", None)  # what `import adlfs` meets when not installed
    monkeypatch.delitem(sys.modules, "job.azure_blob", raising=False)
    with pytest.raises(SettingsError) as refused:
        storage.exists("az://data/x")
    assert refused.value.exit_code == 2 and "pip install 'trainjob[azure]'" in str(refused.value), refused.value


def test_a_missing_container_is_permanent_and_an_unreachable_store_transient(azure, configured, monkeypatch):
    configured(storage_retries=1)
    with pytest.raises(Exception) as missing:
        storage.write_bytes("az://nocontainer/x", b"x")
    found = storage.classify(missing.value, "az://nocontainer/x", OutputError, "write")
    assert isinstance(found, OutputError) and found.exit_code == 4, found  # a rerun cannot create it
    assert "az://nocontainer/x" in str(found) and "container does not exist" in str(found), found

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection_string(f"http://127.0.0.1:{_free_port()}"))
    AzureBlob.clear_instance_cache()
    with pytest.raises(Exception) as unreachable:  # nothing listens there: connection refused
        storage.read_bytes("az://data/x")
    found = storage.classify(unreachable.value, "az://data/x", DataError, "read")
    assert isinstance(found, TransientStorageError) and found.exit_code == 75, found

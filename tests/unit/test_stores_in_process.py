"""The per-protocol table (job.storage.STORES): every store the settings accept can hold the run's
lease, and a store that cannot, or whose library is missing, is refused in one line (exit 2)
rather than run unguarded. memory:// stands in for an object store."""

import dataclasses
import os
import sys
import uuid

import pytest

from job import lease, storage
from job.errors import CredentialsError, DataError, SettingsError, TransientStorageError
from job.settings import URI_SCHEMES


def test_every_scheme_the_settings_accept_has_a_store_that_can_create_if_absent():
    for scheme in URI_SCHEMES:
        row = storage.STORES.get(scheme)
        assert row is not None and row.create is not None, scheme


def test_a_store_that_cannot_create_if_absent_is_refused_by_the_lease(monkeypatch):
    monkeypatch.setitem(storage.STORES, "memory", dataclasses.replace(storage.STORES["memory"], create=None))
    run = f"memory://out/{uuid.uuid4().hex}"
    with pytest.raises(SettingsError) as refused:
        lease.Lease(run, seconds=30).acquire()
    message = str(refused.value)
    assert refused.value.exit_code == 2
    assert "memory cannot create an object only if it is absent" in message and "\n" not in message
    assert storage.list_names(storage.join(run, "lease")) == []  # nothing written, no writer let in


def test_a_store_whose_library_is_missing_names_the_extra_to_install(monkeypatch):
    for module in ("gcsfs", "gcsfs.core"):
        monkeypatch.setitem(sys.modules, module, None)  # what `import gcsfs` meets when not installed
    with pytest.raises(SettingsError) as refused:
        storage.exists("gs://bucket/data")
    assert refused.value.exit_code == 2 and "pip install 'trainjob[gcs]'" in str(refused.value), refused.value


def test_a_gcs_key_the_identity_provider_refuses_is_exit_2_not_a_retry_for_ever():
    """gcsfs retries every RefreshError; a revoked or invalid service-account key (invalid_grant,
    which google-auth marks not retryable) was exit 75, so the scheduler retried it without end."""
    from google.auth.exceptions import RefreshError

    refused = storage.classify(RefreshError("invalid_grant: Invalid JWT Signature.", retryable=False),
                               "gs://data/digits", DataError, "read")
    assert isinstance(refused, CredentialsError) and "GOOGLE_APPLICATION_CREDENTIALS" in str(refused)
    passing = storage.classify(RefreshError("temporarily unavailable", retryable=True), "gs://data/digits", DataError,
                               "read")
    assert isinstance(passing, TransientStorageError)


def test_an_azure_uri_with_no_account_anywhere_is_exit_2_wherever_its_filesystem_is_made(monkeypatch):
    """adlfs refuses to make a filesystem with no account: outside storage.errors (prepare's check
    of its destination, predict's output check) that was a ValueError and exit 1 with a traceback."""
    for name in [n for n in os.environ if n.startswith("AZURE_")]:
        monkeypatch.delenv(name)
    with pytest.raises(CredentialsError, match="az://c/p: no credentials found .*AZURE_STORAGE_CONNECTION_STRING"):
        storage.is_local("az://c/p")

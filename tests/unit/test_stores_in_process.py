"""The per-protocol table (job.storage.STORES): every store the settings accept can hold the run's
lease, and a store that cannot, or whose library is missing, is refused in one line (exit 2)
rather than run unguarded. memory:// stands in for an object store."""

import dataclasses
import sys
import uuid

import pytest

from job import lease, storage
from job.errors import SettingsError
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

"""GCS for the tests: gcp-storage-emulator (PyPI, in the test extra) in its own process on
loopback, reached by gcsfs through STORAGE_EMULATOR_HOST with anonymous credentials, as a user
points the job at an emulator. Registered as fixtures from tests/conftest.py.

What the emulator lacks that GCS has (each probed, see tests/job/test_object_stores.py): it ignores
preconditions (`ifGenerationMatch=0`: a second create overwrites), accepts any credentials or
none, and never answers 5xx; the tests put tests/faultproxy.py in front of it for those."""

import json
import sys
import urllib.request

import pytest
from conftest import ObjectStore, _free_port, start_server

# GCS's answers to callers it does not let in (cloud.google.com/storage/docs/json_api/v1/status-codes):
# 401 to an anonymous caller (gcsfs goes anonymous when it finds no credentials), 403 to an identity
# without the role
REFUSALS = {
    401: "Anonymous caller does not have storage.objects.list access to the Google Cloud Storage bucket.",
    403: "trainjob@example.iam.gserviceaccount.com does not have storage.objects.create access to the bucket.",
}


@pytest.fixture(scope="session")
def gcs_server():
    """The emulator's URL. Missing, it fails the session's GCS tests (never a skip): the test
    extra installs it, so a machine without it was not set up by scripts/setup-venv.sh."""
    try:
        import gcp_storage_emulator  # noqa: F401
    except ImportError:
        pytest.fail("gcp-storage-emulator is not installed: run scripts/setup-venv.sh test (trainjob[test] has it)")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                         "--port", str(port), "--in-memory", "--quiet"], endpoint + "/", "gcp-storage-emulator")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """An emptied emulator with buckets data and out, and this process and the job pointed at it
    (the job inherits the environment: tests/conftest.py's job_env)."""
    import fsspec.config
    import gcsfs.core

    def env(endpoint: str) -> dict:
        return {"STORAGE_EMULATOR_HOST": endpoint}

    urllib.request.urlopen(gcs_server + "/wipe", timeout=120)
    for k, v in env(gcs_server).items():
        monkeypatch.setenv(k, v)
    # gcsfs finds no credentials here and tries, in turn, gcloud's, a cache and the metadata
    # server before going anonymous; the emulator wants none. FSSPEC_GS_TOKEN reaches the job
    # (fsspec reads it at import), the config entry this process, whose fsspec is imported.
    monkeypatch.setenv("FSSPEC_GS_TOKEN", "anon")
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    fs = gcsfs.core.GCSFileSystem(token="anon", use_listings_cache=False)
    fs.mkdir("data")
    fs.mkdir("out")
    refusals = {status: (json.dumps({"error": {"code": status, "message": message}}).encode(),
                         {"Content-Type": "application/json"}) for status, message in REFUSALS.items()}
    # no secrets: gcsfs is anonymous on the emulator
    yield ObjectStore("gcs", "gs://", gcs_server, env, fs, "GOOGLE_APPLICATION_CREDENTIALS", refusals)
    gcsfs.core.GCSFileSystem.clear_instance_cache()

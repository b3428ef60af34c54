"""GCS for the tests: gcp-storage-emulator (PyPI, in the test extra) in its own process on
loopback, reached by gcsfs through STORAGE_EMULATOR_HOST with anonymous credentials, as a user
points the job at an emulator. Registered as fixtures from tests/conftest.py.

What the emulator lacks that GCS has (each probed, see tests/job/test_gcs_store.py): it ignores
preconditions (`ifGenerationMatch=0`: a second create overwrites), accepts any credentials or
none, and never answers 5xx; the tests put tests/faultproxy.py in front of it for those."""

import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass
class Bucket:
    """An object store under test, as a store-generic test needs it: buckets `data` and `out`,
    a filesystem on it for this process, and how to put a proxy between it and the job."""

    scheme: str  # "gs://"
    fs: Any  # an fsspec filesystem on the store, to stage inputs and read results back
    endpoint: str  # the server's URL, what a FaultProxy forwards to
    endpoint_variable: str  # the environment variable that points the job's client at an endpoint

    def uri(self, path: str) -> str:
        return self.scheme + path


@pytest.fixture(scope="session")
def gcs_server():
    """The emulator's URL. Missing, it fails the session's GCS tests (never a skip): the test
    extra installs it, so a machine without it was not set up by scripts/setup-venv.sh."""
    try:
        import gcp_storage_emulator  # noqa: F401
    except ImportError:
        pytest.fail("gcp-storage-emulator is not installed: run scripts/setup-venv.sh test (trainjob[test] has it)")
    from conftest import _free_port  # here, not at the top: conftest imports this module

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120  # a hang guard: it starts in about a second here
    while True:
        try:
            urllib.request.urlopen(endpoint + "/", timeout=10)  # the emulator's health check
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"gcp-storage-emulator did not start (exit {proc.poll()})") from None
            time.sleep(0.1)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """An emptied emulator with buckets data and out, and this process and the job pointed at it
    (the job inherits the environment: tests/conftest.py's job_env)."""
    import fsspec.config
    import gcsfs.core

    urllib.request.urlopen(gcs_server + "/wipe", timeout=120)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    # gcsfs finds no credentials here and tries, in turn, gcloud's, a cache and the metadata
    # server before going anonymous; the emulator wants none. FSSPEC_GS_TOKEN reaches the job
    # (fsspec reads it at import), the config entry this process, whose fsspec is imported.
    monkeypatch.setenv("FSSPEC_GS_TOKEN", "anon")
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    fs = gcsfs.core.GCSFileSystem(token="anon", use_listings_cache=False)
    fs.mkdir("data")
    fs.mkdir("out")
    yield Bucket("gs://", fs, gcs_server, "STORAGE_EMULATOR_HOST")
    gcsfs.core.GCSFileSystem.clear_instance_cache()

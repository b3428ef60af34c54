"""Azurite, Microsoft's Azure Blob Storage emulator, in its own process on loopback (as the S3 tests
run moto), and a clean store for each test: the fixtures `azurite_server` and `azure`.

scripts/test.sh installs Azurite (scripts/setup-azurite.sh, Node.js from npm) into .cache/azurite;
AZURITE_BLOB names another azurite-blob. Missing, the tests that need it skip, except in CI
(CI=true), where they fail: a green CI must have run them."""

import base64
import os
import shutil
import tempfile

import pytest
from conftest import ROOT, SECRET, ObjectStore, _free_port, start_server

ACCOUNT = "trainjob"
# The account's key as the job gets it: the test secret in base64 (a Shared Key is base64), so a
# test can prove that neither form ever reaches a log or an output.
KEY = base64.b64encode(SECRET.encode()).decode()
CONTAINERS = ("data", "out")  # as the S3 tests' buckets


def _refusal(code: str, message: str) -> tuple[bytes, dict]:
    """An answer of the service's in its own form: the code in the XML body and in x-ms-error-code."""
    body = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return body.encode(), {"Content-Type": "application/xml", "x-ms-error-code": code}


# The service's answers to callers it does not let in (learn.microsoft.com/rest/api/storageservices/
# common-rest-api-error-codes), which Azurite, on a Shared Key, cannot give: 401 to a token Entra ID
# issued that has expired (Workload Identity), 403 to an identity without a role on the container
REFUSALS = {
    401: _refusal("InvalidAuthenticationInfo", "Server failed to authenticate the request. Please refer to the "
                  "information in the www-authenticate header."),
    403: _refusal("AuthorizationPermissionMismatch", "This request is not authorized to perform this operation "
                  "using this permission."),
}


def connection_string(endpoint: str, key: str = KEY) -> str:
    """What AZURE_STORAGE_CONNECTION_STRING holds to reach the emulator (or a proxy in front of it):
    adlfs reads an endpoint other than <account>.blob.core.windows.net only from a connection string."""
    return f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};BlobEndpoint={endpoint}/{ACCOUNT};"


def _azurite_blob() -> str:
    found = os.environ.get("AZURITE_BLOB") or shutil.which(
        "azurite-blob", path=os.path.join(ROOT, ".cache", "azurite", "node_modules", ".bin")) or shutil.which(
        "azurite-blob")
    if not found:
        message = "Azurite is not installed: run scripts/setup-azurite.sh (scripts/test.sh does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def azurite_server():
    """azurite-blob in memory on a free loopback port with one account, ours; yields the endpoint."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    workdir = tempfile.mkdtemp(prefix="trainjob-azurite-")  # its debug and lock files, if any
    proc = start_server(
        [_azurite_blob(), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
         "--extentMemoryLimit", "1024",  # MB: the default, half the machine's memory, is not ours to take
         "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent"],  # telemetry: no traffic out
        f"{endpoint}/{ACCOUNT}?comp=list", "Azurite",
        env={**os.environ, "AZURITE_ACCOUNTS": f"{ACCOUNT}:{KEY}"}, cwd=workdir)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=60)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def azure(azurite_server, monkeypatch):
    """A clean store for one test: the containers data and out, empty, and this process (and so
    the jobs it starts) pointed at the emulator through AZURE_STORAGE_CONNECTION_STRING."""
    from job.azure_blob import AzureBlob

    def env(endpoint: str) -> dict:
        return {"AZURE_STORAGE_CONNECTION_STRING": connection_string(endpoint)}

    for name in [k for k in os.environ if k.startswith("AZURE_")]:
        monkeypatch.delenv(name)  # nothing from the machine may decide which account the job reaches
    for k, v in env(azurite_server).items():
        monkeypatch.setenv(k, v)
    AzureBlob.clear_instance_cache()  # a filesystem made for another test's variables
    # no listings cache: a test reads back what the job changed after it listed (the lease, say).
    # Without it adlfs 2026.8 cannot list the containers (it reads them back from that cache), so
    # ours are emptied by name: the suite makes no others
    fs = AzureBlob(connection_string=connection_string(azurite_server), skip_instance_cache=True,
                   use_listings_cache=False)
    for container in CONTAINERS:
        if fs.exists(container):
            fs.rm(container, recursive=True)
        fs.mkdir(container)
    yield ObjectStore("azure", "az://", azurite_server, env, fs, "AZURE_STORAGE_CONNECTION_STRING", REFUSALS,
                      secrets=(SECRET, KEY))
    AzureBlob.clear_instance_cache()

"""Azurite, Microsoft's Azure Blob Storage emulator, in its own process on loopback (as the S3 tests
run moto), and a clean store for each test: the fixtures `azurite_server` and `azure`.

scripts/test.sh installs Azurite (scripts/setup-azurite.sh, Node.js from npm) into .cache/azurite;
AZURITE_BLOB names another azurite-blob. Missing, the tests that need it skip, except in CI
(CI=true), where they fail: a green CI must have run them."""

import base64
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from conftest import ROOT, SECRET, _free_port, start_server

ACCOUNT = "trainjob"
# The account's key as the job gets it: the test secret in base64 (a Shared Key is base64), so a
# test can prove that neither form ever reaches a log or an output.
KEY = base64.b64encode(SECRET.encode()).decode()
CONTAINERS = ("data", "out")  # as the S3 tests' buckets


def connection_string(endpoint: str, key: str = KEY) -> str:
    """What AZURE_STORAGE_CONNECTION_STRING holds to reach the emulator (or a proxy in front of it):
    adlfs reads an endpoint other than <account>.blob.core.windows.net only from a connection string."""
    return f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};BlobEndpoint={endpoint}/{ACCOUNT};"


@dataclass
class ObjectStore:
    """What a store-generic test needs: where to write, how to point the job at the store (or at a
    FaultProxy in front of it), and a filesystem for reading results back."""

    name: str
    prefix: str  # "az://": a container follows
    endpoint: str  # the emulator's URL, for a FaultProxy to forward to
    env: Callable[[str], dict]  # the variables that point a client at an endpoint (the emulator, a proxy)
    fs: Any  # an fsspec filesystem on the emulator: paths are "<container>/<key>"

    def uri(self, path: str) -> str:
        return self.prefix + path


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
    fs = AzureBlob(connection_string=connection_string(azurite_server), skip_instance_cache=True)
    for container in fs.ls("", detail=False):
        fs.rm(container, recursive=True)
    for container in CONTAINERS:
        fs.mkdir(container)
    yield ObjectStore("Azure Blob", "az://", azurite_server, env, fs)
    AzureBlob.clear_instance_cache()

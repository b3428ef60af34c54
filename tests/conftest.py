"""Shared fixtures: a real S3-compatible server (moto, its own process on loopback), staged
datasets, and a helper that runs the job as a real subprocess with real environment variables.

No test bets on the machine's speed. Where time is the product's promise (a stop within the grace
period, no log silence longer than the interval, a storage time bound), the slack beyond it is a
multiple of time_unit(), measured in the same test; every other timeout is a hang guard, generous
enough for a machine ten times slower than ours under load, never the assertion."""

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import stage_dataset  # noqa: E402

SHARED_MNIST = os.path.join(ROOT, "..", "shared", "data", "mnist-t10k")
# Deliberately recognisable so tests can prove it never leaks into logs or outputs.
SECRET = "tEsT-sEcReT-9f8e7d6c5b4a"
CACHE_DIR = tempfile.mkdtemp(prefix="trainjob-test-cache-")
atexit.register(shutil.rmtree, CACHE_DIR, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], url: str, what: str, **popen) -> subprocess.Popen:
    """Start a test server in its own process and return once `url` answers, whatever its status
    (an emulator answers an unsigned request with 403: it is up)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    deadline = time.monotonic() + 120  # a hang guard: importing moto takes seconds on a loaded machine
    while True:
        try:
            urllib.request.urlopen(url, timeout=10)
            return proc
        except urllib.error.HTTPError:
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{what} did not start (exit {proc.poll()})") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode, as s3fs's own test suite runs it; yields the endpoint URL."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                        endpoint + "/moto-api/", "moto server")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=60)


def fresh_bucket(s3_server: str, monkeypatch):
    """Reset the S3 server, point this process's s3fs at it (the AWS variables set through
    `monkeypatch`) and make the buckets data and out. Returns (s3fs filesystem, AWS variables)."""
    import s3fs

    urllib.request.urlopen(urllib.request.Request(s3_server + "/moto-api/reset", method="POST"), timeout=120)
    aws = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing-key-id",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in aws.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(use_listings_cache=False)
    fs.mkdir("data")
    fs.mkdir("out")
    return fs, aws


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A clean S3 server for one test, with this process's s3fs pointed at it. Yields an
    s3fs filesystem for reading results back and a dict of the AWS variables the job gets."""
    import s3fs

    fs, fs.aws_env = fresh_bucket(s3_server, monkeypatch)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


@dataclass
class ObjectStore:
    """An object store's emulator as a store-generic test needs it (tests/job/test_object_stores.py;
    the fixtures `gcs` and `azure` give one): the buckets or containers data and out, a filesystem on
    it for this process, how to point the job at it or at a FaultProxy in front of it, and what the
    real service answers a caller it refuses."""

    name: str  # "gcs", "azure": the parametrized tests' ids
    prefix: str  # "gs://", "az://": a bucket or container follows
    endpoint: str  # the emulator's URL, for a FaultProxy to forward to
    env: Callable[[str], dict]  # the variables that point a client at an endpoint (the emulator, a proxy)
    fs: Any  # an fsspec filesystem on the emulator: paths are "<bucket>/<key>"
    credentials_variable: str  # where the job's credentials come from: the fix its refusal names
    # the service's own answers (body, headers) to a caller with no valid credentials (401) and to
    # one without the role (403), for a FaultProxy to give: an emulator may accept anyone
    refusals: dict[int, tuple[bytes, dict]]
    secrets: tuple[str, ...] = field(default=())  # what the job is given that no log or output may show

    def uri(self, path: str) -> str:
        return self.prefix + path


@pytest.fixture(scope="session")
def digits_arrays():
    return stage_dataset.digits()


@pytest.fixture
def digits_dir(tmp_path, digits_arrays):
    """scikit-learn's real handwritten digits as gzipped MNIST IDX files in a local folder."""
    path = tmp_path / "digits"
    stage_dataset.stage(digits_arrays, str(path))
    return path


def job_env(**settings) -> dict:
    """The parent environment without JOB_* variables, plus the given settings as JOB_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOB_")}
    env.setdefault("JOB_THREADS", "1")
    env.setdefault("JOB_CACHE_DIR", CACHE_DIR)  # never the machine's shared /tmp/trainjob-cache
    # Checkpoint every epoch: the tests' epochs last milliseconds, and kills and signals must land
    # between checkpoints (the default, one per 30 s, is tested in test_end_to_end).
    env.setdefault("JOB_CHECKPOINT_MIN_SECONDS", "0")
    # The model export without its ONNX form: tracing a model for ONNX costs ~2 s a run; the
    # default (onnx) is tested where the exported model is the point (test_export, end to end).
    env.setdefault("JOB_EXPORT", "safetensors")
    env.update({f"JOB_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def run_job(*args, timeout=600, **settings) -> subprocess.CompletedProcess:
    """`python -m job` as a real subprocess; output is captured as text (stdout + stderr).
    `timeout` is a hang guard, not an assertion: the longest run takes ~30 s here."""
    return subprocess.run([sys.executable, "-m", "job", *args], env=job_env(**settings), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def start_job(*args, **settings) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "job", *args], env=job_env(**settings), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The job's one ERROR line, what the person on call reads; there is no traceback."""
    errors = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in result.stdout, result.stdout[-3000:]
    return errors[0]


# A recipe that learns scikit-learn's small digits set in a few epochs (the MNIST recipe's lr 0.5
# takes ~10 epochs there); tests use it to keep runs short.
DIGITS = {"optimizer": "adam", "lr": "0.01"}

METRICS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


def metrics(history: list[dict]) -> list[dict]:
    """The reproducible part of a history (timings differ from run to run)."""
    return [{k: row[k] for k in METRICS} for row in history]


def assert_same_history(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(metrics(a), metrics(b), strict=True):
        for k in METRICS:
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra["epoch"], k, ra[k], rb[k])


def reference_history(root, arrays: dict, **recipe) -> list[dict]:
    """The history of an uninterrupted run of `recipe` on `arrays`, staged and written under the
    local folder `root`: what an interrupted and resumed, or a faulty store's, run must equal."""
    stage_dataset.stage(arrays, str(root / "digits"))
    result = run_job(data_uri=str(root / "digits"), output_uri=str(root / "runs"), run_name="ref", **recipe)
    assert result.returncode == 0, result.stdout
    return read_history(root / "runs" / "ref")


def corrupt_copy(src_dir, dst_dir, name: str, data: bytes) -> None:
    """Copy a staged dataset folder, replacing one file's bytes."""
    shutil.copytree(src_dir, dst_dir)
    with open(os.path.join(dst_dir, name), "wb") as f:
        f.write(data)


def read_history(run) -> list[dict]:
    """A run's history.jsonl as rows ([] while there is none): `run` is a local run directory, or
    (fs, "bucket/run") for one in the S3 server."""
    if isinstance(run, tuple):
        fs, path = run
        text = fs.cat_file(f"{path}/history.jsonl").decode() if fs.exists(f"{path}/history.jsonl") else ""
    else:
        path = os.path.join(str(run), "history.jsonl")
        text = open(path).read() if os.path.exists(path) else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def time_unit() -> float:
    """Seconds a bare `python -c "import torch"` takes on this machine right now: the yardstick for
    every time slack in the tests. Call it just before the timed part: a loaded or slower machine
    stretches it as it stretches the job's own start, work and exit (~1.7 s on our 2 idle cores)."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, capture_output=True, timeout=600)
    seconds = time.monotonic() - start
    print(f"time unit: {seconds:.2f} s")  # in the report of a test that fails
    return seconds


def wait_for(condition, proc=None, timeout: float = 300, what: str = "the condition"):
    """Poll `condition()` until it is true; fail if `proc` ends first or after `timeout` seconds
    (a hang guard: the condition is what the test waits for, not how fast it comes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def sigterm(proc, timeout: float = 300) -> tuple[str, float]:
    """SIGTERM the job; (its output, seconds from the signal to its exit)."""
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=timeout)[0]
    return out, time.monotonic() - signalled


def stop_within_grace(proc, grace: float, unit: float) -> str:
    """SIGTERM the job and check it ends within its grace period plus two time units (its last
    line, then the interpreter's exit: each less than a unit, starting Python and importing torch,
    on any machine; `unit` is measured again now and the larger kept). Returns its output."""
    unit = max(unit, time_unit())
    out, took = sigterm(proc)
    assert took < grace + 2 * unit, (took, grace, unit)
    return out


def wait_for_epochs(run, n: int, proc=None, timeout: float = 300) -> None:
    wait_for(lambda: len(read_history(run)) >= n, proc, timeout, f"{n} epochs in the history")


def assert_sigterm_interrupts_a_slow_pull(proxy, data_uri: str, tmp_path) -> None:
    """Start the job on `data_uri`, reached through `proxy`, which delays every request (by 3 time
    units or more), SIGTERM it in the pull's first request and check that it exits 143 at once.
    The pull (a listing, then the files) takes at least two delays and the signal lands in the
    first, so a job waiting for the pull would take another whole delay; its exit takes less than a
    unit. The output location is local: the first request to the store is the pull's."""
    proc = start_job(data_uri=data_uri, output_uri=str(tmp_path), run_name="r", cache_dir=str(tmp_path / "cache"))
    wait_for(lambda: proxy.counts["delayed"] > 0, proc, what="the pull's first request at the slow store")
    out, took = sigterm(proc)
    assert proc.returncode == 143, out
    # interrupted, not after the pull finished: sooner than the rest of the pull, and the job never
    # said what it read (its next line after the pull) nor fetched a file into its cache
    assert took < proxy.delay_seconds, (took, proxy.delay_seconds)
    assert " INFO dataset " not in out and not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()], out
    assert "stopped by signal 15" in out and "Traceback" not in out
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "stopped"
    assert not (tmp_path / "r" / "checkpoints").exists()  # nothing trained, nothing to save


def cpu_ticks(pid: int) -> tuple[int, str]:
    """(user + system clock ticks of the whole process, the state of its main thread) from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, utime 14, stime 15
    return int(fields[11]) + int(fields[12]), fields[0]


def wait_until_idle(proc, seconds: float, timeout: float = 300, what: str = "the job waiting") -> None:
    """Wait until the job has used no CPU at all for `seconds`, its main thread asleep at every look:
    it is blocked (on a frozen store, a download), not working. A working process gets the CPU many
    times a second even on a machine loaded 10 times over, so this is an observation, not a bet."""
    deadline = time.monotonic() + timeout
    since, ticks = time.monotonic(), None
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        now_ticks, state = cpu_ticks(proc.pid)
        if now_ticks != ticks or state != "S":
            since, ticks = time.monotonic(), now_ticks
        elif time.monotonic() - since >= seconds:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)


def idx_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


# the object stores' emulators and a clean store each (they use the helpers above)
from azurite import azure, azurite_server  # noqa: E402, F401
from gcs_emulator import gcs, gcs_server  # noqa: E402, F401

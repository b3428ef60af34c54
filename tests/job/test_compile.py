"""JOB_COMPILE on the CPU through the real job (issue 23): Inductor's CPU backend trains as eager
does, under torchrun too, compiles one graph and never recompiles (the epoch's last, partial
batch runs eagerly), saves the run's compile cache, and a new pod resuming the run loads it;
where compiling cannot work (no compiler, a noexec cache) the job says so up front with exit 2;
under the feature cache it does not compile.

Compiling costs tens of seconds on 2 cores: two compiled runs in all (the first of two processes)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import DIGITS, ROOT, job_env, read_history, run_job
from test_distributed import torchrun
from test_transfer import RECIPE, make_tree, weights_file

# Inductor's fused kernels sum in another order than eager's: measured on the digits run, losses
# agree to ~2e-7 relative and accuracies exactly; the bounds leave room for other CPUs' vector units.
LOSS_REL = 1e-4
ACCURACY_ABS = 0.01  # a few of the 287 validation samples


@pytest.fixture(autouse=True)
def caches_not_set(monkeypatch):
    """As a user starts the job: importing torchvision (test_transfer does) sets
    TORCHINDUCTOR_CACHE_DIR in this process to /tmp/torchinductor_<user>, and the job would take
    it for the user's choice."""
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)


def _settings_record(run_dir) -> dict:
    with open(os.path.join(run_dir, "settings.json")) as f:
        return json.load(f)


def test_a_compiled_run_under_torchrun_trains_as_eager_and_a_new_pod_resumes_it_with_its_compile_cache(
        tmp_path, digits_dir, monkeypatch):
    """Two processes train 2 epochs, then one process resumes for a third: eagerly, and compiled
    (the resume in a new pod: an empty JOB_CACHE_DIR, the run's compile cache: JOB_COMPILE_CACHE=run)."""
    common = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), **DIGITS)
    eager = [torchrun("--nproc-per-node", "2", run_name="eager", epochs=2, **common),
             run_job(run_name="eager", epochs=3, **common)]
    for result in eager:
        assert result.returncode == 0, result.stdout
    assert not _settings_record(tmp_path / "eager")["compile"]

    monkeypatch.setenv("TORCH_LOGS", "recompiles")  # Dynamo logs each recompile and its cause
    cold = torchrun("--nproc-per-node", "2", run_name="compiled", epochs=2, compile="true", compile_cache="run",
                    cache_dir=str(tmp_path / "pod1"), **common)
    assert cold.returncode == 0, cold.stdout
    assert "mixed precision off (JOB_AMP=auto), compile on (Inductor" in cold.stdout
    # one graph and no recompile in two epochs: the last, partial batch of each runs eagerly
    # (and a graph at all: torch.compile of the DDP-wrapped model compiled none)
    assert "Recompiling function" not in cold.stdout, cold.stdout
    assert "compile: 1 graph(s) compiled in" in cold.stdout
    record = _settings_record(tmp_path / "compiled")
    assert (record["amp"], record["compile"], record["compile_skipped"]) == ("off", True, None)
    assert os.path.getsize(tmp_path / "compiled" / "compile" / "cache.bin") > 0
    assert os.listdir(tmp_path / "pod1" / "compile" / "inductor")  # the caches are under JOB_CACHE_DIR

    warm = run_job(run_name="compiled", epochs=3, compile="true", compile_cache="run", cache_dir=str(tmp_path / "pod2"),
                   **common)
    assert warm.returncode == 0, warm.stdout
    assert "compiled artifacts loaded from" in warm.stdout and "(warm: the run's compile cache loaded)" in warm.stdout
    assert "Traceback" not in cold.stdout + warm.stdout

    compiled = read_history(tmp_path / "compiled")
    for a, b in zip(read_history(tmp_path / "eager"), compiled, strict=True):
        assert a["epoch"] == b["epoch"]
        for k in ("train_loss", "val_loss"):
            assert b[k] == pytest.approx(a[k], rel=LOSS_REL), (a["epoch"], k)
        for k in ("train_accuracy", "val_accuracy"):
            assert b[k] == pytest.approx(a[k], abs=ACCURACY_ABS), (a["epoch"], k)
    assert len(compiled) == 3


@pytest.mark.parametrize("without", ["CXX", "PATH"])
def test_compile_without_a_compiler_is_exit_2_before_any_work(tmp_path, digits_dir, monkeypatch, without):
    """Inductor's CPU backend takes $CXX, else g++ from PATH: either way, a missing one is named."""
    if without == "CXX":
        monkeypatch.setenv("CXX", str(tmp_path / "missing" / "g++"))
        named = f"CXX={tmp_path / 'missing' / 'g++'} is not found"
    else:
        os.makedirs(tmp_path / "bin")
        monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # the job starts by sys.executable's full path
        named = "g++ is not on PATH"
    result = run_job(data_uri=str(digits_dir), output_uri=str(tmp_path / "out"), compile="true", **DIGITS)
    assert result.returncode == 2, result.stdout
    errors = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "JOB_COMPILE=true: Inductor's CPU backend needs a C++ compiler" in errors[0], errors
    assert named in errors[0] and "JOB_COMPILE=false" in errors[0]
    assert "Traceback" not in result.stdout and "images for training" not in result.stdout  # no data read


def test_a_compile_cache_on_a_noexec_mount_is_exit_2(tmp_path, digits_dir):
    """Docker's --tmpfs mounts noexec by default: compiled kernels could not be loaded from there.
    A user and mount namespace gives this test such a mount without privileges."""
    cache = tmp_path / "cache"
    os.makedirs(cache)
    mount = 'mount -t tmpfs -o noexec none "$0" && exec "$@"'
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, str(cache), "true"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode:
        pytest.skip(f"this machine cannot make a noexec mount without privileges: {probe.stderr.strip()[:200]}")
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, str(cache), sys.executable, "-m", "job"],
        env=job_env(data_uri=str(digits_dir), output_uri=str(tmp_path / "out"), compile="true",
                    cache_dir=str(cache), **DIGITS),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert result.returncode == 2, result.stdout
    assert f"the compile cache {cache}/compile/inductor (TORCHINDUCTOR_CACHE_DIR) is on a noexec mount" in result.stdout
    assert "Traceback" not in result.stdout


def test_compile_is_skipped_under_the_feature_cache_and_says_why(tmp_path):
    """Under the feature cache only the Linear head trains: compiling it costs more than it saves."""
    make_tree(str(tmp_path / "data"), per_class=4, bad=False)
    result = run_job(data_uri=str(tmp_path / "data"), output_uri=str(tmp_path / "out"), run_name="r",
                     pretrained=weights_file(str(tmp_path / "w.pt")), cache_dir=str(tmp_path / "cache"), compile="true",
                     **{**RECIPE, "epochs": 1})
    assert result.returncode == 0, result.stdout
    assert "compile skipped: under the feature cache only the Linear head trains" in result.stdout
    record = _settings_record(tmp_path / "out" / "r")
    assert record["compile"] is False and record["compile_skipped"].startswith("under the feature cache")
    assert not os.path.exists(tmp_path / "out" / "r" / "compile")

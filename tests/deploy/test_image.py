"""The images built and run for real: docker/Dockerfile.cpu built with the real engine through
scripts/smoke-docker.sh, every container run with docs/deploy.md's exact `docker run` flags (read-only
root, tmpfs /tmp and /cache, non-root, the stop timeout) against the suite's moto S3 server on the
host, and the GPU Dockerfile's build with a CUDA torch and with a CPU-only one.

Needs a Docker engine. CI prepares one (.ci/prepare-docker.sh: Debian's docker.io, a stand-in base
image and a wheelhouse, as there is no registry) and sets TRAINJOB_IMAGE_TEST=required, so there a
missing engine fails; elsewhere the module skips at once and says why. Build inputs come from
TRAINJOB_IMAGE_BASE (the PYTHON_IMAGE build arg) and TRAINJOB_IMAGE_WHEELHOUSE (a PEP 503 wheel
folder served on 127.0.0.1 as TORCH_INDEX_URL), or where they are unset from the file
.ci/prepare-docker.sh leaves on the machine; with neither, the Dockerfiles' defaults are used.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from types import SimpleNamespace

import pytest

from conftest import DIGITS, ROOT, SECRET, fresh_bucket
from docs_docker import documented_run_flags

BUILD_TIMEOUT = 1800  # a cold build on 2 cores took ~3 minutes; a slow disk or PyPI gets more room
RUN_TIMEOUT = 300
WHEEL_PORT = 3141  # fixed, so TORCH_INDEX_URL (part of the build cache key) is the same every run
LABEL = "org.opencontainers.image.title=trainjob"
EPOCHS_TO_STOP = 30  # ~0.5 s each with 1024-wide layers: long enough to be stopped mid-run


def engine_problem() -> str | None:
    if not shutil.which("docker"):
        return "there is no docker command on this machine"
    try:
        result = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                                capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer `docker version` within 30 s"
    if result.returncode:
        return "no Docker engine answers: " + (result.stderr.strip().splitlines() or ["?"])[-1]
    return None


@pytest.fixture(scope="module", autouse=True)
def engine():
    problem = engine_problem()
    if problem:
        why = f"{problem}; the image test needs one (as root, .ci/prepare-docker.sh installs and starts it)"
        if os.environ.get("TRAINJOB_IMAGE_TEST") == "required":
            pytest.fail(why + " and TRAINJOB_IMAGE_TEST=required")
        pytest.skip(why)


def wait_for_url(url: str, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.1)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def serve(directory: str, port: int = 0):
    """A PEP 503 index over `directory` on 127.0.0.1 (http.server, as INFRA.md does it)."""
    if not port or not port_is_free(port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                             "--directory", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/simple"
    wait_for_url(url + "/", proc, f"the wheel index over {directory}")
    return proc, url


def prepared_machine() -> dict:
    """The variables .ci/prepare-docker.sh printed on this machine, if it ran here."""
    path = os.path.join(os.environ.get("TRAINJOB_CI_CACHE", "/var/cache/trainjob-ci"), "image-test.env")
    if not os.path.exists(path):
        return {}
    lines = open(path).read().split("\n")
    return dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))


@pytest.fixture(scope="module")
def build_args():
    """Build arguments for this machine: the stand-in base and the local wheel index, if given."""
    config = {**prepared_machine(), **{k: v for k, v in os.environ.items() if k.startswith("TRAINJOB_IMAGE_")}}
    args, server = {}, None
    if config.get("TRAINJOB_IMAGE_BASE"):
        args["PYTHON_IMAGE"] = config["TRAINJOB_IMAGE_BASE"]
    if config.get("TRAINJOB_IMAGE_WHEELHOUSE"):
        server, args["TORCH_INDEX_URL"] = serve(config["TRAINJOB_IMAGE_WHEELHOUSE"], WHEEL_PORT)
    yield args
    if server:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def bucket(s3_server):
    """The suite's moto server, reset once for this module, with s3://data/digits staged and an
    empty s3://out. `env` holds the AWS variables the containers get."""
    import s3fs
    import stage_dataset

    with pytest.MonkeyPatch.context() as mp:
        fs, env = fresh_bucket(s3_server, mp)
        stage_dataset.stage(stage_dataset.digits(), "s3://data/digits")
        yield SimpleNamespace(fs=fs, env=env)
        s3fs.S3FileSystem.clear_instance_cache()


def job_env(bucket, **settings) -> dict:
    env = {**bucket.env, "JOB_DATA_URI": "s3://data/digits", "JOB_OUTPUT_URI": "s3://out"}
    env.update({f"JOB_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def host_env(env: dict) -> dict:
    """This process's environment without JOB_*/AWS_* (so nothing leaks in by accident), plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JOB_", "AWS_"))}
    return {**base, **env}


def smoke_docker(*args, build_args: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    """scripts/smoke-docker.sh with `args`, the build arguments and --network host (for a wheel
    index and the moto server on 127.0.0.1)."""
    options = [o for name, value in build_args.items() for o in ("--build-arg", f"{name}={value}")]
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "smoke-docker.sh"), *args, "--network", "host", *options],
                          env=host_env(env or {}), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=BUILD_TIMEOUT)


def run_command(image: str, env: dict, *job_args, name: str | None = None, user: str | None = None,
                extra: tuple[str, ...] = ()) -> list[str]:
    """The documented `docker run`, plus --network host to reach moto on 127.0.0.1. Variables are
    passed by name (-e NAME), as the docs do for credentials."""
    cmd = ["docker", "run", *documented_run_flags(), "--network", "host", *extra]
    cmd += ["--name", name] if name else []
    cmd += ["--user", user] if user else []
    for k in env:
        cmd += ["-e", k]
    return [*cmd, image, *job_args]


def docker_run(image: str, env: dict, *job_args, user: str | None = None,
               extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(run_command(image, env, *job_args, user=user, extra=extra), env=host_env(env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=RUN_TIMEOUT)


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def tidy_images(result: subprocess.CompletedProcess, image: str) -> None:
    """Keep the build cache, drop what a rebuild replaced. Rebuilding a tag leaves the previous
    image dangling (~6 GB): remove ours by their label. The legacy builder leaves the build stage
    untagged: tag it `<image>-build` (so it stays as the cache of the torch install) and remove the
    one it replaces (~130 MB of the app install per change of the sources)."""
    subprocess.run(["docker", "image", "prune", "-f", "--filter", f"label={LABEL}"], capture_output=True, timeout=300)
    stages = re.split(r"^Step \d+/\d+ : FROM ", result.stdout, flags=re.M)
    ids = re.findall(r"^ ---> ([0-9a-f]{12})$", stages[1], re.M) if len(stages) == 3 else []
    if not ids:  # BuildKit keeps its cache apart from images
        return
    old = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", f"{image}-build"], capture_output=True, text=True)
    subprocess.run(["docker", "tag", ids[-1], f"{image}-build"], capture_output=True, timeout=60)
    if old.returncode == 0 and not old.stdout.strip().removeprefix("sha256:").startswith(ids[-1]):
        subprocess.run(["docker", "rmi", old.stdout.strip()], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def cpu_image(build_args, bucket):
    """scripts/smoke-docker.sh: builds the CPU image from the real Dockerfile, then runs its smoke
    mode in a container as docs/deploy.md shows. Returns the image and the script's result."""
    image = "trainjob:test-cpu"
    result = smoke_docker("--tag", image, build_args=build_args, env=job_env(bucket, run_name="smoke-docker"))
    assert_built(result, image)
    tidy_images(result, image)
    return SimpleNamespace(image=image, smoke=result)


def assert_built(result: subprocess.CompletedProcess, image: str) -> None:
    if f"smoke-docker.sh: built {image}" in result.stdout:
        return
    hint = ""
    if not any(a.startswith("PYTHON_IMAGE=") for a in result.args):
        hint = ("\n(With no registry access, build from a stand-in base and local wheels: run "
                "`bash .ci/prepare-docker.sh` once on this machine, as .ci/run does.)")
    pytest.fail(f"scripts/smoke-docker.sh did not build {image}:\n{tail(result.stdout)}{hint}")


def read_json(fs, path: str) -> dict:
    return json.loads(fs.cat(path))


def read_history(fs, run: str) -> list[dict]:
    try:
        return [json.loads(line) for line in fs.cat(f"out/{run}/history.jsonl").decode().splitlines()]
    except FileNotFoundError:
        return []


def test_smoke_docker_script_builds_the_image_and_its_smoke_run_passes(cpu_image, bucket):
    assert cpu_image.smoke.returncode == 0, tail(cpu_image.smoke.stdout)
    summary = read_json(bucket.fs, "out/smoke-docker/smoke/summary.json")
    assert summary["status"] == "completed"
    assert bucket.fs.exists("out/smoke-docker/smoke/checkpoints/latest.json")


def test_help_lists_the_settings(cpu_image, bucket):
    result = docker_run(cpu_image.image, {}, "--help")
    assert result.returncode == 0, result.stdout
    assert "JOB_DATA_URI" in result.stdout and "JOB_CACHE_DIR" in result.stdout


def test_check_passes_against_the_bucket(cpu_image, bucket):
    result = docker_run(cpu_image.image, job_env(bucket, run_name="check"), "--check")
    assert result.returncode == 0, result.stdout


def test_two_epochs_write_every_output_to_the_bucket(cpu_image, bucket):
    result = docker_run(cpu_image.image, job_env(bucket, run_name="two", epochs=2, **DIGITS))
    assert result.returncode == 0, tail(result.stdout)
    fs, run = bucket.fs, "out/two"
    for name in ("settings.json", "history.jsonl", "summary.json", "checkpoints/latest.json",
                 "checkpoints/last.pt", "checkpoints/best.pt", "plots/accuracy.png", "plots/loss.png"):
        assert fs.exists(f"{run}/{name}"), f"{run}/{name} is missing"
    assert [row["epoch"] for row in read_history(fs, "two")] == [1, 2]
    summary = read_json(fs, f"{run}/summary.json")
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    latest = read_json(fs, f"{run}/checkpoints/latest.json")
    assert fs.exists(f"{run}/checkpoints/{latest['file']}")
    assert SECRET not in result.stdout


def test_a_compiled_run_in_the_container_with_a_cpu_limit_trains_as_eager(cpu_image, bucket):
    """JOB_COMPILE=true in the image with the documented flags (Inductor compiles C++ into the exec
    tmpfs cache) under `--cpus 1`: the job sizes itself to the quota and learns what eager learns."""
    runs = {}
    for name, compiled in (("eager-1cpu", "false"), ("compiled-1cpu", "true")):
        result = docker_run(cpu_image.image, job_env(bucket, run_name=name, epochs=2, compile=compiled, **DIGITS),
                            extra=("--cpus", "1"))
        assert result.returncode == 0, tail(result.stdout)
        assert "(cgroup CPU quota 1, affinity" in result.stdout, tail(result.stdout)
        runs[name] = read_history(bucket.fs, name)
    assert "compile: 1 graph(s) compiled in" in result.stdout, tail(result.stdout)
    for eager, compiled in zip(runs["eager-1cpu"], runs["compiled-1cpu"], strict=True):
        assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)
        assert compiled["val_accuracy"] == pytest.approx(eager["val_accuracy"], abs=0.01)


def test_any_uid_can_write_cache_and_tmp_openshift_style(cpu_image, bucket):
    # OpenShift runs images as an arbitrary uid in group 0; the s3:// dataset goes to /cache.
    result = docker_run(cpu_image.image, job_env(bucket, run_name="uid", epochs=1, **DIGITS), user="12345:0")
    assert result.returncode == 0, tail(result.stdout)
    assert read_json(bucket.fs, "out/uid/summary.json")["status"] == "completed"


@pytest.fixture(scope="module")
def stopped(cpu_image, bucket, tmp_path_factory):
    """A run stopped with `docker stop` once its first epoch is in the bucket (the documented stop
    timeout applies), with the processes seen inside the container while it ran."""
    # a checkpoint (and history) every epoch, so the stop lands between published epochs
    env = job_env(bucket, run_name="stop", epochs=EPOCHS_TO_STOP, hidden_sizes="1024,1024", checkpoint_min_seconds=0, **DIGITS)
    name = f"trainjob-test-{uuid.uuid4().hex[:8]}"
    log = tmp_path_factory.mktemp("stop") / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(run_command(cpu_image.image, env, name=name), env=host_env(env),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + RUN_TIMEOUT
        while not read_history(bucket.fs, "stop"):
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before its first epoch:\n{log.read_text()}"
            assert time.time() < deadline, f"no epoch in the bucket after {RUN_TIMEOUT} s:\n{log.read_text()}"
            time.sleep(0.2)
        ps = subprocess.run(["docker", "exec", name, "python", "-c", LIST_PROCESSES],
                            capture_output=True, text=True, timeout=60)
        subprocess.run(["docker", "stop", name], capture_output=True, timeout=RUN_TIMEOUT)
        proc.wait(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
            proc.kill()
    return SimpleNamespace(code=proc.returncode, log=log.read_text(), env=env, ps=ps,
                           history=read_history(bucket.fs, "stop"))


LIST_PROCESSES = """
import json, os
procs = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
        cmd = open(f"/proc/{pid}/cmdline").read().split("\\0")[:-1]
    except OSError:
        continue
    procs.append({"pid": int(pid), "ppid": int(status["PPid"]), "uid": int(status["Uid"].split()[0]), "cmd": cmd})
print(json.dumps(procs))
"""


def test_the_job_runs_as_uid_10001_under_tini_as_pid_1(stopped):
    assert stopped.ps.returncode == 0, stopped.ps.stderr
    procs = {p["pid"]: p for p in json.loads(stopped.ps.stdout)}
    assert procs[1]["cmd"] == ["/usr/bin/tini", "--", "python", "-m", "job"] and procs[1]["uid"] == 10001
    job = [p for p in procs.values() if p["cmd"] == ["python", "-m", "job"]]
    assert len(job) == 1 and job[0]["ppid"] == 1 and job[0]["uid"] == 10001


def test_docker_stop_mid_run_saves_a_checkpoint_and_exits_143(stopped, bucket):
    assert stopped.code == 143, tail(stopped.log)
    assert 1 <= len(stopped.history) < EPOCHS_TO_STOP
    summary = read_json(bucket.fs, "out/stop/summary.json")
    assert summary["status"] == "stopped" and summary["exit_code"] == 143
    assert read_json(bucket.fs, "out/stop/checkpoints/latest.json")["global_step"] > 0


def test_a_rerun_resumes_from_the_stop_checkpoint(stopped, cpu_image, bucket):
    result = docker_run(cpu_image.image, stopped.env)
    assert result.returncode == 0, tail(result.stdout)
    assert "resumed from checkpoint" in result.stdout
    history = read_history(bucket.fs, "stop")
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS_TO_STOP + 1))
    # The epochs before the stop are the stopped run's rows, timings and all: continued, not redone.
    assert history[:len(stopped.history)] == stopped.history
    assert read_json(bucket.fs, "out/stop/summary.json")["status"] == "completed"


# What JOB_COMPILE needs, as the docs run the image: a C and a C++ compiler (Triton's launcher,
# Inductor's CPU code, with OpenMP), Python's headers, and /tmp and /cache mounted exec, so a module
# compiled there can be loaded: built against Python.h into each and imported, as the two do.
COMPILE_TOOLS = r"""
set -eu
gcc --version | head -1
g++ --version | head -1
include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
test -f "$include/Python.h"
cat > /tmp/built.c <<'C'
#include <Python.h>
static struct PyModuleDef built = {PyModuleDef_HEAD_INIT, "built", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_built(void) { return PyModule_Create(&built); }
C
for dir in /tmp /cache; do
  gcc -shared -fPIC -I"$include" /tmp/built.c -o "$dir/built.so"
  python -c "import sys; sys.path.insert(0, sys.argv[1]); import built; print('imported', built.__file__)" "$dir"
done
printf '#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n' > /tmp/omp.cpp
g++ -fopenmp /tmp/omp.cpp -o /tmp/omp && /tmp/omp && echo openmp
"""


def compile_tools(image: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "run", *documented_run_flags(), "--entrypoint", "sh", image, "-c", COMPILE_TOOLS],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=RUN_TIMEOUT)


def assert_compile_tools_work(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, tail(result.stdout)
    assert "imported /tmp/built.so" in result.stdout and "imported /cache/built.so" in result.stdout, result.stdout
    assert result.stdout.startswith("gcc ") and "openmp" in result.stdout, result.stdout


def test_the_image_compiles_and_loads_modules_in_tmp_and_cache_with_the_documented_flags(cpu_image):
    assert_compile_tools_work(compile_tools(cpu_image.image))


# --- the GPU Dockerfile, without a GPU -----------------------------------------------------------

def test_gpu_image_builds_with_the_cuda_wheel_and_runs_on_cpu(cpu_image, build_args, bucket):
    image = "trainjob:test-gpu"
    result = smoke_docker("--gpu", "--build-only", "--tag", image, build_args=build_args)
    assert result.returncode == 0, tail(result.stdout)
    assert_built(result, image)
    tidy_images(result, image)
    # No GPU here: the image sets JOB_DEVICE=cuda, so it refuses to train on the CPU (exit 2) ...
    refused = docker_run(image, job_env(bucket, run_name="gpu-image-no-gpu", smoke="true"))
    assert refused.returncode == 2 and "JOB_DEVICE=cuda" in refused.stdout, tail(refused.stdout)
    assert "JOB_DEVICE=cpu" in refused.stdout.strip().splitlines()[-1], tail(refused.stdout)
    # ... and trains there when asked to (smoke mode, the documented flags without --gpus).
    smoke = docker_run(image, job_env(bucket, run_name="gpu-image-on-cpu", smoke="true", device="cpu"))
    assert smoke.returncode == 0, tail(smoke.stdout)
    assert_compile_tools_work(compile_tools(image))


def fake_wheel(folder, name: str, version: str, files: dict[str, str]) -> None:
    """A minimal pure-Python wheel (PEP 427) named like the real one, in a PEP 503 layout."""
    dist = f"{name}-{version}.dist-info"
    files = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: trainjob-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"])
    filename = f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(folder / filename, "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)
    (folder / "simple" / name).mkdir(parents=True)
    (folder / "simple" / name / "index.html").write_text(f'<a href="../../{filename}">{filename}</a>\n')


def test_gpu_build_refuses_a_cpu_only_torch(cpu_image, build_args, tmp_path):
    # A stand-in CPU-only torch: what the build checks is torch.version.cuda, None in every CPU
    # wheel. (The only real CPU wheel on our machines, torch 2.13.0+cpu, has no torchvision to match.)
    fake_wheel(tmp_path, "torch", "2.14.1+cpu", {"torch/__init__.py": "__version__ = '2.14.1+cpu'\nfrom torch import version\n",
                                                "torch/version.py": "cuda = None\n"})
    fake_wheel(tmp_path, "torchvision", "0.29.1+cpu", {"torchvision/__init__.py": "__version__ = '0.29.1+cpu'\n"})
    server, url = serve(str(tmp_path))
    try:
        result = smoke_docker("--gpu", "--build-only", "--tag", "trainjob:test-gpu-cpu-torch",
                              build_args={**build_args, "TORCH_INDEX_URL": url})
    finally:
        server.terminate()
        server.wait(timeout=10)
    # The layers built before the refusal are this test's alone (its index URL is new each run).
    built = re.findall(r"^ ---> ([0-9a-f]{12})$", result.stdout, re.M)
    if built:
        subprocess.run(["docker", "rmi", built[-1]], capture_output=True, timeout=120)
    assert result.returncode != 0, tail(result.stdout)
    assert "torch 2.14.1+cpu is a CPU-only build" in result.stdout, tail(result.stdout)
    assert subprocess.run(["docker", "image", "inspect", "trainjob:test-gpu-cpu-torch"], capture_output=True).returncode

"""Images and manifests, validated offline: kustomize renders every overlay, the rendered objects
pass the Kubernetes schemas, hadolint, actionlint and shellcheck pass, and the policies that matter
hold. (tests/test_image.py builds and runs the images for real.)"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from job.errors import EXIT_CODES
from job.settings import Settings, load_settings
from readme_docker import docker_run_flags, option, readme_run_flags

OVERLAYS = ("cpu", "gpu", "multinode")
DOCKERFILES = ("docker/Dockerfile.cpu", "docker/Dockerfile.gpu")
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed: cannot render the kustomize overlays")
    out = {}
    for overlay in OVERLAYS:
        result = subprocess.run(["kubectl", "kustomize", os.path.join(ROOT, "k8s", "overlays", overlay)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        path = tmp_path_factory.mktemp("rendered") / f"{overlay}.yaml"
        path.write_text(result.stdout)
        out[overlay] = [d for d in yaml.safe_load_all(result.stdout) if d]
        out[overlay + ":path"] = str(path)
    return out


def kind(docs, k):
    found = [d for d in docs if d["kind"] == k]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def container(docs):
    return kind(docs, "Job")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_pass_the_kubernetes_schemas(rendered, overlay):
    result = subprocess.run([os.path.join(BIN, "kubernetes-validate"), "--strict", "-k", "1.31.0",
                             rendered[overlay + ":path"]], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([os.path.join(BIN, "hadolint"), os.path.join(ROOT, dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_run_the_job_as_non_root_under_tini(dockerfile):
    text = open(os.path.join(ROOT, dockerfile)).read()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+\.\d+-slim-bookworm@sha256:[0-9a-f]{64}$", text, re.M)
    assert ":latest" not in text
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m", "job"]' in text
    assert re.search(r"^USER 10001", text, re.M)
    assert "PYTHONUNBUFFERED=1" in text and "JOB_CACHE_DIR=/cache" in text
    if dockerfile.endswith("gpu"):
        assert "NVIDIA_VISIBLE_DEVICES=all" in text and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text
        assert "torch.version.cuda" in text  # the build refuses a CPU-only torch


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_pins_cannot_rot_silently(dockerfile):
    """The base by digest (above); Debian packages pinned to an upstream version with any Debian
    revision (`tini=0.19.0-1*`), or not at all: the archive keeps only the newest build of a
    version, so an exact pin breaks at the next binNMU."""
    text = re.sub(r"\\\n\s*", " ", open(os.path.join(ROOT, dockerfile)).read())
    installs = [line.split("apt-get install", 1)[1].split("&&")[0] for line in text.splitlines() if "apt-get install" in line]
    assert installs
    for package in (word for words in installs for word in shlex.split(words) if not word.startswith("-")):
        assert "=" not in package or package.endswith("*"), f"{package}: pin the upstream version with a trailing *"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_cache_and_tmp_are_writable_by_any_uid(dockerfile):
    """runc gives a tmpfs mounted over a directory that directory's mode (not its owner), so the
    README's `--tmpfs /cache` is writable by an arbitrary uid only if the image's /cache is 1777."""
    text = open(os.path.join(ROOT, dockerfile)).read()
    assert "mkdir -p /cache && chmod 1777 /cache" in text
    assert "HOME=/tmp" in text and "TMPDIR=/tmp" in text


def test_readme_docker_run_uses_a_read_only_root_and_outlasts_the_stop_grace():
    flags = readme_run_flags()
    pairs = set(zip(flags, flags[1:]))
    assert "--read-only" in flags and {("--tmpfs", "/tmp"), ("--tmpfs", "/cache")} <= pairs
    assert float(option(flags, "--stop-timeout")) >= Settings.model_fields["stop_grace_seconds"].default + 10


def test_smoke_docker_script_and_example_workflow_run_the_readme_flags():
    script = open(os.path.join(ROOT, "scripts", "smoke-docker.sh")).read()
    assert shlex.split(re.search(r"^run_flags=\((.*)\)$", script, re.M).group(1)) == readme_run_flags()
    workflow, _ = docker_run_flags(open(os.path.join(ROOT, ".github", "workflows", "smoke.yml")).read())
    assert option(workflow, "--network") == "host"  # the S3 server listens on the runner's 127.0.0.1
    workflow.remove("--network")
    workflow.remove("host")
    assert workflow == readme_run_flags()


def test_workflows_pass_actionlint():
    workflows = glob.glob(os.path.join(ROOT, ".github", "workflows", "*.yml"))
    assert workflows
    result = subprocess.run([os.path.join(BIN, "actionlint"), "-shellcheck", os.path.join(BIN, "shellcheck"),
                             "-pyflakes=", *workflows], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_pass_shellcheck():
    scripts = glob.glob(os.path.join(ROOT, "scripts", "*.sh")) + glob.glob(os.path.join(ROOT, ".ci", "*"))
    result = subprocess.run([os.path.join(BIN, "shellcheck"), *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(rendered, overlay):
    spec = kind(rendered[overlay], "Job")["spec"]["template"]["spec"]
    c = container(rendered[overlay])
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/cache", "/dev/shm"} <= mounts  # writable paths under a read-only root
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert c["resources"]["requests"] and c["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_failure_policy_matches_the_exit_code_table(rendered, overlay):
    job = kind(rendered[overlay], "Job")["spec"]
    fail_at_once = sorted(code for code, (_, action) in EXIT_CODES.items() if action == "fail at once")
    rules = job["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert len(fail) == 1 and sorted(fail[0]["onExitCodes"]["values"]) == fail_at_once
    assert fail[0]["onExitCodes"]["containerName"] == container(rendered[overlay])["name"]
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert ignore[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert job[key] > 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_holds_valid_settings_and_the_grace_period_fits(rendered, overlay, monkeypatch):
    data = kind(rendered[overlay], "ConfigMap")["data"]
    assert data and all(k.startswith("JOB_") for k in data)
    for k in list(os.environ):
        if k.startswith("JOB_"):
            monkeypatch.delenv(k)
    for k, v in data.items():
        monkeypatch.setenv(k, v)
    settings = load_settings()  # the job's own validation: unknown names and bad values fail here
    grace = kind(rendered[overlay], "Job")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.stop_grace_seconds
    env_from = container(rendered[overlay])["envFrom"]
    assert {"secretRef": {"name": "trainjob-s3", "optional": True}} in env_from  # referenced, not committed
    assert not [d for d in rendered[overlay] if d["kind"] == "Secret"]


def test_gpu_overlay_requests_a_gpu_and_cpu_does_not(rendered):
    gpu, cpu = container(rendered["gpu"]), container(rendered["cpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in str(cpu["resources"])
    assert gpu["image"].endswith("-gpu") and cpu["image"].endswith("-cpu")
    tolerations = kind(rendered["gpu"], "Job")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_multinode_is_an_indexed_job_wired_to_its_rendezvous(rendered):
    docs = rendered["multinode"]
    job = kind(docs, "Job")["spec"]
    env = {e["name"]: e["value"] for e in container(docs)["env"]}
    assert job["completionMode"] == "Indexed"
    assert int(env["PET_NNODES"]) == job["completions"] == job["parallelism"]
    service = kind(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert job["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    host, port = env["PET_RDZV_ENDPOINT"].split(":")
    assert host == f"{kind(docs, 'Job')['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert container(docs)["command"][:3] == ["/usr/bin/tini", "--", "torchrun"]
    assert env["PET_RDZV_BACKEND"] == "c10d"

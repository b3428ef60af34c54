"""Images and manifests, validated offline: kustomize renders every overlay, the rendered objects
pass the Kubernetes schemas (built-in kinds) and the pinned CRD schemas of JobSet, Kubeflow
Trainer and Kueue (tests/deploy/data/crds), hadolint, actionlint and shellcheck pass, and the policies
that matter hold: the failure policies act on the job's exit codes as the exit-code table says.
(tests/deploy/test_image.py builds and runs the images for real.)"""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from job.errors import EXIT_CODES, CredentialsError
from job.settings import Settings, load_settings
from docs_docker import docker_run_flags, documented_run_flags, option, section

JOB_OVERLAYS = ("cpu", "gpu", "multinode")  # a batch/v1 Job
OVERLAYS = (*JOB_OVERLAYS, "jobset", "trainjob")
DOCKERFILES = ("docker/Dockerfile.cpu", "docker/Dockerfile.gpu")
BIN = os.path.dirname(sys.executable)
LAUNCHER = ["/usr/bin/tini", "--", "python", "-m", "job.launch"]
KUEUE_EXAMPLE = os.path.join(ROOT, "k8s", "components", "kueue", "localqueue.yaml")
SECRET = "trainjob-s3"  # the credentials Secret docs/deploy.md has you create: referenced, never rendered
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")  # the keys docs/deploy.md names

# apiVersion and kind -> the CRD schema they are validated against (tests/deploy/data/crds/README.md: sources)
CRD_SCHEMAS = {
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset.x-k8s.io_jobsets_v1alpha2.json",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs_v1alpha1.json",
    ("kueue.x-k8s.io/v1beta2", "LocalQueue"): "kueue.x-k8s.io_localqueues_v1beta2.json",
}


def kustomize(path) -> str:
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed: cannot render the kustomize overlays")
    out = {}
    for overlay in OVERLAYS:
        text = kustomize(os.path.join(ROOT, "k8s", "overlays", overlay))
        path = tmp_path_factory.mktemp("rendered") / f"{overlay}.yaml"
        path.write_text(text)
        out[overlay] = [d for d in yaml.safe_load_all(text) if d]
        out[overlay + ":path"] = str(path)
    return out


def kind(docs, k):
    found = [d for d in docs if d["kind"] == k]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def workload(docs) -> dict:
    """The object a scheduler runs: the Job, the JobSet or the TrainJob."""
    (found,) = [d for d in docs if d["kind"] in ("Job", "JobSet", "TrainJob")]
    return found


def job_spec(docs) -> dict:
    """The spec of the Job the pods belong to: the Job's, or the JobSet's replicated Job's."""
    w = workload(docs)
    return w["spec"] if w["kind"] == "Job" else w["spec"]["replicatedJobs"][0]["template"]["spec"]


def pod_spec(docs) -> dict:
    return job_spec(docs)["template"]["spec"]


def container(docs):
    return pod_spec(docs)["containers"][0]


def is_built_in(doc) -> bool:
    return "." not in doc["apiVersion"].split("/")[0] or doc["apiVersion"].startswith("batch/")


def kubernetes_validate(path) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "kubernetes-validate"), "--strict", "-k", "1.31.0", str(path)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_pass_the_kubernetes_schemas(rendered, overlay, tmp_path):
    """Built-in kinds against the Kubernetes schemas, and a JobSet's child Job as the batch/v1 Job
    the JobSet controller creates from it; custom resources are the next test's."""
    docs = [d for d in rendered[overlay] if is_built_in(d)]
    docs += [{"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{d['metadata']['name']}-{r['name']}-0"},
              "spec": r["template"]["spec"]} for d in rendered[overlay] if d["kind"] == "JobSet" for r in d["spec"]["replicatedJobs"]]
    assert all(is_built_in(d) or (d["apiVersion"], d["kind"]) in CRD_SCHEMAS for d in rendered[overlay])
    path = tmp_path / "built-in.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = kubernetes_validate(path)
    assert result.returncode == 0 and "Couldn't find schema" not in result.stdout + result.stderr, result.stdout + result.stderr


def strict(schema: dict, api_version: str, kind_: str) -> dict:
    """A CRD's schema as `kubectl apply` enforces it: the API server drops the fields a structural
    schema does not name and kubectl's default field validation (Strict) refuses them, so an object
    schema that names its properties gets additionalProperties: false (unless the CRD keeps
    unknown fields there). Not through anyOf/allOf/oneOf/not, whose branches name only some
    properties. apiVersion and kind must be the ones this schema is for."""
    def close(s):
        if isinstance(s, dict):
            if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
                s["additionalProperties"] = False
            for sub in s.get("properties", {}).values():
                close(sub)
            for key in ("items", "additionalProperties"):
                close(s.get(key))
        return s

    schema = close(json.loads(json.dumps(schema)))
    schema["properties"]["apiVersion"]["const"] = api_version
    schema["properties"]["kind"]["const"] = kind_
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return schema


def check_jsonschema(docs: list[dict], tmp_path, key: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    """check-jsonschema against the strict CRD schema for `key` (apiVersion, kind): the objects' own."""
    if key is None:
        (key,) = {(d["apiVersion"], d["kind"]) for d in docs}
    schema = json.load(open(os.path.join(ROOT, "tests", "deploy", "data", "crds", CRD_SCHEMAS[key])))
    schema_path = tmp_path / "schema.json"
    schema_path.write_text(json.dumps(strict(schema, *key)))
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"object-{i}.json")
        paths[-1].write_text(json.dumps(doc))
    return subprocess.run([os.path.join(BIN, "check-jsonschema"), "--schemafile", str(schema_path), *map(str, paths)],
                          capture_output=True, text=True)


def custom_resources(rendered, overlay) -> list[dict]:
    return [d for d in rendered[overlay] if not is_built_in(d)]


@pytest.mark.parametrize("overlay", ["jobset", "trainjob"])
def test_custom_resources_pass_their_crd_schemas(rendered, overlay, tmp_path):
    docs = custom_resources(rendered, overlay)
    assert docs
    result = check_jsonschema(docs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kueue_localqueue_example_passes_its_crd_schema(tmp_path):
    result = check_jsonschema([yaml.safe_load(open(KUEUE_EXAMPLE))], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay, path, value, error", [
    ("jobset", ["spec", "failurePolicy", "maxRestart"], 6, "'maxRestart' was unexpected"),  # misspelt
    ("jobset", ["spec", "replicatedJobs", 0, "template", "spec", "template", "spec", "containers", 0, "envFrom", 0,
                "configMapRef", "nme"], "x", "'nme' was unexpected"),  # deep in the embedded pod template
    ("jobset", ["spec", "network", "enableDNSHostnames"], "yes", "'yes' is not of type 'boolean'"),
    ("trainjob", ["spec", "trainer", "numProcPerNode"], "auto", "'auto' is not of type 'integer'"),  # v2.3: an integer
    ("trainjob", ["apiVersion"], "trainer.kubeflow.org/v1", "'trainer.kubeflow.org/v1alpha1' was expected"),
])
def test_the_crd_validation_refuses_what_the_api_server_would(rendered, tmp_path, overlay, path, value, error):
    doc = json.loads(json.dumps(custom_resources(rendered, overlay)[0]))
    schema = (doc["apiVersion"], doc["kind"])
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    result = check_jsonschema([doc], tmp_path, schema)
    assert result.returncode != 0 and error in result.stdout, result.stdout + result.stderr


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
    env = image_env(text)
    assert env["PYTHONUNBUFFERED"] == "1" and env["JOB_CACHE_DIR"] == "/cache"
    if dockerfile.endswith("gpu"):
        assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
        # video: the NVIDIA runtime exposes the hardware JPEG decoder (JOB_DECODE=device) only with it
        assert {"compute", "utility", "video"} <= set(env["NVIDIA_DRIVER_CAPABILITIES"].split(","))
        assert env["JOB_DEVICE"] == "cuda"  # the GPU image refuses to train on the CPU unless told to
        assert "torch.version.cuda" in text  # the build refuses a CPU-only torch
    else:
        assert "JOB_DEVICE" not in env  # auto


def final_stage(text: str) -> str:
    """The Dockerfile's last stage (the image), continuation lines joined."""
    return re.split(r"^FROM ", re.sub(r"\\\n\s*", " ", text), flags=re.M)[-1]


def image_env(text: str) -> dict[str, str]:
    """The ENV of the image's stage, as NAME=value pairs."""
    env = {}
    for line in final_stage(text).splitlines():
        if line.startswith("ENV "):
            env.update(word.split("=", 1) for word in shlex.split(line[4:]))
    return env


def apt_packages(text: str) -> set[str]:
    """The Debian packages the image's stage installs, without their version pins."""
    return {word.split("=")[0] for line in final_stage(text).splitlines() if line.startswith("RUN ")
            for part in line.split("apt-get install")[1:] for word in shlex.split(part.split("&&")[0].split(";")[0])
            if not word.startswith("-")}


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_carry_what_job_compile_needs(dockerfile):
    """Triton builds its launcher with a C compiler and libc headers at first use, Inductor's CPU
    backend compiles C++ against Python's headers: python.org's base has the headers, a base with
    Debian's Python (the image test's stand-in) gets them from libpython3-dev."""
    text = open(os.path.join(ROOT, dockerfile)).read()
    assert {"gcc", "g++", "libc6-dev", "libpython3-dev", "tini"} <= apt_packages(text)
    assert "/Python.h\" ]; then" in final_stage(text)  # the headers only where the base's Python lacks them


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
    documented `--tmpfs /cache` is writable by an arbitrary uid only if the image's /cache is 1777."""
    text = open(os.path.join(ROOT, dockerfile)).read()
    assert "mkdir -p /cache && chmod 1777 /cache" in text
    assert "HOME=/tmp" in text and "TMPDIR=/tmp" in text


def test_the_documented_docker_run_uses_a_read_only_root_and_outlasts_the_stop_grace():
    """docs/deploy.md's `docker run`, which the image test runs every container with, is found
    there and runs the image its `docker build` tags."""
    flags = documented_run_flags()
    _, image = docker_run_flags(section("Run in Docker"))
    assert image and f"-t {image} " in section("Run in Docker"), image
    tmpfs = dict(value.partition(":")[::2] for name, value in zip(flags, flags[1:], strict=False) if name == "--tmpfs")
    assert "--read-only" in flags and set(tmpfs) == {"/tmp", "/cache"}
    # Docker mounts a tmpfs noexec unless told otherwise; JOB_COMPILE maps what Triton and Inductor build there
    for path, options in tmpfs.items():
        assert "exec" in options.split(",") and "noexec" not in options.split(","), (path, options)
    assert float(option(flags, "--stop-timeout")) >= Settings.model_fields["stop_grace_seconds"].default + 10


def test_smoke_docker_script_and_example_workflow_run_the_documented_flags():
    script = open(os.path.join(ROOT, "scripts", "smoke-docker.sh")).read()
    assert shlex.split(re.search(r"^run_flags=\((.*)\)$", script, re.M).group(1)) == documented_run_flags()
    workflow, _ = docker_run_flags(open(os.path.join(ROOT, ".github", "workflows", "smoke.yml")).read())
    assert option(workflow, "--network") == "host"  # the S3 server listens on the runner's 127.0.0.1
    workflow.remove("--network")
    workflow.remove("host")
    assert workflow == documented_run_flags()


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


@pytest.mark.parametrize("overlay", (*JOB_OVERLAYS, "jobset"))
def test_pods_are_locked_down(rendered, overlay):
    spec = pod_spec(rendered[overlay])
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
def test_tmp_and_cache_are_emptydirs_that_allow_exec(rendered, overlay):
    """JOB_COMPILE loads the modules Triton and Inductor build under /tmp (HOME) and /cache: the
    kubelet mounts an emptyDir (a node directory, or a tmpfs for medium: Memory) without noexec, and
    a pod cannot ask for mount options on one; a hostPath or a PVC would bring the node's or the
    storage class's."""
    spec = trainjob_pod(rendered[overlay]) if overlay == "trainjob" else pod_spec(rendered[overlay])
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in spec["containers"][0]["volumeMounts"]:
        if mount["mountPath"] in ("/tmp", "/cache"):
            assert set(volumes[mount["name"]]) == {"name", "emptyDir"}, volumes[mount["name"]]
    assert "noexec" not in json.dumps(rendered[overlay])


# --- what the controllers do with an exit code ---------------------------------------------------
# Kubernetes' Job controller (pkg/controller/job/pod_failure_policy.go: first matching rule, else
# Count; the failure messages below are its format strings) and JobSet's failure policy (first
# rule whose reasons and message patterns match, else RestartJobSet; site/content/en/docs/tasks/
# failure_policy.md), in a few lines: the tests assert what each exit code does, not how the
# rules are spelt.
FAIL_AT_ONCE = sorted(code for code, (_, action) in EXIT_CODES.items() if action == "fail at once")
RETRY = sorted(code for code, (_, action) in EXIT_CODES.items() if action == "retry")
OTHER_FAILURES = [137, 139]  # killed by the kubelet or the OOM killer, a crash: not in the table, retried


def pod_failure(policy: dict, container_name: str, exit_code: int, condition: str = "") -> tuple[str, str]:
    """(action, the Job's failure message if it is FailJob) for a pod whose container exited so."""
    for index, rule in enumerate(policy["rules"]):
        if "onExitCodes" in rule:
            req = rule["onExitCodes"]
            if req.get("containerName", container_name) == container_name and (exit_code in req["values"]) == (req["operator"] == "In"):
                return rule["action"], (f"Container {container_name} for pod ns/pod failed with exit code {exit_code} "
                                        f"matching {rule['action']} rule at index {index}")
        elif any(p["type"] == condition and p["status"] == "True" for p in rule["onPodConditions"]):
            return rule["action"], f"Pod ns/pod has condition {condition} matching {rule['action']} rule at index {index}"
    return "Count", ""


def jobset_action(failure_policy: dict, reason: str, message: str) -> str:
    for rule in failure_policy.get("rules", []):
        if (not rule.get("onJobFailureReasons") or reason in rule["onJobFailureReasons"]) and \
                (not rule.get("onJobFailureMessagePatterns") or any(re.search(p, message) for p in rule["onJobFailureMessagePatterns"])):
            return rule["action"]
    return "RestartJobSet"


@pytest.mark.parametrize("overlay", JOB_OVERLAYS)
def test_pod_failure_policy_acts_on_the_exit_code_table(rendered, overlay):
    job = job_spec(rendered[overlay])
    name = container(rendered[overlay])["name"]
    for code in FAIL_AT_ONCE:
        assert pod_failure(job["podFailurePolicy"], name, code)[0] == "FailJob", code
    for code in RETRY + OTHER_FAILURES:
        assert pod_failure(job["podFailurePolicy"], name, code)[0] == "Count", code
    # preemption, eviction, node drain: the pod was stopped (143) and is not counted
    assert pod_failure(job["podFailurePolicy"], name, 143, "DisruptionTarget")[0] == "Ignore"
    assert max(job.get("backoffLimit", 0), job.get("backoffLimitPerIndex", 0)) > 0
    for key in ("activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert job[key] > 0


def test_jobset_restarts_every_pod_on_a_retryable_exit_code_and_fails_at_once_on_the_others(rendered):
    docs = rendered["jobset"]
    jobset, job, name = workload(docs)["spec"], job_spec(docs), container(docs)["name"]
    policy = jobset["failurePolicy"]

    def outcome(exit_code: int, condition: str = "") -> str:
        """What the JobSet does when one pod of its child Job fails so."""
        action, message = pod_failure(job["podFailurePolicy"], name, exit_code, condition)
        if action == "FailJob":
            return jobset_action(policy, "PodFailurePolicy", message)
        assert action == "Count" and job["backoffLimit"] == 0  # any counted failure fails the child Job
        return jobset_action(policy, "BackoffLimitExceeded", "Job has reached the specified backoff limit")

    for code in FAIL_AT_ONCE:
        assert outcome(code) == "FailJobSet", code
    for code in RETRY + OTHER_FAILURES:
        assert outcome(code) == "RestartJobSet", code  # every pod, counted against maxRestarts
    assert outcome(143, "DisruptionTarget") == "RestartJobSetAndIgnoreMaxRestarts"
    assert jobset_action(policy, "DeadlineExceeded", "Job was active longer than specified deadline") == "FailJobSet"
    assert policy["maxRestarts"] > 0 and policy["restartStrategy"] == "BlockingRecreate"
    assert job["activeDeadlineSeconds"] > 0 and jobset["ttlSecondsAfterFinished"] > 0
    # what JobSet's webhook checks (pkg/webhooks/jobset_webhook.go): rule names, unique, and known reasons
    names = [r["name"] for r in policy["rules"]]
    assert len(set(names)) == len(names) and all(re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", n) for n in names)
    reasons = {"BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes", "MaxFailedIndexesExceeded", "PodFailurePolicy"}
    assert {r for rule in policy["rules"] for r in rule.get("onJobFailureReasons", [])} <= reasons


def trainjob_pod(docs) -> dict:
    """The pod spec a TrainJob patches into Trainer's runtime (its one runtimePatches entry)."""
    (patch,) = workload(docs)["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"  # the torch-distributed runtime's replicated Job
    return node["template"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_holds_valid_settings_and_the_grace_period_fits(rendered, overlay, monkeypatch, tmp_path):
    docs = rendered[overlay]
    configmap = kind(docs, "ConfigMap")
    data = configmap["data"]
    assert data and all(k.startswith("JOB_") for k in data)
    for k in list(os.environ):
        if k.startswith("JOB_"):
            monkeypatch.delenv(k)
    for k, v in data.items():
        monkeypatch.setenv(k, v)
    settings = load_settings()  # the job's own validation: unknown names and bad values fail here
    assert settings_environment(docs, tmp_path) == data  # what the container gets: all of it
    spec = trainjob_pod(docs) if workload(docs)["kind"] == "TrainJob" else pod_spec(docs)
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > settings.stop_grace_seconds
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_gpu_overlay_requests_a_gpu_and_cpu_does_not(rendered):
    gpu, cpu = container(rendered["gpu"]), container(rendered["cpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in str(cpu["resources"])
    assert gpu["image"].endswith("-gpu") and cpu["image"].endswith("-cpu")
    tolerations = kind(rendered["gpu"], "Job")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def container_env(c: dict) -> dict[str, str]:
    """A container's env values as the kubelet sets them: `$(NAME)` expanded from the variables
    defined above it (Kubernetes' dependent environment variables)."""
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), e["value"])
    return env


def multinode_rendezvous(docs) -> dict[str, str]:
    """The Indexed Job's wiring checked: its pods reach pod 0 through the headless Service that
    selects them. Returns the names a second run must not share."""
    job = kind(docs, "Job")
    spec, name, service = job["spec"], job["metadata"]["name"], kind(docs, "Service")
    env = container_env(container(docs))
    assert spec["completionMode"] == "Indexed"
    assert int(env["PET_NNODES"]) == spec["completions"] == spec["parallelism"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}  # this Job's pods, no other run's
    subdomain = spec["template"]["spec"]["subdomain"]
    assert subdomain == service["metadata"]["name"]
    host, port = env["PET_RDZV_ENDPOINT"].split(":")
    assert host == f"{name}-0.{subdomain}"  # pod 0: <job>-<index>.<subdomain>
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert "$(" not in json.dumps(env)
    return {"host": host, "id": env["PET_RDZV_ID"], "subdomain": subdomain, "service": service["metadata"]["name"]}


def test_multinode_is_an_indexed_job_wired_to_its_rendezvous(rendered):
    docs = rendered["multinode"]
    job = kind(docs, "Job")["spec"]
    env = container_env(container(docs))
    assert multinode_rendezvous(docs)["id"] == kind(docs, "Job")["metadata"]["name"]
    assert container(docs)["command"] == LAUNCHER
    assert env["PET_RDZV_BACKEND"] == "c10d"
    # retries counted per index: a lost node does not spend the other nodes' budget, and an index
    # out of retries fails the Job at once (the others cannot train without it)
    assert job["backoffLimitPerIndex"] > 0 and job["maxFailedIndexes"] == 0
    assert "backoffLimit" not in job  # defaults to MaxInt32 beside backoffLimitPerIndex: per index only


def test_jobset_runs_the_gpu_overlays_pod_with_the_launcher(rendered):
    jobset_pod, gpu_pod = json.loads(json.dumps(pod_spec(rendered["jobset"]))), pod_spec(rendered["gpu"])
    c = jobset_pod["containers"][0]
    assert c.pop("command") == LAUNCHER and c.pop("env")
    assert jobset_pod == gpu_pod  # the same security context, volumes, resources, image and settings


def jobset_rendezvous(docs) -> dict[str, str]:
    """The JobSet's wiring checked: its pods reach pod 0 of Job 0 by the name JobSet gives it.
    Returns the names a second run must not share."""
    jobset = workload(docs)
    (replicated,) = jobset["spec"]["replicatedJobs"]
    job = replicated["template"]["spec"]
    env = container_env(container(docs))
    assert job["completionMode"] == "Indexed"
    assert int(env["PET_NNODES"]) == replicated["replicas"] * job["parallelism"] == replicated["replicas"] * job["completions"]
    network = jobset["spec"]["network"]
    assert network["enableDNSHostnames"] is True
    # pod 0 of Job 0: <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain> (JobSet's naming;
    # the subdomain defaults to the JobSet's name)
    host, port = env["PET_RDZV_ENDPOINT"].split(":")
    name = jobset["metadata"]["name"]
    subdomain = network.get("subdomain", name)
    assert host == f"{name}-{replicated['name']}-0-0.{subdomain}"
    assert len(host.split(".")[0]) <= 63 and 0 < int(port) < 65536  # a DNS label
    assert "$(" not in json.dumps(env)
    return {"host": host, "id": env["PET_RDZV_ID"], "subdomain": subdomain}


def test_jobset_is_wired_to_its_rendezvous_through_a_real_pod_name(rendered):
    docs = rendered["jobset"]
    env = container_env(container(docs))
    assert jobset_rendezvous(docs)["id"] == workload(docs)["metadata"]["name"]
    assert env["PET_RDZV_BACKEND"] == "c10d" and env["PET_MAX_RESTARTS"] == "0"  # the JobSet restarts, not torchrun
    assert container(docs)["command"] == LAUNCHER


def test_trainjob_runs_the_gpu_overlays_pod_on_trainers_torch_runtime(rendered):
    docs, gpu = rendered["trainjob"], rendered["gpu"]
    trainjob = workload(docs)
    trainer, pod = trainjob["spec"]["trainer"], trainjob_pod(docs)
    assert trainjob["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                              "name": "torch-distributed"}
    # the launcher, once the command has set the settings (settings_environment runs it)
    assert trainer["command"][:4] == [*LAUNCHER[:3], "-c"] and trainer["command"][4].endswith('"-m", "job.launch"])')
    assert trainer["image"] == container(gpu)["image"] and trainer["resourcesPerNode"] == container(gpu)["resources"]
    assert trainer["numProcPerNode"] == int(container(gpu)["resources"]["limits"]["nvidia.com/gpu"])
    assert trainer["numNodes"] > 1
    for key in ("securityContext", "serviceAccountName", "terminationGracePeriodSeconds", "tolerations"):
        assert pod[key] == pod_spec(gpu)[key], key
    (c,) = pod["containers"]
    assert c["name"] == "node"  # the runtime's container
    assert c["securityContext"] == container(gpu)["securityContext"]
    # the gpu overlay's volumes, and the settings ConfigMap the command reads
    (settings,) = [v for v in pod["volumes"] if "configMap" in v]
    assert [v for v in pod["volumes"] if v != settings] == pod_spec(gpu)["volumes"]
    assert [m for m in c["volumeMounts"] if m["name"] != settings["name"]] == container(gpu)["volumeMounts"]
    # Trainer sets the PET_* variables itself and refuses a TrainJob that sets them
    # (pkg/runtime/framework/plugins/torch: TorchRunReservedEnvNames)
    assert not [e["name"] for e in trainer["env"] if e["name"].startswith("PET_")]
    # the TrainJob CRD's own rule (x-kubernetes-validations, which a JSON Schema validator skips)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", trainjob["metadata"]["name"]) and len(trainjob["metadata"]["name"]) <= 63


def test_kueue_queues_the_jobset_and_the_trainjob_and_any_job_overlay_on_request(rendered, tmp_path):
    queue = yaml.safe_load(open(KUEUE_EXAMPLE))["metadata"]["name"]
    for overlay in ("jobset", "trainjob"):
        assert workload(rendered[overlay])["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue
    for overlay in JOB_OVERLAYS:  # opt-in: on a cluster with Kueue, a label naming a missing queue never starts
        assert "kueue.x-k8s.io/queue-name" not in workload(rendered[overlay])["metadata"]["labels"]
    k8s = os.path.join(ROOT, "k8s")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(os.path.join(k8s, "overlays", "multinode"), tmp_path)],
        "components": [os.path.relpath(os.path.join(k8s, "components", "kueue"), tmp_path)]}))
    docs = [d for d in yaml.safe_load_all(kustomize(tmp_path)) if d]
    assert workload(docs)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue
    assert not [d for d in docs if d["kind"] != workload(docs)["kind"] and "kueue.x-k8s.io/queue-name" in d["metadata"].get("labels", {})]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_limits_cpu_to_its_request_so_the_job_sizes_itself_to_the_quota(rendered, overlay):
    """The job sizes its DataLoader workers and threads from the cgroup CPU quota; with no CPU limit
    a pod sees every thread of the node (223 workers per loader on a 224-thread GPU node)."""
    docs = rendered[overlay]
    w = workload(docs)
    resources = w["spec"]["trainer"]["resourcesPerNode"] if w["kind"] == "TrainJob" else container(docs)["resources"]
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"], resources


# --- what survives an edit: settings, names and counts stated once --------------------------------
def settings_environment(docs, tmp_path) -> dict[str, str]:
    """The JOB_* variables the job's container gets from the settings ConfigMap: through envFrom
    (Job, JobSet), or through the ConfigMap volume that the TrainJob's command reads (a TrainJob
    takes env, not envFrom), run here for real on the volume laid out as the kubelet lays it out
    (a timestamped folder, `..data` pointing at it, a link per key), up to its exec of the launcher."""
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    if workload(docs)["kind"] != "TrainJob":
        env = {}
        for source in container(docs)["envFrom"]:
            if "configMapRef" in source:
                env.update(configmaps[source["configMapRef"]["name"]])  # the generated (hashed) name
        return env
    pod = trainjob_pod(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if "configMap" in volumes[m["name"]]]
    data = configmaps[volumes[mount["name"]]["configMap"]["name"]]
    folder, version = tmp_path / "settings-volume", "..2026_01_01_00_00_00.000000001"
    (folder / version).mkdir(parents=True)
    (folder / "..data").symlink_to(version)
    for key, value in data.items():
        (folder / version / key).write_text(value)
        (folder / key).symlink_to(f"..data/{key}")
    command = workload(docs)["spec"]["trainer"]["command"]
    assert command[:4] == ["/usr/bin/tini", "--", "python", "-c"]
    code = command[4]
    assert code.count(mount["mountPath"]) == 1, code
    probe = tmp_path / "python"  # stands in for the interpreter the command execs
    probe.write_text(f"#!{sys.executable}\nimport json, os, sys\nprint(json.dumps([sys.argv[1:], dict(os.environ)]))\n")
    probe.chmod(0o755)
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.executable = {str(probe)!r}\n"
                             + code.replace(mount["mountPath"], str(folder))],
                            env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    argv, env = json.loads(result.stdout)
    assert argv == ["-m", "job.launch"]  # and then it is the launcher, in the same process
    return {k: v for k, v in env.items() if k.startswith("JOB_")}


def copy_of_k8s(tmp_path):
    """A copy of k8s/ to edit as a user would; the overlays refer to each other by relative paths."""
    shutil.copytree(os.path.join(ROOT, "k8s"), tmp_path / "k8s")
    return tmp_path / "k8s"


def edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, (path, old)
    path.write_text(text.replace(old, new))


def render(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(kustomize(path)) if d]


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")
def test_every_settings_key_reaches_every_overlay(tmp_path):
    """A setting added to k8s/base/settings.env, as docs/deploy.md says, reaches the job in every
    overlay: none lists the keys it forwards (the TrainJob once forwarded six, and a JOB_MODEL
    added there never reached the container)."""
    k8s = copy_of_k8s(tmp_path)
    with open(k8s / "base" / "settings.env", "a") as f:
        f.write("JOB_SOMETHING=x y\n")
    for overlay in OVERLAYS:
        docs = render(k8s / "overlays" / overlay)
        env = settings_environment(docs, tmp_path / overlay)
        assert env["JOB_SOMETHING"] == "x y", overlay
        assert env == kind(docs, "ConfigMap")["data"], overlay


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_name_suffix_renames_everything_a_second_run_would_collide_on(rendered, overlay, tmp_path):
    """docs/deploy.md's second run beside the first: `nameSuffix: -run2` in the overlay's
    kustomization.yaml renames the workload, and with it the multi-node overlays' rendezvous
    endpoint, rendezvous id, subdomain and headless Service (derived from the name by replacements),
    still wired together. The Secret and the service account are shared, not renamed."""
    k8s = copy_of_k8s(tmp_path)
    with open(k8s / "overlays" / overlay / "kustomization.yaml", "a") as f:
        f.write("nameSuffix: -run2\n")
    docs = render(k8s / "overlays" / overlay)
    first = workload(rendered[overlay])["metadata"]["name"]
    assert workload(docs)["metadata"]["name"] == first + "-run2"
    assert settings_environment(docs, tmp_path) == kind(docs, "ConfigMap")["data"]  # the renamed ConfigMap's
    wiring = {"multinode": multinode_rendezvous, "jobset": jobset_rendezvous}.get(overlay)
    if wiring:
        before, after = wiring(rendered[overlay]), wiring(docs)
        for key, value in after.items():
            assert "-run2" in value and value != before[key], (key, value)
    text = json.dumps(docs)
    assert f'"{SECRET}"' in text and '"serviceAccountName": "default"' in text


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")
def test_nodes_and_gpus_per_node_are_stated_once(rendered, tmp_path):
    """One edit each: the nodes in each multi-node overlay, the GPUs per node in the gpu overlay's
    nvidia.com/gpu limit; torchrun's PET_NNODES and PET_NPROC_PER_NODE, the Job's parallelism and
    completions and the TrainJob's processes and resources per node follow."""
    k8s = copy_of_k8s(tmp_path)
    edit(k8s / "overlays" / "gpu" / "kustomization.yaml", 'nvidia.com/gpu: "1"', 'nvidia.com/gpu: "4"')
    edit(k8s / "overlays" / "multinode" / "job-patch.yaml", "completions: 2", "completions: 3")
    edit(k8s / "overlays" / "jobset" / "jobset.yaml", "parallelism: 2", "parallelism: 3")
    edit(k8s / "overlays" / "trainjob" / "trainjob.yaml", "numNodes: 2", "numNodes: 3")
    for overlay in ("multinode", "jobset"):
        docs = render(k8s / "overlays" / overlay)
        env = container_env(container(docs))
        assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"]) == ("3", "4"), overlay
        assert job_spec(docs)["parallelism"] == job_spec(docs)["completions"] == 3, overlay
        assert container(docs)["resources"]["limits"]["nvidia.com/gpu"] == "4"
    trainer = workload(render(k8s / "overlays" / "trainjob"))["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    # and nowhere else: the untouched render still says 2 nodes of 1 GPU
    assert container_env(container(rendered["jobset"]))["PET_NPROC_PER_NODE"] == "1"


def quantity(value: str) -> float:
    """A Kubernetes quantity in bytes (the suffixes the manifests use)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_requests_the_node_disk_its_emptydirs_may_fill(rendered, overlay):
    """The dataset cache (50Gi) and /tmp live on the node's disk: without an ephemeral-storage
    request the scheduler may place the pod on a node that cannot hold them, and the kubelet evicts
    it mid-run. (The memory-backed /dev/shm counts against the memory limit instead.)"""
    docs = rendered[overlay]
    w = workload(docs)
    spec = trainjob_pod(docs) if w["kind"] == "TrainJob" else pod_spec(docs)
    resources = w["spec"]["trainer"]["resourcesPerNode"] if w["kind"] == "TrainJob" else container(docs)["resources"]
    on_disk = [v["emptyDir"]["sizeLimit"] for v in spec["volumes"]
               if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"]
    assert len(on_disk) == 2
    assert quantity(resources["requests"]["ephemeral-storage"]) >= sum(map(quantity, on_disk))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_from_the_secret_or_the_pods_service_account(rendered, overlay):
    """Every overlay gives the job the documented Secret, AWS_ENDPOINT_URL included, and names the
    pod's service account (the place for IRSA or GKE Workload Identity, which need no Secret). The
    Secret is optional so that workload identity works without one; a pod with neither stops at
    once: the job exits with the credentials error's code, which every failure policy fails on."""
    docs = rendered[overlay]
    w = workload(docs)
    if w["kind"] == "TrainJob":
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in w["spec"]["trainer"]["env"]
                if "secretKeyRef" in e.get("valueFrom", {})}
        assert refs == {k: {"name": SECRET, "key": k, "optional": True} for k in CREDENTIALS}
        assert trainjob_pod(docs)["serviceAccountName"] == pod_spec(rendered["gpu"])["serviceAccountName"]
    else:
        assert {"secretRef": {"name": SECRET, "optional": True}} in container(docs)["envFrom"]  # every key in it
        assert pod_spec(docs)["serviceAccountName"] == "default"  # a placeholder that exists in every namespace
        assert pod_spec(docs)["automountServiceAccountToken"] is False  # IRSA's webhook mounts its own token
    assert CredentialsError.exit_code in FAIL_AT_ONCE  # the podFailurePolicy tests above: FailJob, FailJobSet
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_the_deploy_page_documents_the_rerun_path_and_where_each_credential_goes():
    """A Job's pod template is immutable: a settings change re-applied to an existing Job fails,
    and a finished Job re-applied unchanged does nothing. docs/deploy.md says what to run instead, and
    every overlay its commands name exists."""
    kubernetes = section("Run on Kubernetes")
    for needed in ("field is immutable", "kubectl delete -k", "nameSuffix", "AWS_ENDPOINT_URL", "serviceAccountName"):
        assert needed in kubernetes, needed
    paths = re.findall(r"kubectl (?:apply|delete)[^\n`]* -k (\S+)", kubernetes)
    assert paths
    for path in paths:
        assert os.path.isfile(os.path.join(ROOT, path.rstrip("`"), "kustomization.yaml")), path


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_build_refuses_a_torchvision_made_for_another_torch(dockerfile):
    """A mismatched pair passes `--help` and fails every image run with exit 1: the build runs
    docker/check_torch.py right after installing the two (and it passes on the pair we test)."""
    text = open(os.path.join(ROOT, dockerfile)).read()
    install = text.index('"torchvision==${TORCHVISION_VERSION}"')
    check = text.index("RUN python /src/check_torch.py")
    assert install < check < text.index("COPY job /src/job")
    assert "!docker/check_torch.py" in open(os.path.join(ROOT, ".dockerignore")).read().splitlines()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "docker", "check_torch.py")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "work together" in result.stdout, result.stdout + result.stderr

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
from job.errors import EXIT_CODES
from job.settings import Settings, load_settings
from readme_docker import docker_run_flags, option, readme_run_flags

JOB_OVERLAYS = ("cpu", "gpu", "multinode")  # a batch/v1 Job
OVERLAYS = (*JOB_OVERLAYS, "jobset", "trainjob")
DOCKERFILES = ("docker/Dockerfile.cpu", "docker/Dockerfile.gpu")
BIN = os.path.dirname(sys.executable)
LAUNCHER = ["/usr/bin/tini", "--", "python", "-m", "job.launch"]
KUEUE_EXAMPLE = os.path.join(ROOT, "k8s", "components", "kueue", "localqueue.yaml")

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
    README's `--tmpfs /cache` is writable by an arbitrary uid only if the image's /cache is 1777."""
    text = open(os.path.join(ROOT, dockerfile)).read()
    assert "mkdir -p /cache && chmod 1777 /cache" in text
    assert "HOME=/tmp" in text and "TMPDIR=/tmp" in text


def test_readme_docker_run_uses_a_read_only_root_and_outlasts_the_stop_grace():
    flags = readme_run_flags()
    tmpfs = dict(value.partition(":")[::2] for name, value in zip(flags, flags[1:], strict=False) if name == "--tmpfs")
    assert "--read-only" in flags and set(tmpfs) == {"/tmp", "/cache"}
    # Docker mounts a tmpfs noexec unless told otherwise; JOB_COMPILE maps what Triton and Inductor build there
    for path, options in tmpfs.items():
        assert "exec" in options.split(",") and "noexec" not in options.split(","), (path, options)
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
def test_configmap_holds_valid_settings_and_the_grace_period_fits(rendered, overlay, monkeypatch):
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
    if workload(docs)["kind"] == "TrainJob":  # env only: every setting, and the credentials
        grace = trainjob_pod(docs)["terminationGracePeriodSeconds"]
        refs = {e["name"]: e["valueFrom"] for e in workload(docs)["spec"]["trainer"]["env"]}
        assert {k: refs.get(k) for k in data} == {k: {"configMapKeyRef": {"name": configmap["metadata"]["name"], "key": k}} for k in data}
        secrets = [ref["secretKeyRef"] for ref in refs.values() if "secretKeyRef" in ref]
        assert secrets and all(s["name"] == "trainjob-s3" and s["optional"] is True for s in secrets)
    else:
        grace = pod_spec(docs)["terminationGracePeriodSeconds"]
        env_from = container(docs)["envFrom"]
        assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in env_from  # the generated name
        assert {"secretRef": {"name": "trainjob-s3", "optional": True}} in env_from  # referenced, not committed
    assert grace > settings.stop_grace_seconds
    assert not [d for d in docs if d["kind"] == "Secret"]


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


def test_jobset_is_wired_to_its_rendezvous_through_a_real_pod_name(rendered):
    docs = rendered["jobset"]
    jobset = workload(docs)
    (replicated,) = jobset["spec"]["replicatedJobs"]
    job = replicated["template"]["spec"]
    env = {e["name"]: e["value"] for e in container(docs)["env"]}
    assert job["completionMode"] == "Indexed"
    assert int(env["PET_NNODES"]) == replicated["replicas"] * job["parallelism"] == replicated["replicas"] * job["completions"]
    network = jobset["spec"]["network"]
    assert network["enableDNSHostnames"] is True
    # pod 0 of Job 0: <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain> (JobSet's naming;
    # the subdomain defaults to the JobSet's name)
    host, port = env["PET_RDZV_ENDPOINT"].split(":")
    name = jobset["metadata"]["name"]
    assert host == f"{name}-{replicated['name']}-0-0.{network.get('subdomain', name)}"
    assert len(host.split(".")[0]) <= 63 and 0 < int(port) < 65536  # a DNS label
    assert env["PET_RDZV_BACKEND"] == "c10d" and env["PET_MAX_RESTARTS"] == "0"  # the JobSet restarts, not torchrun
    assert container(docs)["command"] == LAUNCHER


def test_trainjob_runs_the_gpu_overlays_pod_on_trainers_torch_runtime(rendered):
    docs, gpu = rendered["trainjob"], rendered["gpu"]
    trainjob = workload(docs)
    trainer, pod = trainjob["spec"]["trainer"], trainjob_pod(docs)
    assert trainjob["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                              "name": "torch-distributed"}
    assert trainer["command"] == LAUNCHER
    assert trainer["image"] == container(gpu)["image"] and trainer["resourcesPerNode"] == container(gpu)["resources"]
    assert trainer["numProcPerNode"] == int(container(gpu)["resources"]["limits"]["nvidia.com/gpu"])
    assert trainer["numNodes"] > 1
    for key in ("securityContext", "terminationGracePeriodSeconds", "tolerations", "volumes"):
        assert pod[key] == pod_spec(gpu)[key], key
    (c,) = pod["containers"]
    assert c["name"] == "node"  # the runtime's container
    assert c["securityContext"] == container(gpu)["securityContext"] and c["volumeMounts"] == container(gpu)["volumeMounts"]
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

"""The job inside a real cgroup with a CPU quota (what `docker run --cpus` and a pod's CPU limit
make) sizes its workers and threads from the quota, not from the host's CPUs, and its first line
says what it saw. (The image test does the same through `docker run --cpus`.)"""

import os
import subprocess
import sys
import uuid

import pytest

from conftest import ROOT, job_env

V1 = "/sys/fs/cgroup/cpu"
V2 = "/sys/fs/cgroup"


def make_cgroup(cpus: float) -> str:
    """A fresh cgroup limited to `cpus` CPUs (v1 or v2); its folder."""
    name = f"trainjob-test-{uuid.uuid4().hex[:8]}"
    period = 100_000
    if os.path.exists(os.path.join(V1, "cpu.cfs_quota_us")):
        folder = os.path.join(V1, name)
        os.mkdir(folder)
        with open(os.path.join(folder, "cpu.cfs_period_us"), "w") as f:
            f.write(str(period))
        with open(os.path.join(folder, "cpu.cfs_quota_us"), "w") as f:
            f.write(str(int(cpus * period)))
    else:
        with open(os.path.join(V2, "cgroup.subtree_control"), "w") as f:
            f.write("+cpu")
        folder = os.path.join(V2, name)
        os.mkdir(folder)
        with open(os.path.join(folder, "cpu.max"), "w") as f:
            f.write(f"{int(cpus * period)} {period}")
    return folder


@pytest.fixture
def one_cpu_cgroup():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 or more CPUs for a quota of 1 to be told apart from the affinity")
    try:
        folder = make_cgroup(1.0)
    except OSError as exc:  # not root, or a read-only cgroup fs: the image test covers it with --cpus
        pytest.skip(f"cannot create a cgroup here ({exc})")
    yield folder
    os.rmdir(folder)  # the job has exited: the cgroup is empty


def test_the_job_in_a_cgroup_with_a_cpu_quota_sizes_workers_and_threads_from_it(tmp_path, digits_dir, one_cpu_cgroup):
    env = job_env(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="q", epochs=1, model="mlp")
    del env["JOB_THREADS"]  # the job's own default
    procs = os.path.join(one_cpu_cgroup, "cgroup.procs")

    def enter():
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    result = subprocess.run([sys.executable, "-m", "job"], env=env, cwd=ROOT, preexec_fn=enter,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    affinity = len(os.sched_getaffinity(0))
    # one CPU of quota: no worker (the loop's own CPU), where the affinity alone gave affinity - 1
    assert f"1 CPUs (cgroup CPU quota 1, affinity {affinity}): 1 CPU threads, 0 data workers" in result.stdout, \
        result.stdout[:3000]

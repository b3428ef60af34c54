"""What the job sizes itself to: the container's CPUs (affinity and the cgroup CPU quota, v1 and
v2, read from files laid out like a real /proc and /sys/fs/cgroup), the default workers and
threads on CPU and GPU, and the GPU that is there but cannot run this PyTorch."""

import os

import pytest
import torch

from job.errors import SettingsError
from job.runtime import (
    MAX_DEFAULT_THREADS_ON_GPU,
    MAX_DEFAULT_WORKERS_PER_GPU,
    cgroup_cpu_quota,
    default_workers_and_threads,
    driver_version,
    pick_device,
    unusable_gpu,
)


def tree(root, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_cgroup_v2_quota_is_read_from_cpu_max_and_the_tightest_ancestor_wins(tmp_path):
    root = tree(tmp_path, {
        "proc/self/cgroup": "0::/kubepods/pod1/ctr\n",
        "sys/fs/cgroup/cpu.max": "max 100000\n",
        "sys/fs/cgroup/kubepods/pod1/cpu.max": "300000 100000\n",  # the pod: 3 CPUs
        "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "800000 100000\n",  # the container: 8, under the pod's 3
    })
    assert cgroup_cpu_quota(root) == 3.0


def test_cgroup_v2_without_a_quota_and_docker_cpus_half(tmp_path):
    assert cgroup_cpu_quota(tree(tmp_path / "a", {"proc/self/cgroup": "0::/\n",
                                                  "sys/fs/cgroup/cpu.max": "max 100000\n"})) is None
    # `docker run --cpus 0.5` with a cgroup namespace: the container's cgroup is the mount's root
    assert cgroup_cpu_quota(tree(tmp_path / "b", {"proc/self/cgroup": "0::/\n",
                                                  "sys/fs/cgroup/cpu.max": "50000 100000\n"})) == 0.5


def test_cgroup_v1_quota_and_a_host_path_the_container_does_not_mount(tmp_path):
    root = tree(tmp_path, {
        # without a cgroup namespace the file names the host's path; the mount is the container's own
        "proc/self/cgroup": "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "150000\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_cpu_quota(root) == 1.5
    unlimited = tree(tmp_path / "u", {"proc/self/cgroup": "4:cpu:/\n", "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
                                      "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(unlimited) is None


def test_unreadable_or_garbled_cgroup_files_mean_no_quota(tmp_path):
    assert cgroup_cpu_quota(str(tmp_path / "nothing")) is None
    garbled = tree(tmp_path, {"proc/self/cgroup": "garbage\n0::/x\n", "sys/fs/cgroup/x/cpu.max": "lots 0\n"})
    assert cgroup_cpu_quota(garbled) is None


def test_this_machine_reads_without_error():
    quota = cgroup_cpu_quota()
    assert quota is None or quota > 0


def test_default_workers_and_threads_are_capped_per_gpu_process_not_per_host():
    # a 224-thread GPU node without a CPU limit: the host count gave 223 workers per loader
    assert default_workers_and_threads(224, "resnet50", on_gpu=True) == (MAX_DEFAULT_WORKERS_PER_GPU,
                                                                         MAX_DEFAULT_THREADS_ON_GPU)
    assert default_workers_and_threads(8, "resnet50", on_gpu=True) == (7, MAX_DEFAULT_THREADS_ON_GPU)
    assert default_workers_and_threads(8, "resnet50", on_gpu=False) == (7, 8)  # the CPU computes
    assert default_workers_and_threads(8, "mlp", on_gpu=False) == (7, 1)
    assert default_workers_and_threads(1, "mlp", on_gpu=False) == (0, 1)


def test_the_driver_version_is_read_from_the_kernel_module_line(tmp_path):
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
                    "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 07:09:29 UTC 2025\nGCC version:  gcc version 12.3.0\n")
    assert driver_version(str(proc)) == "580.65.06"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n")
    assert driver_version(str(proc)) == "535.183.01"
    assert driver_version(str(tmp_path / "absent")) is None


def test_a_gpu_the_wheel_cannot_use_is_named_with_the_driver_or_image_it_needs():
    old = unusable_gpu("535.183.01", "13.0")
    assert "driver 535.183.01 is older" in old and ">= 580" in old and "TORCH_INDEX_URL" in old
    assert "CPU build" in unusable_gpu("580.65.06", None)
    assert "--gpus all" in unusable_gpu("580.65.06", "13.0")  # driver fine: the device was not passed in
    assert unusable_gpu(None, "13.0") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a usable GPU does")
def test_a_present_but_unusable_gpu_is_exit_2_not_a_silent_cpu_run():
    problem = unusable_gpu("535.183.01", "13.0")
    for requested in ("auto", "cuda"):
        with pytest.raises(SettingsError, match=r"^JOB_DEVICE=\w+: the NVIDIA driver 535.183.01 is older") as info:
            pick_device(requested, 0, problem)
        assert info.value.exit_code == 2
    assert pick_device("cpu", 0, problem) == torch.device("cpu")  # asked for: trains on the CPU
    assert pick_device("auto", 0, None) == torch.device("cpu")  # no GPU at all: the CPU, as before
    with pytest.raises(SettingsError, match="no CUDA device and no NVIDIA driver"):
        pick_device("cuda", 0, None)


def test_cpus_available_counts_no_more_than_the_affinity_mask():
    from job.runtime import cpus_available

    cpus = cpus_available()
    assert 1 <= cpus.count <= cpus.affinity == len(os.sched_getaffinity(0))

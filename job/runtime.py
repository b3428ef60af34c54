"""Where the job runs: device, CPU threads and seeds, decided once at start.

The rest of the code receives a Runtime and never asks "is CUDA here?" again.
"""

import os
import platform
from dataclasses import dataclass, field

import torch

from job.errors import SettingsError
from job.signals import StopRequest


@dataclass
class Runtime:
    device: torch.device
    threads: int
    stop: StopRequest = field(default_factory=StopRequest)
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu"
        return f"{self.device} ({name}), {self.threads} CPU threads"


def cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SettingsError(f"JOB_DEVICE={requested}: no CUDA device is visible to this process; use auto or cpu")
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise SettingsError(f"JOB_DEVICE={requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    return torch.device("cpu")


def setup(settings, stop: StopRequest) -> Runtime:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several processes training independently into one run directory would corrupt it.
        raise SettingsError(f"WORLD_SIZE={os.environ['WORLD_SIZE']}: multi-process training under torchrun is not "
                            "supported by this version; run one process (torchrun --nproc-per-node=1) or none")
    device = pick_device(settings.device)
    # Small models on few cores lose badly to thread oversubscription (one epoch of a 784-32-10
    # MLP ran ~10x slower with the default count while another process was busy; ../shared
    # INFRA.md). One thread per process is the measured best for the in-memory MLP on CPU
    # (scripts/bench_mlp.py --threads); larger models get the CPUs this process may use.
    threads = settings.threads or (1 if settings.model == "mlp" else cpus_available())
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Runtime(device=device, threads=threads, stop=stop)

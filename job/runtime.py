"""Where the job runs, decided once at start: device, CPU threads, DataLoader workers, mixed
precision, seeds and the process group.

The rest of the code receives a Runtime and never asks "is CUDA here?", "how many CPUs?" or "am
I distributed?" again: the collective helpers below are no-ops in a single process.
"""

import contextlib
import os
import platform
import resource
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from job.errors import JobError, PeerLostError, SettingsError
from job.settings import ENV_PREFIX
from job.stop import StopRequest


@dataclass
class Runtime:
    device: torch.device
    threads: int = 1  # torch intra-op threads of this process
    workers: int = 0  # DataLoader worker processes for data read from files
    scan_threads: int = 1  # threads that decode-check image files before training
    amp_dtype: torch.dtype | None = None  # CUDA mixed precision; None on CPU
    stop: StopRequest = field(default_factory=StopRequest)
    rank: int = 0  # torchrun's RANK, LOCAL_RANK and WORLD_SIZE; 0, 0, 1 without torchrun
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu"
        where = f"{self.device} ({name}), {self.threads} CPU threads, {self.workers} data workers"
        return where + (f", rank {self.rank} of {self.world_size}" if self.distributed else "")

    def peak_memory(self) -> str:
        """This process's peak resident memory, and on CUDA the peak allocated on the GPU."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        gpu = (
            f", GPU {torch.cuda.max_memory_allocated(self.device) / 2**20:,.0f} MB"
            if self.device.type == "cuda"
            else ""
        )
        return f"peak memory {rss:,.0f} MB{gpu}"

    def autocast(self):
        """Mixed precision on CUDA (JOB_AMP); nothing on CPU, whose results it never changes."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- collectives (identity in a single process) ---------------------------------------
    def sum(self, *values: float) -> list[float]:
        """Sum numbers over all ranks (metrics are reduced as sums and counts, never as means)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(t)
        return t.tolist()

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks (a confusion matrix, say)."""
        if not self.distributed:
            return t
        out = t.to(self._collective_device)
        dist.all_reduce(out)
        return out.to(t.device)

    def stop_signal(self) -> int:
        """The stop signal if any rank got one, so all ranks stop at the same point (one sync)."""
        if not self.distributed:
            return self.stop.signum
        t = torch.tensor([self.stop.signum], device=self._collective_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_ok(self, error: JobError | None) -> None:
        """Raise on every rank if any rank failed a step that all must pass, so no rank is left
        waiting at the next collective for one that already gave up."""
        if not self.distributed:
            if error:
                raise error
            return
        t = torch.tensor([error.exit_code if error else 0], device=self._collective_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if error:
            raise error
        if t.item():
            failed = JobError(f"another rank failed (exit {int(t.item())}); see rank 0's log")
            failed.exit_code = int(t.item())
            raise failed

    def broadcast(self, obj):
        """rank 0's object on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._collective_device)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


class StopPoll:
    """The training loop's view of a stop signal, without a sync per step.

    In one process it is the local flag, read every step. Under torchrun all ranks must stop at
    the same step, so the flag is max-reduced across ranks, but asynchronously: a reduction
    starts every LAG steps and its result is read LAG steps later, long after it has arrived, so
    neither the CPU nor a GPU ever waits for it (a blocking all-reduce plus .item() every step
    would stall the GPU pipeline at every step). Every rank reads the same result at the same
    step. A stop is therefore noticed at most 2 x LAG steps after the signal."""

    LAG = 8

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.pending: tuple | None = None  # (work, host tensor, CUDA event) of the reduction in flight

    def __call__(self, step: int) -> int:
        if not self.rt.distributed:
            return self.rt.stop.signum
        if step % self.LAG:
            return 0
        signum = self.finish()
        flag = torch.tensor([self.rt.stop.signum], device=self.rt._collective_device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        event = None
        if flag.is_cuda:  # copy back behind the reduction; the event says when it has landed
            work.wait()  # NCCL: orders the stream after the reduction; the CPU does not block
            host = torch.empty_like(flag, device="cpu", pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = flag
        self.pending = (work, host, event)
        return signum

    def finish(self) -> int:
        """Read the reduction in flight (if any); call at the same step on every rank."""
        if self.pending is None:
            return 0
        work, host, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()  # recorded LAG steps ago: long done
        else:
            work.wait()
        return int(host.item())


def cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA if available (the GPU of this local rank under torchrun), else CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SettingsError(f"JOB_DEVICE={requested}: no CUDA device is visible to this process; use auto or cpu")
        index = int(requested.split(":")[1]) if ":" in requested else local_rank
        if index >= torch.cuda.device_count():
            raise SettingsError(
                f"JOB_DEVICE={requested}: GPU {index} wanted but {torch.cuda.device_count()} visible "
                "(under torchrun, --nproc-per-node must not exceed the GPUs)"
            )
        return torch.device("cuda", index)
    return torch.device("cpu")


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """JOB_AMP on CUDA: bf16 where the GPU has it (auto), fp16 (with a gradient scaler), or off."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16" or (setting == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def setup(settings, stop: StopRequest) -> Runtime:
    """Pick the device, threads and workers; join the process group when started by torchrun."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = pick_device(settings.device, local_rank)
    cpus = max(1, cpus_available() // local_world)  # this process's share of the machine
    # Small models on few cores lose badly to thread oversubscription (one epoch of a 784-32-10
    # MLP ran ~10x slower with the default count while another process was busy; ../shared
    # INFRA.md). One thread per process is the measured best for the in-memory MLP on CPU;
    # larger models use this process's share of the CPUs.
    threads = settings.threads or (1 if settings.model == "mlp" else cpus)
    # Decoding images is the bottleneck of a file-fed GPU (USER-NEEDS #23): every CPU of this
    # process's share but one (the training loop's) decodes; the pre-training scan uses them all.
    workers = settings.num_workers if settings.num_workers is not None else max(0, cpus - 1)
    scan_threads = max(1, settings.num_workers) if settings.num_workers is not None else cpus
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    if world_size > 1:
        # A bounded timeout: a lost peer fails the job in minutes, never hangs it.
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=settings.dist_timeout_seconds)
        )
    runtime = Runtime(
        device=device,
        threads=threads,
        workers=workers,
        scan_threads=scan_threads,
        amp_dtype=amp_dtype(settings.amp, device),
        stop=stop,
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
    )
    if runtime.distributed:
        same_settings(settings, runtime)
    return runtime


# what may differ between nodes: where and how each reads, not what is trained
NODE_LOCAL_SETTINGS = {"cache_dir", "device", "num_workers", "threads", "log_level", "shard_cache_bytes", "decode"}


def same_settings(settings, runtime: Runtime) -> None:
    """Every rank trains what rank 0 trains: settings that differ (a node given other JOB_*
    variables) end every rank with exit 2 naming them, before any work; they used to surface as a
    failure on one node (1) and a lost peer on the others (75)."""
    ours = {k: v for k, v in settings.public_dict().items() if k not in NODE_LOCAL_SETTINGS}
    theirs = runtime.broadcast(ours)
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    error = None
    if differ:
        error = SettingsError(
            f"rank {runtime.rank} has other settings than rank 0: "
            + ", ".join(f"{ENV_PREFIX}{k.upper()}" for k in differ)
            + "; every node must get the same JOB_* variables"
        )
    runtime.all_ok(error)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


COLLECTIVE_FAILURES = (
    "Connection closed by peer",
    "Connection reset by peer",
    "gloo",
    "NCCL",
    "timed out",
    "Timed out",
)


def is_peer_failure(runtime: Runtime, exc: BaseException) -> bool:
    """A failed collective: DistError, or the plain RuntimeError that DDP's backward raises."""
    if isinstance(exc, dist.DistError):
        return True
    return runtime.distributed and isinstance(exc, RuntimeError) and any(m in str(exc) for m in COLLECTIVE_FAILURES)


def peer_lost(runtime: Runtime, exc: Exception) -> JobError:
    """A failed collective (a peer died, the network dropped): worth a retry by the scheduler."""
    return PeerLostError(
        f"lost contact with the other ranks "
        f"({str(exc).splitlines()[0][:300] if str(exc) else exc.__class__.__name__}); "
        "the run resumes from its last checkpoint when restarted"
    )

"""Where the job runs, decided once at start: device, CPU threads, DataLoader workers, mixed
precision, seeds and the process group.

The rest of the code receives a Runtime and never asks "is CUDA here?", "how many CPUs?" or "am
I distributed?" again: the collective helpers below are no-ops in a single process.
"""

import contextlib
import logging
import math
import os
import platform
import re
import resource
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from job.errors import JobError, PeerLostError, SettingsError
from job.settings import ENV_PREFIX
from job.stop import StopRequest

log = logging.getLogger("job")


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
    cpus: "Cpus | None" = None  # what the container allows (None in tests that build a Runtime by hand)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        where = f"{self.device} ({device_name(self.device)})"
        cpus = f"{self.cpus.describe()}: " if self.cpus else ""
        where += f", {cpus}{self.threads} CPU threads, {self.workers} data workers"
        if self.device.type == "cuda":
            where += f", amp {dtype_name(self.amp_dtype)}"
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
            failed = JobError(f"another rank failed (exit {int(t.item())}); its own message is in its log")
            failed.relayed = True  # type: ignore[attr-defined]  # the launcher names the rank that failed first
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
        flag = torch.tensor([self.rt.stop.signum])
        if self.rt._collective_device.type == "cuda":
            # a plain host-to-device copy waits for the whole queue (a sync every LAG steps): from
            # pinned memory it is queued like a kernel
            flag = flag.pin_memory().to(self.rt._collective_device, non_blocking=True)
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


# CPUs a GPU process gives DataLoader workers and torch threads by default. On a GPU node of 224
# host threads the host count meant 223 workers per loader (~0.38 GB each after importing torch:
# ~85 GB against a 32 GiB limit). 12 workers decode ~4,000 JPEGs/s at 224 px, about what one
# H100 trains ResNet-50 at with AMP; the main process mostly launches kernels, so 4 threads.
MAX_DEFAULT_WORKERS_PER_GPU = 12
MAX_DEFAULT_THREADS_ON_GPU = 4


@dataclass(frozen=True)
class Cpus:
    """The CPUs this container may use: the fewest of the affinity mask and the cgroup CPU quota
    (`docker run --cpus`, a pod's CPU limit), which sched_getaffinity does not see."""

    count: int
    affinity: int
    quota: float | None  # CPUs the cgroup quota allows (v2 cpu.max, v1 cfs_quota_us/period); None: no quota

    def describe(self) -> str:
        if self.quota is None:
            return f"{self.count} CPUs (no cgroup CPU quota)"
        return f"{self.count} CPUs (cgroup CPU quota {self.quota:g}, affinity {self.affinity})"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_cpu_quota(root: str = "/") -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors, in CPUs, for cgroup v2
    (cpu.max: "max 100000" or "150000 100000") and v1 (cpu.cfs_quota_us, -1 for none, over
    cpu.cfs_period_us). `root` is for tests: a directory laid out like / with proc/self/cgroup and
    sys/fs/cgroup. Without a cgroup namespace /proc/self/cgroup names the host's path, which the
    container's mount does not have: then the mount's own root is read (as the JDK does)."""
    lines = (_read(os.path.join(root, "proc/self/cgroup")) or "").splitlines()
    base = os.path.join(root, "sys/fs/cgroup")
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2 (or the v2 part of a hybrid host)
            mount, read = base, _v2_quota
            if not os.path.exists(os.path.join(mount, "cpu.max")) and os.path.isdir(os.path.join(base, "unified")):
                mount = os.path.join(base, "unified")
        elif "cpu" in controllers.split(","):
            mount = next((os.path.join(base, d) for d in (controllers, "cpu,cpuacct", "cpuacct,cpu", "cpu")
                          if os.path.isdir(os.path.join(base, d))), "")
            read = _v1_quota
        else:
            continue
        if not mount:
            continue
        rel = path.strip("/")
        if rel and not os.path.isdir(os.path.join(mount, rel)):
            rel = ""  # the host's path, not mounted here: the container's cgroup is the mount's root
        while True:  # this cgroup and every ancestor up to the mount: the tightest limit holds
            quota = read(os.path.join(mount, rel))
            if quota is not None:
                quotas.append(quota)
            if not rel:
                break
            rel = os.path.dirname(rel)
    return min(quotas) if quotas else None


def _v2_quota(folder: str) -> float | None:
    fields = (_read(os.path.join(folder, "cpu.max")) or "").split()
    if len(fields) == 2 and fields[0] != "max":
        try:
            quota, period = int(fields[0]), int(fields[1])
        except ValueError:
            return None
        return quota / period if quota > 0 and period > 0 else None
    return None


def _v1_quota(folder: str) -> float | None:
    try:
        quota = int(_read(os.path.join(folder, "cpu.cfs_quota_us")) or "-1")
        period = int(_read(os.path.join(folder, "cpu.cfs_period_us")) or "0")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpus_available() -> Cpus:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    # a fractional quota rounds down (as Go's automaxprocs does): 1.5 CPUs of quota keep 1 busy thread
    # and leave the rest for the loader's and the store's threads rather than being throttled
    count = max(1, min(affinity, math.floor(quota))) if quota is not None else affinity
    return Cpus(count, affinity, quota)


def default_workers_and_threads(cpus: int, model: str, on_gpu: bool) -> tuple[int, int]:
    """(DataLoader workers, torch threads) of one process given its share of the CPUs.

    Decoding images is the bottleneck of a file-fed GPU (USER-NEEDS #23): every CPU of the share
    but one (the training loop's) decodes, up to MAX_DEFAULT_WORKERS_PER_GPU on a GPU. Small
    models on few cores lose badly to thread oversubscription (one epoch of a 784-32-10 MLP ran
    ~10x slower with the default count while another process was busy; ../shared INFRA.md): one
    thread for the in-memory MLP; larger models use the share (on a GPU at most
    MAX_DEFAULT_THREADS_ON_GPU: the GPU computes)."""
    workers = max(0, cpus - 1)
    threads = 1 if model == "mlp" else cpus
    if on_gpu:
        workers = min(workers, MAX_DEFAULT_WORKERS_PER_GPU)
        threads = min(threads, MAX_DEFAULT_THREADS_ON_GPU)
    return workers, threads


# The oldest driver each CUDA major version of the PyTorch wheels runs on (NVIDIA's CUDA
# compatibility tables: 13.x needs 580, 12.x 525 with minor-version compatibility, 11.x 450.80).
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
NVIDIA_PROC = "/proc/driver/nvidia/version"  # there when the host's NVIDIA driver is loaded and mounted in


def driver_version(proc_file: str = NVIDIA_PROC) -> str | None:
    """The NVIDIA kernel driver's version, e.g. "580.65.06", or None without one."""
    text = _read(proc_file) or ""
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return found.group(1) if found else None


def unusable_gpu(driver: str | None, wheel_cuda: str | None) -> str | None:
    """Why a GPU that is present cannot run this PyTorch, when CUDA is not available: a driver older
    than the wheel's CUDA needs, a CPU-only PyTorch, or else a device not passed in. None: no driver."""
    if driver is None:
        return None
    if wheel_cuda is None:
        return (f"an NVIDIA driver ({driver}) is loaded but this PyTorch is a CPU build; use the GPU image "
                "(docker/Dockerfile.gpu)")
    major = int(wheel_cuda.split(".")[0])
    need = MIN_DRIVER.get(major)
    if need is not None and int(driver.split(".")[0]) < need:
        return (f"the NVIDIA driver {driver} is older than this image's PyTorch (CUDA {wheel_cuda}) needs: driver "
                f">= {need}; run on nodes with a newer driver, or build the image for an older CUDA "
                "(docker/Dockerfile.gpu's TORCH_INDEX_URL build argument: a CUDA 12 index such as "
                "https://download.pytorch.org/whl/cu128 runs on drivers >= 525)")
    return (f"an NVIDIA driver ({driver}) is loaded but no GPU is visible to this process; run with "
            "`docker run --gpus all` (the NVIDIA container toolkit) or a nvidia.com/gpu resource limit")


def pick_device(requested: str, local_rank: int = 0, gpu_problem: str | None = None) -> torch.device:
    """auto: CUDA if available (the GPU of this local rank under torchrun), else CPU. A GPU that is
    there but unusable (`gpu_problem`, from unusable_gpu) is an error, not a silent CPU run:
    JOB_DEVICE=cpu trains on the CPU anyway."""
    if requested == "auto":
        if not torch.cuda.is_available() and gpu_problem:
            raise SettingsError(f"JOB_DEVICE=auto: {gpu_problem} (or set JOB_DEVICE=cpu to train on the CPU)")
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SettingsError(
                f"JOB_DEVICE={requested}: "
                + (gpu_problem or "no CUDA device and no NVIDIA driver in this container; run on a GPU node with "
                   "`docker run --gpus all` or a nvidia.com/gpu limit, or set JOB_DEVICE=cpu")
            )
        index = int(requested.split(":")[1]) if ":" in requested else local_rank
        if index >= torch.cuda.device_count():
            raise SettingsError(
                f"JOB_DEVICE={requested}: GPU {index} wanted but {torch.cuda.device_count()} visible "
                "(under torchrun, --nproc-per-node must not exceed the GPUs)"
            )
        return torch.device("cuda", index)
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """The first log line's device: on CUDA the GPU, its compute capability, the driver and the
    CUDA runtime the wheel was built for, what a GPU problem report needs first."""
    if device.type != "cuda":
        return platform.processor() or "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return (f"{torch.cuda.get_device_name(device)}, capability {major}.{minor}, driver {driver_version() or '?'}, "
            f"CUDA {torch.version.cuda}")


def dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off") if dtype else "off"


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """JOB_AMP on CUDA: bf16 where the GPU has it natively (auto: compute capability 8.0 and up; a
    T4 or V100 would emulate it, slower than fp32), fp16 (with a gradient scaler), or off."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16" or (setting == "auto" and not torch.cuda.is_bf16_supported(including_emulation=False)):
        return torch.float16
    return torch.bfloat16


def setup(settings, stop: StopRequest) -> Runtime:
    """Pick the device, threads and workers; join the process group when started by torchrun."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = pick_device(settings.device, local_rank, unusable_gpu(driver_version(), torch.version.cuda))
    machine = cpus_available()
    cpus = max(1, machine.count // local_world)  # this process's share of the container
    default_workers, default_threads = default_workers_and_threads(cpus, settings.model, device.type == "cuda")
    threads = settings.threads or default_threads
    workers = settings.num_workers if settings.num_workers is not None else default_workers
    # the pre-training scan decodes with threads of this process: its whole share
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
        cpus=machine,
    )
    if runtime.distributed:
        same_settings(settings, runtime)
    return runtime


# --- node-local work under torchrun ---------------------------------------------------------


def node_first(settings, runtime: Runtime, name: str, fn):
    """fn() on each node's local rank 0 first, then on the node's other ranks, which find what it
    cached on the node's disk (the dataset, the backbone features) and read it. An error on any
    rank ends every rank.

    The ranks wait for each other through the process group's store, not in a collective: a pull
    or a feature pass may take hours, and a collective gives up after JOB_DIST_TIMEOUT_SECONDS
    (NCCL's watchdog ends the rank). What that timeout is for, a lost peer, still holds: every rank
    beats in the store, and one silent for that long ends the wait (exit 75). A waiting rank
    answers a stop and logs a line every JOB_LOG_EVERY_SECONDS."""
    if not runtime.distributed:
        return fn()
    wait = NodeWait(settings, runtime, name)
    first = runtime.rank - runtime.local_rank  # the node's local rank 0: torchrun numbers a node's ranks in a row
    try:
        with wait.beating():
            if runtime.local_rank:
                wait.until(lambda: wait.has(f"first/{first}"), "local rank 0", [first])
            result = fn()
            wait.post(first=runtime.local_rank == 0)
            wait.until(lambda: wait.done() == runtime.world_size, "the other ranks", range(runtime.world_size))
        return result
    except BaseException as exc:
        wait.fail(exc.exit_code if isinstance(exc, JobError) else 1)
        raise


NODE_WAIT_POLL_SECONDS = 0.5  # how often a waiting rank reads the store (a request to its host)


class NodeWait:
    """node_first's waits, in the process group's key-value store: which ranks are done, the
    first failure's exit code, and a heartbeat per rank."""

    def __init__(self, settings, runtime: Runtime, name: str):
        # torch keeps the default group's store private; torchrun makes a new store each attempt
        self.store = dist.distributed_c10d._get_default_store()
        self.prefix, self.name, self.rt = f"trainjob/node_first/{name}/", name, runtime
        self.timeout, self.log_every = settings.dist_timeout_seconds, settings.log_every_seconds
        self.beats: dict[int, tuple[int, float]] = {}  # rank -> (its heartbeat count, when it last changed)
        self.next_check = 0.0

    def has(self, key: str) -> bool:
        return self.store.check([self.prefix + key])

    def done(self) -> int:
        return self.store.add(self.prefix + "done", 0)

    def post(self, first: bool) -> None:
        if first:
            self.store.set(self.prefix + f"first/{self.rt.rank}", "1")
        self.store.add(self.prefix + "done", 1)

    def fail(self, code: int) -> None:
        """Tell the other ranks (the first failure's code stays); a store that is gone tells them too."""
        try:
            self.store.compare_set(self.prefix + "failed", "", str(code))
        except Exception:
            pass

    @contextlib.contextmanager
    def beating(self):
        ended = threading.Event()

        def beat() -> None:
            while True:
                try:
                    self.store.add(self.prefix + f"beat/{self.rt.rank}", 1)
                except Exception:  # the store is gone: the waits find out by themselves
                    return
                if ended.wait(self.timeout / 4):
                    return

        threading.Thread(target=beat, name="node-first-heartbeat", daemon=True).start()
        try:
            yield
        finally:
            ended.set()

    def until(self, ready, what: str, ranks) -> None:
        """Poll until ready(): raise at a failure posted by another rank, a stop, or a rank among
        `ranks` silent for JOB_DIST_TIMEOUT_SECONDS."""
        start = last_log = time.monotonic()
        while True:
            if self.has("failed"):
                code = int(self.store.get(self.prefix + "failed"))
                failed = JobError(f"another rank failed (exit {code}); its own message is in its log")
                failed.relayed = True  # type: ignore[attr-defined]  # the launcher names the rank that failed first
                failed.exit_code = code
                raise failed
            if ready():
                return
            self.rt.stop.check(f"while waiting for {what} ({self.name}): nothing to save")
            now = time.monotonic()
            if now >= self.next_check:
                self.next_check = now + self.timeout / 4
                self.check_alive(ranks, now)
            if now - last_log >= self.log_every:
                last_log = now
                log.info(f"{self.name}: waiting for {what}, {now - start:.0f} s so far")
            time.sleep(NODE_WAIT_POLL_SECONDS)

    def check_alive(self, ranks, now: float) -> None:
        for rank in ranks:
            count = self.store.add(self.prefix + f"beat/{rank}", 0)
            seen = self.beats.get(rank)
            if seen is None or seen[0] != count:
                self.beats[rank] = (count, now)
            elif now - seen[1] > self.timeout:
                raise PeerLostError(
                    f"rank {rank} has not answered for {now - seen[1]:.0f} s (JOB_DIST_TIMEOUT_SECONDS="
                    f"{self.timeout:g}) while waiting for {self.name}; the run resumes from its last checkpoint "
                    "when restarted"
                )



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

"""torch.compile for the job (JOB_COMPILE): the up-front check that compiling can work here,
compiling what training calls, and the compile cache a restarted pod may reuse."""

import ctypes
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import cast

import torch

from job import loop, storage
from job.errors import CacheError, SettingsError, Stopped
from job.runtime import Runtime

log = logging.getLogger("job")

# Where Inductor and Triton keep what they compile: under JOB_CACHE_DIR unless set (Inductor's
# default is /tmp/torchinductor_<user>, which docs/deploy.md's `--tmpfs /tmp` mounts noexec).
COMPILE_CACHE_DIRS = (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"))
COMPILE_CACHE_MAX_BYTES = 1 << 30  # a run's saved compile cache larger than this is not read


def compile_ready(settings, runtime: Runtime) -> None:
    """JOB_COMPILE=true: point the compile caches under JOB_CACHE_DIR, then prove that compiling
    can work here before any data is pulled: the compiler builds a Python extension in the cache
    and it loads. Exit 2 naming what is missing: the GPU image once had no C compiler (Triton
    failed at the first step, and the scheduler retried it six times), and a noexec cache fails
    every compiled kernel."""
    folders = []
    for var, sub in COMPILE_CACHE_DIRS:
        if not os.environ.get(var):  # read by Inductor and Triton at their first compile
            os.environ[var] = os.path.join(settings.cache_dir, "compile", sub)
        folder = os.environ[var]
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"JOB_COMPILE=true: cannot create the compile cache {folder} ({var}): "
                f"{exc.strerror or exc}; make JOB_CACHE_DIR writable or set JOB_COMPILE=false"
            ) from None
        if os.statvfs(folder).f_flag & os.ST_NOEXEC:
            raise SettingsError(
                f"JOB_COMPILE=true: the compile cache {folder} ({var}) is on a noexec mount, where compiled "
                "kernels cannot be loaded; mount JOB_CACHE_DIR with exec (docker: --tmpfs <dir>:exec, or a volume), "
                f"point {var} at an exec-able folder, or set JOB_COMPILE=false"
            )
        folders.append(folder)
    if runtime.device.type == "cuda":
        # Triton builds each kernel's launcher with $CC, else gcc, else clang (triton/runtime/build.py)
        var, language, needs = "CC", "c", "Triton (CUDA) needs a C compiler"
        name = os.environ.get(var) or shutil.which("gcc") or shutil.which("clang") or "gcc"
    else:
        # Inductor's CPU backend compiles C++ with $CXX, else g++ (torch/_inductor/config.py, cpp.cxx)
        var, language, needs = "CXX", "c++", "Inductor's CPU backend needs a C++ compiler"
        name = os.environ.get(var, "g++")
        # its first compile warns "No CUDA runtime is found" on every CPU machine: noise in the log
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    compiler = shutil.which(name)
    if compiler is None:
        raise SettingsError(
            f"JOB_COMPILE=true: {needs} and {f'{var}={name}' if os.environ.get(var) else name} is not "
            f"{'found' if '/' in name else 'on PATH'}; install one (apt-get install gcc g++ libc6-dev; our images "
            f"have them), set {var}, or set JOB_COMPILE=false"
        )
    problem = build_probe(compiler, language, folders[0] if language == "c++" else folders[1])
    if problem:
        raise SettingsError(f"JOB_COMPILE=true: {problem}; install libc's and Python's headers (apt-get install "
                            "libc6-dev libpython3-dev; our images have them), or set JOB_COMPILE=false")


def build_probe(compiler: str, language: str, folder: str) -> str | None:
    """None when `compiler` builds a Python extension in `folder` that loads, else what failed:
    the headers and the mount that Inductor's kernels and Triton's launchers need too."""
    include = sysconfig.get_paths()["include"]
    with tempfile.TemporaryDirectory(prefix=".probe-", dir=folder) as tmp:
        library = os.path.join(tmp, "probe.so")
        try:
            done = subprocess.run(
                [compiler, "-x", language, "-", "-shared", "-fPIC", f"-I{include}", "-o", library],
                input="#include <Python.h>\nint trainjob_probe(void) { return 1; }\n",
                capture_output=True, text=True, timeout=300,  # a hang guard: it takes well under a second
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{compiler} cannot be run ({exc.__class__.__name__}: {str(exc)[:200]})"
        if done.returncode:
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            first = next((line for line in lines if "error" in line), lines[0] if lines else f"exit {done.returncode}")
            return f"{compiler} cannot build a Python extension here ({first[:200]})"
        try:
            ctypes.CDLL(library)
        except OSError as exc:
            return f"a library built in {folder} cannot be loaded ({str(exc)[:200]})"
    return None


def compile_model(settings, model: loop.Model, cache: "CompileCache", epochs: int, resumed: bool) -> str:
    """torch.compile what training calls when asked and worth it; a resumed run first loads the
    run's compile cache. Returns how, for the log and settings.json: on, off or skipped (why).
    Before DDP wraps it: torch.compile(DDP(model)), PyTorch's advice, compiled no graph at all
    under torchrun on the CPU (torch 2.14.1: Dynamo stops at DDP's _inside_ddp_forward). DDP then
    gets the gradients when the compiled backward ends, so its all-reduce overlaps less with it."""
    if not settings.compile:
        return "off"
    if model.on_features:
        return "skipped: under the feature cache only the Linear head trains, where compiling costs more than it saves"
    if resumed and cache.in_run:
        cache.load()
    # Static shapes, one graph: every batch the compiled model sees is JOB_BATCH_SIZE (the epoch's
    # last, partial batch runs eagerly: loop.train_one_epoch). Measured: 1 graph and no recompile
    # over any number of epochs; compiling that batch cost a second graph (static) or, with the
    # default dynamic=None, a recompile into a graph with a symbolic batch size.
    model.net = cast(torch.nn.Module, torch.compile(model.net, dynamic=False))
    cache.active, cache.epochs = True, epochs
    return f"on (Inductor, static shapes; caches in {os.environ.get('TORCHINDUCTOR_CACHE_DIR')})"


@dataclass
class CompileCache:
    """The run's torch.compile cache, <run>/compile/cache.bin: Inductor's and AOTAutograd's
    compiled graphs (torch.compiler.save_cache_artifacts; on CUDA Inductor bundles Triton's kernels),
    saved once per process after its first epoch, when every graph of an epoch is compiled, and
    loaded when the run resumes, so a new pod skips most of the compiling (on the CPU, Inductor
    compiles its C++ kernels again from the cached source). Only with JOB_COMPILE_CACHE=run: the
    cache is code (pickled graphs, run when used), so loading it from the run's storage lets
    whoever can write there run code in the job, where checkpoints are loaded as weights only.
    By default the caches stay under JOB_CACHE_DIR on the node."""

    uri: str
    in_run: bool = False  # JOB_COMPILE_CACHE=run: saved with the run and loaded on resume
    active: bool = False  # compiling, and this process has not saved the cache yet
    epochs: int = 0  # the history's length when this process began training
    loaded: bool = False

    def load(self) -> None:
        """Fill the local caches from the run's; a cache that is missing or unreadable only
        means compiling from scratch."""
        shown = storage.redact_uri(self.uri)
        try:
            blob = storage.read_bytes(self.uri, max_bytes=COMPILE_CACHE_MAX_BYTES)
        except FileNotFoundError:
            log.info("no compile cache in the run yet: compiling from scratch")
            return
        except Stopped:
            raise
        except Exception as exc:
            log.warning(f"could not read the compile cache {shown} ({exc.__class__.__name__}); compiling from scratch")
            return
        quiet = logging.getLogger("torch.compiler._cache")  # it logs a traceback for bytes it cannot read
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            info = torch.compiler.load_cache_artifacts(blob) if len(blob) <= COMPILE_CACHE_MAX_BYTES else None
        except Exception:
            info = None
        finally:
            quiet.setLevel(level)
        if info is None:
            log.warning(f"the compile cache {shown} is unreadable (or over {COMPILE_CACHE_MAX_BYTES >> 20} MB); "
                        "compiling from scratch")
            return
        self.loaded = True
        graphs = sum(len(keys) for keys in getattr(info, "artifacts", {}).values())
        log.info(f"compile cache: {graphs} compiled artifacts loaded from {shown}")

    def take(self, epochs: int) -> bytes | None:
        """The cache to save, once this process has trained an epoch (`epochs`: the history's
        length now); None before, and after it has been taken."""
        if not self.active or epochs <= self.epochs:
            return None
        self.active = False
        stats = compile_stats()
        if stats:
            warm = " (warm: the run's compile cache loaded)" if self.loaded else ""
            log.info(f"compile: {stats[0]} graph(s) compiled in {stats[1]:.1f} s{warm}")
        if not self.in_run:
            return None
        artifacts = torch.compiler.save_cache_artifacts()
        return artifacts[0] if artifacts else None


def compile_stats() -> tuple[int, float] | None:
    """(graphs Dynamo compiled, seconds spent compiling forward and backward graphs) in this
    process, from Dynamo's counters: not a public API, so a log detail only (None if it changed)."""
    try:
        from torch._dynamo import utils

        times = utils.compilation_time_metrics
        seconds = sum(times.get("_compile.compile_inner", [])) + sum(times.get("backward._backward_impl", []))
        return int(utils.counters["stats"]["unique_graphs"]), seconds
    except (ImportError, AttributeError, KeyError, TypeError):
        return None

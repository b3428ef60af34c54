"""The multi-node entrypoint: torchrun running `python -m job` on every worker, exiting with the
job's own exit code.

torchrun exits 1 whenever a worker fails, whatever the worker's exit code, so a scheduler that acts
on exit codes (a podFailurePolicy, a JobSet failure policy) never sees 2, 3, 4 or 65 under it.
This module is torchrun: its argument parser (every option, and every option as a PET_* variable,
as Kubeflow Trainer and our manifests set them), its agent and its rendezvous
(`torch.distributed.run.run`). It only turns how torchrun ended into the job's exit code:

- a worker failed: the exit code of the first worker that failed (torchrun's root cause,
  `ChildFailedError.get_first_failure()`); a worker killed by a signal (SIGKILL from the OOM
  killer, a lost node) is a lost peer, 75;
- the launcher got SIGTERM or SIGINT (the kubelet's stop, forwarded by tini): torchrun forwards it
  to the workers and waits for them (they checkpoint and exit 143 within JOB_STOP_GRACE_SECONDS),
  then 128 + the signal: 143 or 130;
- the rendezvous failed (a peer never came, or went away): 75;
- SIGTERM or SIGINT while the rendezvous waits (no worker started): 143 or 130 at once, with
  nothing to save, though torchrun's rendezvous may be blocked in C++ where Python handlers cannot
  run (a static rendezvous waiting for its master or its peers retries for 15 minutes);
- torchrun's options are invalid: 2.

    python -m job.launch [torchrun options]      # or: trainjob-launch [torchrun options]
"""

import logging
import math
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Mapping

from job.errors import EXIT_CODES, JobError, PeerLostError, SettingsError
from job.report import setup_logging
from job.settings import Settings

log = logging.getLogger("job")

# torchrun waits this long past the job's stop grace before it kills the workers (SIGKILL).
SHUTDOWN_MARGIN_SECONDS = 5


class _Stopped(BaseException):
    """A stop signal before torchrun's own handlers are installed (they are once the workers start).
    A BaseException, so no `except Exception` in the rendezvous code swallows it."""

    def __init__(self, signum: int):
        self.signum = signum


def _stop_before_start(signum, frame):
    raise _Stopped(signum)


class _RendezvousWatch(threading.Thread):
    """Sees stop signals and progress while torchrun's rendezvous blocks the main thread.

    A static rendezvous connects to its master, and waits for its peers, inside C++ (TCPStore),
    which retries on EINTR and never returns to the interpreter: the Python handler of a SIGTERM
    then runs 15 minutes later, and the wait says nothing meanwhile. The interpreter's C handler
    still writes each signal's number to the wakeup fd at once; this thread reads it there. With no
    worker started (this process has no child) there is nothing to save: it logs and exits
    128 + the signal. Once workers run, torchrun's own handler (in the main thread, which is then in
    Python) forwards the signal and waits for them, and this thread leaves it alone."""

    SETTLE_SECONDS = 1.0  # the main thread's own handler goes first, when it can run at all

    def __init__(self, every: float):
        super().__init__(name="rendezvous-watch", daemon=True)
        self.every = every
        self.waiting_since: float | None = None  # set while torchrun.run may be in its rendezvous
        self.endpoint = ""  # the rendezvous endpoint, for the log
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def run(self) -> None:
        last_log = time.monotonic()
        while True:
            ready, _, _ = select.select([self.read_fd], [], [], min(self.every, 5.0))
            if ready:
                for signum in os.read(self.read_fd, 64):
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        time.sleep(self.SETTLE_SECONDS)
                        if self.waiting_since is not None and not _children():
                            self._exit(signum)
            elif self.waiting_since is not None and time.monotonic() - last_log >= self.every and not _children():
                last_log = time.monotonic()
                log.info(f"launcher: waiting {last_log - self.waiting_since:.0f} s so far for the rendezvous at "
                         f"{self.endpoint} (the master node's endpoint, or the other nodes to join)")

    @staticmethod
    def _exit(signum: int) -> None:
        code = 128 + signum
        log.warning(f"launcher stopped by signal {signum} while waiting for the rendezvous, before the workers "
                    f"started: nothing to save (exit {code})")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)  # the main thread is inside C++ and would not return for minutes


def _children() -> bool:
    """Whether this process has a child (torchrun starts workers as children)."""
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    # pid (comm) state ppid ...: comm may hold spaces and parentheses
                    if f.read().rsplit(b")", 1)[1].split()[1].decode() == me:
                        return True
            except (OSError, IndexError):
                continue
    return False


def log_every_seconds(env: Mapping[str, str]) -> float:
    """JOB_LOG_EVERY_SECONDS as the workers read it (its default when unset or refused)."""
    every = Settings.model_fields["log_every_seconds"].default
    try:
        every = float(env.get("JOB_LOG_EVERY_SECONDS", every))
    except ValueError:
        pass
    return every if math.isfinite(every) and every > 0 else Settings.model_fields["log_every_seconds"].default


def shutdown_timeout(env: Mapping[str, str]) -> int:
    """Seconds torchrun waits for the workers after forwarding a stop signal: the job's stop grace
    plus a margin. torchrun's default (30 s) would kill workers still saving under a longer
    JOB_STOP_GRACE_SECONDS; a value the job refuses leaves the default (the workers report it)."""
    grace = Settings.model_fields["stop_grace_seconds"].default
    try:
        grace = float(env.get("JOB_STOP_GRACE_SECONDS", grace))
    except ValueError:
        pass
    if not math.isfinite(grace) or grace <= 0:
        grace = Settings.model_fields["stop_grace_seconds"].default
    return math.ceil(grace) + SHUTDOWN_MARGIN_SECONDS


def worker_exit_code(exitcode: int) -> int:
    """The job's exit code for a failed worker: its own, or 75 (a lost peer, retry) when a signal
    killed it (torchrun reports those as minus the signal number)."""
    return exitcode if exitcode > 0 else PeerLostError.exit_code


def _recorded(failure) -> dict:
    """What the job wrote in a worker's error file (job.cli.record_for_launcher); {} for a worker
    that wrote none (killed by a signal)."""
    message = failure.error_file_data.get("message")
    info = message.get("extraInfo", {}) if isinstance(message, dict) else {}
    return info if isinstance(info.get("failed_at"), (int, float)) else {}


def first_failure(failures: dict) -> int:
    """The global rank of the worker that failed first. torchrun's own choice
    (`ChildFailedError.get_first_failure`) compares whole seconds, and a worker without an error file
    gets the second torchrun noticed it: a rank that failed on its own and the rank that failed
    because of it tie, and the lower rank, often the relay, was named. In order: a worker that
    failed on its own rather than relaying another's failure (a lost peer, a failure posted by
    another rank, a stop), as its error file says, the earliest to the microsecond; then one that wrote
    none (killed by a signal: by the OOM killer, or by torchrun stopping the rest), in the order
    torchrun saw them; a relay last."""
    recorded = {rank: _recorded(f) for rank, f in failures.items()}
    seen = {rank: i for i, rank in enumerate(failures)}  # torchrun's order: those that ended first come first

    def order(rank: int):
        info = recorded[rank]
        return (bool(info.get("relayed")), not info, info.get("failed_at", 0.0), seen[rank])

    return min(failures, key=order)


def worker_line(failure) -> str:
    """The one line a failed worker reported (its last ERROR line), from its error file; "" when
    it left none."""
    message = failure.error_file_data.get("message")
    line = message.get("message") if isinstance(message, dict) else None  # torchrun's "<NONE>" is a str
    return " ".join(str(line).split())[:1000] if line else ""


def parse_args(argv: list[str]):
    """torchrun's own options, with `-m job` as the program; raises SettingsError for anything else."""
    from torch.distributed import run as torchrun

    parser = torchrun.get_args_parser()
    parser.prog = "python -m job.launch"
    parser.description = ("torchrun running `python -m job` on every worker and exiting with the job's exit code. "
                          "Takes torchrun's options (or their PET_* variables); the job itself is configured by JOB_*.")
    args = parser.parse_args([*argv, "--module", "job"])  # argparse exits 0 on --help, 2 on an unknown option
    if args.training_script != "job" or args.training_script_args or args.no_python or args.run_path:
        raise SettingsError(f"python -m job.launch takes torchrun's options only, got {' '.join(argv)!r}; "
                            "it always runs `python -m job` (configured by JOB_* variables)")
    if getattr(args, "shutdown_timeout", 0) is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = shutdown_timeout(os.environ)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_before_start)
    setup_logging()
    watch = _RendezvousWatch(log_every_seconds(os.environ))
    watch.start()
    try:
        args = parse_args(argv)
        watch.endpoint = args.rdzv_endpoint or f"{args.master_addr}:{args.master_port}"
        watch.waiting_since = time.monotonic()
        try:
            return launch(args)
        finally:
            watch.waiting_since = None
    except _Stopped as stop:
        code = 128 + stop.signum
        log.warning(
            f"launcher stopped by signal {stop.signum} before the workers started: nothing to save (exit {code})"
        )
        return code
    except JobError as exc:
        log.error(f"{exc} (exit {exc.exit_code})")
        return exc.exit_code


def launch(args) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError

    try:
        torchrun.run(args)
        return 0
    except ChildFailedError as exc:
        rank = first_failure(exc.failures)
        exc.failures = {rank: exc.failures[rank], **exc.failures}  # torchrun's table agrees: its tie goes first
        print(exc.format_msg(), file=sys.stderr, flush=True)  # torchrun's table of the failed workers
        failure = exc.failures[rank]
        code = worker_exit_code(failure.exitcode)
        how = (
            f"was killed by signal {-failure.exitcode} ({failure.signal_name()}): a lost process"
            if failure.exitcode < 0
            else f"exited {failure.exitcode}"
        )
        meaning = EXIT_CODES.get(code, ("", ""))[0]
        said = worker_line(failure)
        log.error(
            f"launcher: worker rank {rank} (local rank {failure.local_rank}) {how}, the first to fail; "
            f"exit {code}{': ' + meaning if meaning else ''}{f'; rank {rank} said: {said}' if said else ''}"
        )
        return code
    except SignalException as exc:
        # torchrun forwarded the signal to the workers and waited for them (--shutdown-timeout)
        code = 128 + exc.sigval
        log.warning(
            f"launcher stopped by signal {int(exc.sigval)} ({exc.sigval.name}): the workers were told to "
            f"save and stop (exit {code})"
        )
        return code
    except RendezvousError as exc:
        detail = str(exc).splitlines()[0][:300] if str(exc) else ""
        log.error(
            f"launcher: the rendezvous failed ({type(exc).__name__}{': ' + detail if detail else ''}): a peer did "
            f"not come or went away; retrying can help (exit {PeerLostError.exit_code})"
        )
        return PeerLostError.exit_code
    except (ValueError, AssertionError) as exc:
        # torchrun checks its options as it starts: an unsupported --nproc-per-node, --nnodes MIN > MAX,
        # a static rendezvous endpoint without a port, ...
        log.error(
            f"launcher: torchrun refused its options ({exc}); check the torchrun options or PET_* variables "
            f"(exit {SettingsError.exit_code})"
        )
        return SettingsError.exit_code


if __name__ == "__main__":
    sys.exit(main())

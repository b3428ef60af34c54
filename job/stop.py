"""Stopping, in one place: SIGTERM (Kubernetes, Docker, spot reclaim) and SIGINT (a terminal).

The handler only records the signal; it never raises from wherever the main thread happens to be
(inside an import, a library's `except Exception`, a log write), which left half-imported
modules, swallowed stops and "bug" tracebacks. The job looks at the record at defined points:
before training at each phase and in every long loop (`check()`: exit 143 at once, nothing to
save), during training at step edges (the loop saves, then `Stopped` ends the run). Every wait
observes the grace period (`deadline()`); and as a last resort a watchdog ends the process a few
seconds after the grace period, whatever it is stuck in, so a stop is never held past it.

Installed first thing at start, before the slow imports, so a signal is never met by Python's
default action (which would exit with no summary and no meaningful code).
"""

import os
import signal
import threading
import time
from dataclasses import dataclass

from job.errors import Stopped

WATCHDOG_SLACK = 5.0  # seconds past the grace period before the watchdog ends the process


@dataclass
class StopRequest:
    """Set by SIGTERM/SIGINT. Before training starts a signal ends the job at the next check
    (nothing to save yet); once training owns the state (`deferred`), the loop polls `signum` and
    stops at a step edge after saving."""

    signum: int = 0
    at: float = 0.0  # time.monotonic() when the signal arrived; the grace period counts from here
    deferred: bool = False  # True while the training loop is able to save
    grace: float = 25.0  # JOB_STOP_GRACE_SECONDS, once the settings are read
    raised: bool = False  # a stop point has raised Stopped: the job is on its way out

    def handler(self, signum, frame):
        if self.signum:  # a second signal: the user insists
            _say(f"stopped by signal {signum} again: exiting at once (exit {128 + signum})")
            os._exit(128 + signum)
        self.record(signum)
        threading.Thread(target=self._watchdog, name="stop-watchdog", daemon=True).start()

    def record(self, signum: int) -> None:
        """What the handler does, less the watchdog (tests use it in process)."""
        self.signum, self.at = signum, time.monotonic()

    def check(self, detail: str = "before training: nothing to save") -> None:
        """A defined stop point outside the training loop: raise Stopped if a signal arrived."""
        if self.signum and not self.deferred:
            self.raised = True
            raise Stopped(self.signum, detail)

    def ends_waits(self) -> bool:
        """A wait (a storage call) must give way now: a signal before training, not yet raised.
        Once it has been, the job is on its way out and its records and lease release may use
        the grace period."""
        return bool(self.signum) and not self.deferred and not self.raised

    def deadline(self, grace_seconds: float | None = None) -> float:
        """When the grace period ends; from now for a rank told to stop by another rank (no local
        signal)."""
        return (self.at or time.monotonic()) + (self.grace if grace_seconds is None else grace_seconds)

    def install(self) -> "StopRequest":
        global _installed
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self.handler)
        _installed = self
        return self

    def _watchdog(self) -> None:
        end = self.at + self.grace + WATCHDOG_SLACK
        while time.monotonic() < end:  # the grace period may be set (read from the settings) meanwhile
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            end = self.at + self.grace + WATCHDOG_SLACK
        _say(f"stopped by signal {self.signum}: still running {self.grace + WATCHDOG_SLACK:g} s after it "
             f"(JOB_STOP_GRACE_SECONDS={self.grace:g}); exiting without a further record (exit {128 + self.signum})")
        os._exit(128 + self.signum)


_installed: StopRequest | None = None


def check(detail: str = "before training: nothing to save") -> None:
    """`StopRequest.check` of the installed request: for long loops that are not handed one."""
    if _installed is not None:
        _installed.check(detail)


def _say(message: str) -> None:
    """One log-format line straight to stdout's file descriptor: safe in a signal handler and in a
    thread while the main thread may hold the logging lock."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
    os.write(1, f"{stamp} WARNING {message}\n".encode())

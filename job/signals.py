"""Stop signals (SIGTERM from Kubernetes, Docker and spot reclaim; SIGINT from a terminal).

Installed first thing at start, before the slow imports, so a signal is never met by Python's
default action (which would exit with no summary and no meaningful code).
"""

import signal
import threading
import time
from dataclasses import dataclass

from job.errors import Stopped


@dataclass
class StopRequest:
    """Set by SIGTERM/SIGINT. Before training starts a signal ends the job at once (nothing to
    save yet); once training owns the state, the loop polls `signum` and stops at a step edge."""

    signum: int = 0
    at: float = 0.0  # time.monotonic() when the signal arrived; the grace period counts from here
    deferred: bool = False  # True while the training loop is able to save

    def handler(self, signum, frame):
        if self.signum:  # a second signal: the user insists
            raise Stopped(signum, "again: exiting at once")
        self.signum, self.at = signum, time.monotonic()
        if not self.deferred:
            raise Stopped(signum)

    def deadline(self, grace_seconds: float) -> float:
        """When the grace period ends; from now for a rank told to stop by another rank (no local signal)."""
        return (self.at or time.monotonic()) + grace_seconds

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self.handler)
        return self

"""Errors a user or a scheduler can act on, and the exit code each one ends the job with.

The table is a public contract: the README documents it and the Kubernetes podFailurePolicy is
generated from it (tests import it from here rather than copying the numbers).
"""

# exit code -> (meaning, what a scheduler should do with it)
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("completed", "done"),
    1: ("unexpected error (a bug: please report it with the log)", "retry"),
    2: ("invalid settings", "fail at once"),
    3: ("dataset or checkpoint missing, invalid or incompatible", "fail at once"),
    4: ("output location or local cache not writable (or full)", "fail at once"),
    65: ("training diverged or cannot learn (NaN/inf loss; in smoke mode, a loss that does not fall)", "fail at once"),
    75: ("transient failure: storage after retries, or a lost peer process", "retry"),
    130: ("stopped by SIGINT after saving a checkpoint", "retry"),
    143: ("stopped by SIGTERM after saving a checkpoint", "retry"),
}


class JobError(Exception):
    """An error with a one-line message for the person on call and an exit code for the scheduler."""

    exit_code = 1


class SettingsError(JobError):
    exit_code = 2


class DataError(JobError):
    exit_code = 3


class OutputError(JobError):
    exit_code = 4


class CacheError(JobError):
    """The local dataset cache (JOB_CACHE_DIR) cannot be written or has no room."""

    exit_code = 4


class DivergedError(JobError):
    exit_code = 65


class TransientStorageError(JobError):
    exit_code = 75


class PeerLostError(JobError):
    """A collective failed: another process of a distributed run died or cannot be reached."""

    exit_code = 75


class Stopped(JobError):
    """The job stops on a signal; carries 128 + signal number and says what was saved."""

    def __init__(self, signum: int, detail: str = "before training: nothing to save"):
        super().__init__(f"stopped by signal {signum} {detail}")
        self.exit_code = 128 + signum

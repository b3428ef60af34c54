"""Errors a user or a scheduler can act on, and the exit code each one ends the job with.

EXIT_CODES is a public contract, built from the classes below: the README documents it and the
Kubernetes podFailurePolicy is generated from it (tests import it from here rather than copying
the numbers).
"""

from pydantic import AfterValidator, ValidationError


class JobError(Exception):
    """An error with a one-line message for the person on call and an exit code for the scheduler."""

    exit_code = 1
    meaning = "unexpected error (a bug: please report it with the log)"
    action = "retry"  # what a scheduler should do with the exit code
    run_uri = ""  # the run it ended, once known: the last log line names it


class SettingsError(JobError):
    exit_code, meaning, action = 2, "invalid settings, or credentials missing or refused by the store", "fail at once"


class CredentialsError(SettingsError):
    """The object store refused our credentials (or a bucket policy denies them), wherever it
    happened: the fix is the same, so the exit code is too."""


class DataError(JobError):
    exit_code, meaning, action = 3, "dataset or checkpoint missing, invalid or incompatible", "fail at once"


class OutputError(JobError):
    exit_code, meaning, action = 4, "output location or local cache not writable (or full)", "fail at once"


class CacheError(OutputError):
    """The local dataset cache (JOB_CACHE_DIR) cannot be written or has no room."""


class DivergedError(JobError):
    exit_code, action = 65, "fail at once"
    meaning = "training diverged or cannot learn (NaN/inf loss; in smoke mode, a loss that does not fall)"


class TransientStorageError(JobError):
    exit_code, action = 75, "retry"
    meaning = ("transient failure: the store unreachable, timing out, throttling or failing (5xx) after retries or "
               "its time bound, a lost peer process, or another job writing the run")


class PeerLostError(TransientStorageError):
    """A collective failed: another process of a distributed run died or cannot be reached."""


class Stopped(JobError):
    """The job stops on a signal; carries 128 + signal number and says what was saved."""

    action = "retry"

    def __init__(self, signum: int, detail: str = "before training: nothing to save"):
        super().__init__(f"stopped by signal {signum} {detail}")
        self.signum, self.exit_code = signum, 128 + signum


class StoppedWaitingForData(Stopped):
    """A stop arrived while the loop waited for its next batch (a stalled download): the last
    step edge is a consistent state to save."""


# exit code -> (meaning, what a scheduler should do with it)
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("completed", "done"),
    **{
        cls.exit_code: (cls.meaning, cls.action)
        for cls in (JobError, SettingsError, DataError, OutputError, DivergedError, TransientStorageError)
    },
    130: ("stopped by SIGINT, after saving a checkpoint if storage took it within the grace period", Stopped.action),
    143: ("stopped by SIGTERM, after saving a checkpoint if storage took it within the grace period", Stopped.action),
}


# What reading a record's fields raises when one is malformed (a checkpoint edited and re-signed):
# a DataError naming the record, never a traceback.
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError)


def format_version(expected: int) -> AfterValidator:
    """A record's `format_version` field (index.json, config.json): this job reads `expected` only."""

    def check(version: int) -> int:
        if version != expected:
            raise ValueError(f"format_version {version!r}, this job reads {expected}")
        return version

    return AfterValidator(check)


def one_line(error: ValidationError) -> tuple[str, str]:
    """(where, what) of a record's first problem, for a one-line message."""
    first = error.errors()[0]
    return ".".join(str(p) for p in first["loc"]), first["msg"].removeprefix("Value error, ")

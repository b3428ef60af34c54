"""One classifier from a storage exception to an exit code (job.storage.classify), as a table: 75
("retry") only for what may succeed on a rerun, 2 for credentials with the fix in the message,
the caller's permanent code (3 data, 4 output) for the rest, and anything that is not a storage
error passed through (a bug stays a bug)."""

import errno

import pytest
from aiohttp.client_exceptions import ServerDisconnectedError
from botocore.exceptions import (
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from job.errors import DataError, OutputError
from job.storage import classify

REMOTE, LOCAL = "s3://bucket/data", "/tmp/data"
TABLE = {  # name: (exception, uri, the caller's error class, exit code, words the message must hold)
    "missing object": (FileNotFoundError("k"), REMOTE, DataError, 3, "not found"),
    "a name too long": (OSError(errno.ENAMETOOLONG, "File name too long"), LOCAL, DataError, 3, "too long"),
    "a symlink loop": (OSError(errno.ELOOP, "Too many levels of symbolic links"), LOCAL, DataError, 3, "symbolic"),
    "a redirect to another region": (OSError(errno.EREMCHG, "PermanentRedirect"), REMOTE, DataError, 3, "Redirect"),
    "a bad request": (OSError(errno.EINVAL, "InvalidArgument"), REMOTE, OutputError, 4, "InvalidArgument"),
    "a full disk": (OSError(errno.ENOSPC, "No space left on device"), LOCAL, OutputError, 4, "No space"),
    "a failing local disk": (OSError(errno.EIO, "Input/output error"), LOCAL, OutputError, 4, "Input/output"),
    "SlowDown / 503": (OSError(errno.EBUSY, "SlowDown"), REMOTE, DataError, 75, "after retries"),
    "500 InternalError": (OSError(errno.EREMOTEIO, "InternalError"), REMOTE, DataError, 75, "after retries"),
    "an unknown store answer": (OSError(errno.EIO, "WeirdError"), REMOTE, OutputError, 75, "after retries"),
    "a connection reset": (ConnectionResetError(errno.ECONNRESET, "reset"), REMOTE, DataError, 75, "after retries"),
    "a timeout": (TimeoutError("timed out"), REMOTE, DataError, 75, "after retries"),
    "no endpoint": (EndpointConnectionError(endpoint_url="http://x"), REMOTE, DataError, 75, "after retries"),
    "a read timeout": (ReadTimeoutError(endpoint_url="http://x"), REMOTE, OutputError, 75, "after retries"),
    "server went away": (ServerDisconnectedError(), REMOTE, DataError, 75, "after retries"),
    "refused credentials": (PermissionError("AccessDenied"), REMOTE, DataError, 2, "refused our credentials"),
    "a local path we may not read": (PermissionError(errno.EACCES, "denied"), LOCAL, DataError, 3, "permission denied"),
    "no credentials at all": (NoCredentialsError(), REMOTE, DataError, 2, "set AWS_ACCESS_KEY_ID"),
    "half the credentials": (PartialCredentialsError(provider="env", cred_var="x"), REMOTE, OutputError, 2,
                             "no credentials found"),
    "a request botocore refuses": (ParamValidationError(report="bad key"), REMOTE, DataError, 3, "bad key"),
}


@pytest.mark.parametrize("case", TABLE)
def test_a_storage_exception_gets_the_exit_code_its_cause_calls_for(case):
    exc, uri, error, code, words = TABLE[case]
    found = classify(exc, uri, error, "read")
    assert found.exit_code == code and words in str(found), (found, found.exit_code)
    assert uri.split("/")[-1] in str(found) and "\n" not in str(found)


def test_what_is_not_a_storage_error_stays_what_it_is():
    bug = ValueError("a bug of ours")
    assert classify(bug, REMOTE, DataError, "read") is bug
    known = DataError("already one line")
    assert classify(known, REMOTE, OutputError, "read") is known

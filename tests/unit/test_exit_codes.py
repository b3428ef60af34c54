"""One classifier from a storage exception to an exit code (job.storage.classify), as a table: 75
("retry") only for what may succeed on a rerun, 2 for credentials with the fix in the message,
the caller's permanent code (3 data, 4 output) for the rest, and anything that is not a storage
error passed through (a bug stays a bug)."""

import errno
import json

import pytest
from aiohttp.client_exceptions import ServerDisconnectedError
from botocore.exceptions import (
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from gcsfs.retry import validate_response

from job.errors import DataError, OutputError
from job.storage import classify

REMOTE, LOCAL, GCS = "s3://bucket/data", "/tmp/data", "gs://bucket/data"


def gcs_answer(status: int, message: str) -> Exception:
    """What gcsfs raises for this answer of GCS: its own code builds it (status codes:
    cloud.google.com/storage/docs/json_api/v1/status-codes)."""
    try:
        validate_response(status, json.dumps({"error": {"code": status, "message": message}}).encode(), "b/bucket/o")
    except Exception as exc:
        return exc
    raise AssertionError(f"gcsfs accepted status {status}")

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
    "GCS: 503": (gcs_answer(503, "Backend Error"), GCS, DataError, 75, "after retries"),
    "GCS: 429 rate limit": (gcs_answer(429, "rateLimitExceeded"), GCS, OutputError, 75, "after retries"),
    "GCS: 502 (gcsfs raises requests' ProxyError)": (gcs_answer(502, "Bad Gateway"), GCS, DataError, 75,
                                                       "after retries"),
    "GCS: missing object": (gcs_answer(404, "No such object"), GCS, DataError, 3, "not found"),
    "GCS: 401, no credentials found (gcsfs went anonymous)": (
        gcs_answer(401, "Anonymous caller does not have storage.objects.get access"), GCS, DataError, 2,
        "GOOGLE_APPLICATION_CREDENTIALS"),
    "GCS: 403, an identity without the role": (gcs_answer(403, "sa does not have storage.objects.create access"),
                                                 GCS, OutputError, 2, "refused our credentials"),
    "GCS: a bucket name it does not accept": (gcs_answer(400, "Invalid bucket name: 'Bad_Bucket!'"), GCS, DataError,
                                              3, "Invalid bucket name"),
    "GCS: another bad request": (gcs_answer(400, "Required parameter missing"), GCS, OutputError, 4, "Required"),
    # gcsfs raises a builtin ValueError("Bad Request: ...") for a 400 whose message says "invalid"
    "GCS: a 400 gcsfs raises as ValueError": (gcs_answer(400, "the object name is invalid"), GCS, DataError, 3,
                                              "Bad Request"),
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

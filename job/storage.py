"""All storage goes through fsspec URLs here: local paths, file://, s3://, gs://, az://, memory://.

The rest of the job never imports s3fs or gcsfs: what differs between stores (options, exclusive
creation, how a refusal of our credentials looks) is one row of STORES. Object-store writes are
atomic by nature (a key appears only when its upload completes); local writes go to a temporary
name and are renamed.

Every operation is bounded in time (JOB_STORAGE_TIMEOUT_SECONDS, retries included), logs a line
while it waits, and gives way to a stop signal's grace period: a frozen or failing store ends the
job with exit 75 (or 143 after a stop), never a hang.
"""

import contextlib
import errno
import functools
import importlib
import json
import logging
import math
import os
import posixpath
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from job.errors import CredentialsError, JobError, SettingsError, Stopped, TransientStorageError
from job.settings import redact_uri
from job.stop import StopRequest

log = logging.getLogger("job")
TMP_MARK = ".tmp-"  # local temporary files: <name>.tmp-<8 hex>; a dead writer's are removed at start
# Exactly what tmp_name() makes: the sweep must never take a user's `predictions.tmp-final.jsonl`.
TMP_NAME = re.compile(r".+\.tmp-[0-9a-f]{8}")
# A name a record (a checkpoint pointer, a manifest, a model config) may give a file beside it:
# no separator, no `..`, no leading dot, so a name read from storage can never be a path.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
MIN_BYTES_PER_SECOND = 1 << 20  # the time bound grows by 1 s per MB moved: big uploads are not hangs


@dataclass
class Config:
    retries: int = 10  # botocore attempts per request
    timeout: float = 300.0  # seconds one operation may take, retries included
    log_every: float = 10.0
    stop: StopRequest | None = None  # the StopRequest: after a signal, waits end with its grace period


_config = Config()
_local = threading.local()  # .deadline: an end set by time_limit() for this thread's operations


def log_every() -> float:
    """JOB_LOG_EVERY_SECONDS, for progress lines of long storage work."""
    return _config.log_every


def configure(settings, stop=None) -> None:
    global _config
    _config = Config(settings.storage_retries, settings.storage_timeout_seconds, settings.log_every_seconds, stop)
    if stop is not None:
        stop.grace = settings.stop_grace_seconds  # the watchdog's, and every wait's, grace period


def _never(exc: BaseException) -> bool:
    return False


@dataclass(frozen=True)
class Store:
    """What the job must know about one kind of object store (one row per store; local and memory too)."""

    name: str  # for messages: "S3", "GCS", "local disk"
    options: Callable[[Config], dict]  # fsspec kwargs: retries, connect/read timeouts, no listings cache
    create: Callable[[Any, str, bytes], None] | None  # write only if absent, FileExistsError if present; None: cannot
    refused: Callable[[BaseException], bool]  # the store refused our credentials (-> CredentialsError, exit 2)
    credentials: str = ""  # where this store's credentials come from: the fix a refusal's message names
    transient: Callable[[BaseException], bool] = _never  # the library's own errors worth a rerun (exit 75)
    rejected: Callable[[BaseException], bool] = _never  # the store's "bad request", raised as a builtin: permanent
    extra: str = ""  # the trainjob extra that installs its fsspec library ("": always installed)
    fs_class: str = ""  # "module:Class" where the job must not take the class fsspec's registry names
    noisy_logger: str = ""  # a library logger that prints a traceback for each error it raises: silenced
    missing: Callable[[BaseException], bool] = _never  # no credentials found, beyond MISSING_CREDENTIALS' classes


def _s3_options(config: Config) -> dict:
    # botocore's standard retry mode: exponential backoff with jitter on 5xx, throttling
    # (SlowDown), connection errors and timeouts; bounded timeouts so a stalled transfer
    # fails instead of hanging (marin-community/marin#9209). Listings are not cached so a
    # pointer written by another process is always read fresh.
    return {
        "config_kwargs": {"retries": {"max_attempts": config.retries, "mode": "standard"},
                          "connect_timeout": 10, "read_timeout": 60},
        "use_listings_cache": False,
    }


def _s3_refused(exc: BaseException) -> bool:
    """403/AccessDenied/ExpiredToken (s3fs: PermissionError), or a bare 400 on a HEAD request,
    which carries no error code (an expired token, or a signature for the wrong region, as S3
    answers HEAD; s3fs turns it into EINVAL)."""
    if isinstance(exc, PermissionError):
        return True
    cause = exc.__cause__
    return (
        isinstance(exc, OSError)
        and exc.errno == errno.EINVAL
        and cause is not None
        and getattr(cause, "operation_name", "") == "HeadObject"
        and getattr(cause, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") == 400
    )


def _pipe_create(fs, path: str, data: bytes) -> None:
    """fsspec's exclusive write: s3fs sends `If-None-Match: *`, gcsfs `ifGenerationMatch=0`, and
    each turns the store's 412 into FileExistsError; adlfs sends `If-None-Match: *` and turns Azure's
    409 BlobAlreadyExists into FileExistsError; memory:// checks its dict."""
    fs.pipe_file(path, data, mode="create")


def _local_create(fs, path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _no_options(config: Config) -> dict:
    return {}


def _gcs_options(config: Config) -> dict:
    import aiohttp

    # gcsfs retries each request itself, 6 attempts with backoff 1, 2, 4, 8, 16 s on 5xx, 408,
    # 429, connection errors and timeouts (gcsfs/retry.py, retry_request): a count fixed when the
    # class is defined, which JOB_STORAGE_RETRIES cannot change; JOB_STORAGE_TIMEOUT_SECONDS bounds
    # it as it bounds every operation. Connect and read timeouts as for S3 (a stalled read fails
    # and is retried), no total: a big checkpoint takes as long as it takes. No listings cache.
    return {"requests_timeout": aiohttp.ClientTimeout(sock_connect=10, sock_read=60), "use_listings_cache": False}


def _gcs_refused(exc: BaseException) -> bool:
    """gcsfs raises a bare OSError("Forbidden: ...") for 403 and HttpError(code=401) for 401 (an
    invalid or expired token, or an anonymous caller: gcsfs falls back to no credentials when it
    finds none, and the store then answers 401)."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return exc.errno is None and str(exc).startswith("Forbidden: ")
    if _gcs_key_refused(exc):
        return True
    return type(exc).__name__ == "HttpError" and type(exc).__module__.startswith("gcsfs") and \
        getattr(exc, "code", None) == 401


def _gcs_key_refused(exc: BaseException) -> bool:
    """A token refresh the identity provider refused for good (a revoked or invalid service-account
    key: invalid_grant): google-auth marks it not retryable, though gcsfs retries every RefreshError."""
    return type(exc).__name__ == "RefreshError" and type(exc).__module__.startswith("google.auth") and \
        not getattr(exc, "retryable", False)


def _gcs_rejected(exc: BaseException) -> bool:
    """gcsfs raises ValueError("Bad Request: ...") for a 400 that says invalid (a bucket name GCS
    does not accept, say): the store's answer, not a bug of ours."""
    return isinstance(exc, ValueError) and str(exc).startswith("Bad Request: ")


def _gcs_transient(exc: BaseException) -> bool:
    """What gcsfs itself retries (5xx, 408, 429, connection errors, a token refresh that failed
    for a passing reason), still failing once its attempts are spent."""
    if not type(exc).__module__.startswith(("gcsfs", "requests", "google")):
        return False
    if _gcs_key_refused(exc):
        return False
    from gcsfs.retry import is_retriable

    return is_retriable(exc)


def _azure_options(config: Config) -> dict:
    # job.azure_blob.AzureBlob (adlfs with its SDK client rebuilt): JOB_STORAGE_RETRIES attempts with
    # backoff on 5xx, 408, connection errors and timeouts, connect and read timeouts as for S3, on
    # every request. No listings cache.
    return {"attempts": config.retries, "connection_timeout": 10, "read_timeout": 60, "use_listings_cache": False}


def _azure_refused(exc: BaseException) -> bool:
    """An HTTP 401 or 403 (azure.core's HttpResponseError, or its ClientAuthenticationError): a
    wrong or rotated key, an expired SAS token, a refused token, or an identity with no role on the
    container. Azurite answers a wrong key with 403 AuthorizationFailure, the service with 403
    AuthenticationFailed."""
    return type(exc).__module__.startswith("azure.") and getattr(exc, "status_code", None) in (401, 403)


def _azure_missing(exc: BaseException) -> bool:
    """No credentials to try: adlfs found no account at all (its ValueError, raised as the
    filesystem is made), or DefaultAzureCredential found no source of a token (an error with no
    HTTP response)."""
    if isinstance(exc, ValueError) and "unable to connect to account" in str(exc):
        return True
    return type(exc).__name__ in ("ClientAuthenticationError", "CredentialUnavailableError") and \
        type(exc).__module__.startswith("azure.") and getattr(exc, "status_code", None) is None


def _azure_transient(exc: BaseException) -> bool:
    """What the SDK's retry policy retries (5xx, 408, connection errors and timeouts: azure.core's
    ServiceRequestError and ServiceResponseError), and 429, still failing once its attempts are spent."""
    if not type(exc).__module__.startswith("azure."):
        return False
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    return isinstance(exc, (ServiceRequestError, ServiceResponseError)) or \
        getattr(exc, "status_code", None) in (408, 429, 500, 502, 503, 504)


_S3 = Store("S3", _s3_options, _pipe_create, _s3_refused,
            credentials="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the pod's service "
            "account for IRSA / EKS Pod Identity), and check the bucket policy")
_GCS = Store("GCS", _gcs_options, _pipe_create, _gcs_refused, extra="gcs", transient=_gcs_transient,
             rejected=_gcs_rejected,
             credentials="set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, or give the pod a "
             "Kubernetes service account bound by GKE Workload Identity, and check the bucket's IAM roles",
             # gcsfs.GCSFileSystem is, by default (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=true, gcsfs
             # 2026.10), a class that asks the Storage Control API (gRPC) for each bucket's layout, with
             # a 60 s retry budget per call that our timeouts do not bound, and asks again after every
             # failed lookup (an emulator: 60 s per operation); the JSON API class is the one the job
             # needs (plain objects, not zonal buckets) and the one our options are for.
             fs_class="gcsfs.core:GCSFileSystem",
             # gcsfs logs each error it gives up on with logger.exception; the job reports it in one line
             noisy_logger="gcsfs")
_AZURE = Store("Azure Blob", _azure_options, _pipe_create, _azure_refused, extra="azure", transient=_azure_transient,
               missing=_azure_missing, fs_class="job.azure_blob:AzureBlob",
               # DefaultAzureCredential logs each source it tried as a multi-line WARNING, unmasked
               noisy_logger="azure.identity",
               credentials="set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with "
               "AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, or AZURE_STORAGE_ACCOUNT_NAME alone with the "
               "pod's AKS Workload Identity; and check the identity's role on the container (Storage Blob Data "
               "Contributor)")
_LOCAL = Store("local disk", _no_options, _local_create, _never)
# A protocol without a row is read with fsspec's defaults and cannot hold a lease.
_UNKNOWN = Store("an unknown store", _no_options, None, _never, "check its credentials")
STORES: dict[str, Store] = {
    "s3": _S3,
    "s3a": _S3,
    "gs": _GCS,
    "gcs": _GCS,
    "az": _AZURE,
    "abfs": _AZURE,
    "abfss": _AZURE,
    "file": _LOCAL,
    "local": _LOCAL,
    "memory": Store("memory", _no_options, _pipe_create, _never),
}


def protocol(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def store(uri: str) -> Store | None:
    """The row of STORES for the URI's protocol (None: a protocol the job knows nothing about)."""
    return STORES.get(protocol(uri))


def filesystem(uri: str):
    """(fs, path) for a URI; the filesystem object is cached by fsspec per set of options."""
    row = store(uri)
    if row is not None and row.noisy_logger:
        logging.getLogger(row.noisy_logger).setLevel(logging.CRITICAL)
    try:
        if row is not None and row.fs_class:
            module, name = row.fs_class.split(":")
            cls = getattr(importlib.import_module(module), name)
            # what fsspec.url_to_fs adds: options the URI itself carries (adlfs: the account of
            # abfss://container@account.dfs.core.windows.net/)
            return cls(**{**cls._get_kwargs_from_urls(uri), **row.options(_config)}), cls._strip_protocol(uri)
        return fsspec.core.url_to_fs(uri, **(row.options(_config) if row else {}))
    except ValueError as exc:  # adlfs refuses to make a filesystem with no account: exit 2, wherever it is made
        if row is None or not row.missing(exc):
            raise
        raise CredentialsError(f"{redact_uri(uri)}: no credentials found ({_short(exc)}); {row.credentials}") from None
    except ImportError as exc:  # fsspec names the missing library
        if row is None or not row.extra:
            raise
        raise SettingsError(f"{redact_uri(uri)}: {row.name} needs the trainjob[{row.extra}] extra ({_short(exc)}); "
                            f"pip install 'trainjob[{row.extra}]', or use the trainjob image, which has it") from None


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


# What may succeed if the job simply runs again (exit 75, "retry"): an allowlist. Everything else
# is permanent: retrying a name that is too long, a symlink loop or a FIFO only burns the
# scheduler's backoff. s3fs turns S3 codes into errnos (s3fs/errors.py): SlowDown, 503 and
# OperationAborted are EBUSY, 500 is EREMOTEIO, a code it does not know is EIO.
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE}
TRANSIENT_REMOTE_ERRNOS = {errno.EIO}  # an unknown answer from a store; on a local disk, EIO is a failing device
TRANSIENT_CLASSES = {  # connection failures and timeouts of the libraries under fsspec
    "botocore.exceptions": {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                            "ConnectTimeoutError", "ResponseStreamingError", "HTTPClientError", "ConnectionError"},
    "aiohttp.client_exceptions": {"ClientConnectionError", "ClientConnectorError", "ClientOSError",
                                  "ServerDisconnectedError", "ServerTimeoutError", "ConnectionTimeoutError",
                                  "SocketTimeoutError", "ClientPayloadError", "ClientConnectionResetError"},
}
MISSING_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                       "UnknownCredentialError", "DefaultCredentialsError"}
STORAGE_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "gcsfs", "google", "fsspec", "s3fs", "adlfs", "azure")


def _transient_class(exc: BaseException) -> bool:
    return any(c.__name__ in TRANSIENT_CLASSES.get(c.__module__, ()) for c in type(exc).__mro__)


def classify(exc: BaseException, uri: str, error: type[JobError], action: str) -> BaseException:
    """The one-line JobError for a storage exception (`exc` itself when it is not one): missing ->
    `error`; refused or missing credentials -> 2 with the fix; an allowlisted transient condition
    -> 75; any other storage error -> `error` (3 for data, 4 for outputs): permanent."""
    shown = redact_uri(uri)
    row = store(uri) or _UNKNOWN
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return error(f"cannot {action} {shown}: not found ({exc.__class__.__name__}); check the URI")
    if type(exc).__name__ in MISSING_CREDENTIALS or row.missing(exc):
        return CredentialsError(f"cannot {action} {shown}: no credentials found ({_short(exc)}); {row.credentials}")
    if isinstance(exc, PermissionError) and is_local(uri):
        return error(f"cannot {action} {shown}: permission denied (a local path: check its owner and mode)")
    if row.refused(exc):
        return CredentialsError(
            f"cannot {action} {shown}: the store refused our credentials ({_short(exc)}); {row.credentials}"
        )
    transient = (
        row.transient(exc)
        or _transient_class(exc)
        or isinstance(exc, (TimeoutError, ConnectionError))
        or (isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS)
        or (isinstance(exc, OSError) and exc.errno in TRANSIENT_REMOTE_ERRNOS and not is_local(uri))
    )
    if transient:
        return TransientStorageError(f"cannot {action} {shown} after retries: {_short(exc)}")
    if isinstance(exc, OSError):
        return error(f"cannot {action} {shown}: {exc.strerror or os.strerror(exc.errno) if exc.errno else _short(exc)}")
    if exc.__class__.__module__.split(".")[0] in STORAGE_LIBRARIES or row.rejected(exc):
        return error(f"cannot {action} {shown}: {_short(exc)}")
    return exc


@contextlib.contextmanager
def errors(uri: str, error: type[JobError], action: str):
    """Turn storage exceptions into one-line errors naming the URI (see `classify`)."""
    try:
        yield
    except Exception as exc:
        found = classify(exc, uri, error, action)
        if found is exc:
            raise
        raise found from None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # one line: botocore's messages run over several
    return f"{exc.__class__.__name__}: {text}"[:300]


@contextlib.contextmanager
def time_limit(seconds: float):
    """Bound every storage operation this thread starts inside the block by `seconds` in all:
    recording how a run ended must not take another full storage timeout when storage is why."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _local.deadline = previous


def stop_pending(share: float = 1.0) -> tuple[int, float]:
    """(signal, when `share` of its grace period has passed) of a stop signal received, or
    (0, inf): for waits that are not storage operations (a shard still downloading)."""
    stop = _config.stop
    if stop is None or not stop.signum:
        return 0, math.inf
    return stop.signum, stop.deadline(stop.grace * share)


def _in_thread(fn, name: str) -> tuple[threading.Event, dict]:
    """Start fn() in a daemon thread: (an event set when it ends, {"result" or "error": ...})."""
    box: dict = {}
    done = threading.Event()

    def work():
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name=name, daemon=True).start()
    return done, box


def _wait_slice(end: float, stop) -> float:
    """How long to wait before looking again: at most 0.5 s, and never past `end` or, after a
    stop signal, the end of the grace period."""
    if stop is not None and stop.signum:
        end = min(end, time.monotonic() if stop.ends_waits() else stop.deadline())
    return max(0.0, min(0.5, end - time.monotonic()))


def bounded(action: str, uri: str, fn, nbytes: int = 0):
    """Run fn() in a helper thread and wait for it, at most JOB_STORAGE_TIMEOUT_SECONDS (+1 s per
    MB), logging a line every JOB_LOG_EVERY_SECONDS meanwhile. After a stop signal the wait also
    ends with the grace period. The thread is abandoned on timeout: botocore's own timeouts end
    it later, and the job is on its way out (exit 75 or 143) by then.

    The calling thread stays responsive: a signal's handler runs during the wait."""
    start = time.monotonic()
    limit = _config.timeout + nbytes / MIN_BYTES_PER_SECOND
    if getattr(_local, "deadline", None) is not None:
        limit = max(0.0, min(limit, _local.deadline - start))
    done, box = _in_thread(fn, f"storage {action}")
    next_log = start + _config.log_every
    # Only the main thread answers a stop: a background upload that outlasts the grace period
    # is simply abandoned by the main thread, which then says which checkpoint is the valid one.
    stop = _config.stop if threading.current_thread() is threading.main_thread() else None
    while not done.wait(timeout=_wait_slice(start + limit, stop)):
        now = time.monotonic()
        if stop is not None and stop.ends_waits():  # before training: nothing to save, stop now
            stop.raised = True
            raise Stopped(stop.signum, f"while trying to {action} {redact_uri(uri)}")
        if stop is not None and stop.signum and now >= stop.deadline():
            raise Stopped(stop.signum, f"when the grace period ran out, still trying to {action} {redact_uri(uri)}")
        if now >= start + limit:
            raise TransientStorageError(
                f"cannot {action} {redact_uri(uri)}: no success within {limit:.0f} s (JOB_STORAGE_TIMEOUT_SECONDS="
                f"{_config.timeout:g}, retries included); the store is down, unreachable or refusing requests"
            )
        if now >= next_log:
            log.warning(
                f"storage: still trying to {action} {redact_uri(uri)} after {now - start:.0f} s "
                f"(retrying; gives up at {limit:.0f} s)"
            )
            next_log = now + _config.log_every
    if "error" in box:
        raise box["error"]
    return box["result"]


def operation(action: str):
    """Make a storage function bounded (see `bounded`) and give it one retry with fresh
    credentials: on a refusal, a new filesystem (a new botocore session) loads the credentials
    again, so keys rotated in a credentials file by a sidecar, or an expired session token, keep
    working (fsspec/s3fs#500, #632: ExpiredToken lost the final upload of a 12 h run). A real
    denial is refused again and reported as before."""

    def decorate(fn):
        def with_fresh_credentials(uri, *args, **kwargs):
            try:
                return fn(uri, *args, **kwargs)
            except Exception as exc:
                row = store(uri)
                if row is None or not row.refused(exc):
                    raise
                fs = filesystem(uri)[0]
                log.warning(
                    f"{redact_uri(uri)}: the store refused our credentials ({str(exc)[:120]}); "
                    "reloading them and retrying once"
                )
                type(fs).clear_instance_cache()
                return fn(uri, *args, **kwargs)

        @functools.wraps(fn)
        def wrapper(uri: str, *args, nbytes: int = 0, **kwargs):
            return bounded(action, uri, lambda: with_fresh_credentials(uri, *args, **kwargs), nbytes)

        return wrapper

    return decorate


def tmp_name(path: str) -> str:
    """A local temporary name beside `path`, renamed over it once complete."""
    return f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"


def write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@operation("read")
def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The object's bytes; with max_bytes, at most max_bytes + 1 of them (a ranged read: a huge
    object from an untrusted bucket is never read whole)."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem) and os.path.exists(path) and not os.path.isfile(path) and \
            not os.path.isdir(path):  # a FIFO would block the read for ever, a device never end it
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device or a socket)")
    return fs.cat_file(path) if max_bytes is None else fs.cat_file(path, start=0, end=max_bytes + 1)


def write_bytes(uri: str, data: bytes) -> None:
    """Write so that a reader sees the old object or the whole new one, never a part."""
    _write_bytes(uri, data, nbytes=len(data))


@operation("write")
def _write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        write_local(path, data)
    else:
        fs.pipe_file(path, data)


def create_bytes(uri: str, data: bytes) -> None:
    """Create an object that must not exist yet; FileExistsError if it does (S3 `If-None-Match:
    *`, GCS `ifGenerationMatch=0`, a local exclusive open): of several writers racing, exactly
    one succeeds. A store that cannot do this is refused (exit 2): the run's lease relies on it."""
    row = store(uri)
    if row is None or row.create is None:
        name = row.name if row else f"{protocol(uri)}://"
        raise SettingsError(f"{redact_uri(uri)}: {name} cannot create an object only if it is absent, which the run's "
                            "lease needs to keep a second writer out; put JOB_OUTPUT_URI on a store that can")
    _create_bytes(uri, data, row.create, nbytes=len(data))


@operation("create")
def _create_bytes(uri: str, data: bytes, create) -> None:
    fs, path = filesystem(uri)
    create(fs, path, data)


def create_json(uri: str, obj) -> None:
    create_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_json(uri: str, obj) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(uri: str):
    return json.loads(read_bytes(uri))


@operation("check")
def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


@operation("check")
def is_file(uri: str) -> bool:
    """`uri` is a file (an object), not a folder, a prefix or nothing. (s3fs answers False on any
    error, a refusal included: the read that follows reports it.)"""
    fs, path = filesystem(uri)
    return fs.isfile(path)


@operation("remove")
def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm_file(path)


@operation("copy")
def copy(src: str, dst: str) -> None:
    """Server-side copy on object stores (no re-upload); a local copy is published atomically."""
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(dst_path) or ".", exist_ok=True)
        tmp = tmp_name(dst_path)
        try:
            os.link(src_path, tmp)  # same directory: a hard link costs nothing
        except OSError:
            fs.copy(src_path, tmp)
        os.replace(tmp, dst_path)
    else:
        fs.copy(src_path, dst_path)


@operation("list")
def list_names(uri: str) -> list[str]:
    """Names of the files directly under a directory URI ([] when it does not exist)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


@operation("remove")
def remove_tree(uri: str) -> None:
    """Delete a directory URI and everything under it (used only for smoke outputs)."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_empty_dir(uri: str) -> None:
    """Remove a local directory if it is empty (object stores have no empty folders to tidy)."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def plain_name(name) -> bool:
    """`name` is a file name and nothing more (see PLAIN_NAME): a record's name is never a path."""
    return isinstance(name, str) and PLAIN_NAME.fullmatch(name) is not None


def within(uri: str, folder: str) -> bool:
    """`uri` is `folder` or lies under it (local paths compared with links and `..` resolved)."""
    fs, path = filesystem(uri)
    folder_fs, root = filesystem(folder)
    if type(fs) is not type(folder_fs):
        return False
    norm = os.path.realpath if isinstance(fs, LocalFileSystem) else posixpath.normpath
    path, root = norm(path), norm(root).rstrip("/")
    return path == root or path.startswith(root + "/")


def check_writable(uri: str) -> None:
    """Write and delete a probe object, so a bad output location fails before any training."""
    probe = join(uri, f".trainjob-probe-{uuid.uuid4().hex[:8]}")
    write_bytes(probe, b"ok")
    remove(probe)


def remove_stale_tmp(uri: str) -> int:
    """Delete temporary files a killed writer left under a local directory (object stores have
    none: an upload is atomic). Call only while holding the directory's lease. Returns how many."""
    fs, root = filesystem(uri)
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(root):
        return 0
    stale = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if TMP_NAME.fullmatch(f)]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return len(stale)


@operation("list")
def find(uri: str) -> dict:
    """{path: info} of every object under `uri` (fsspec's find with details)."""
    fs, root = filesystem(uri)
    return fs.find(root, detail=True)

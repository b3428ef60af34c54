"""All storage goes through fsspec URLs here: local paths, file://, s3://, gs://, memory://.

The rest of the job never imports s3fs. Object-store writes are atomic by nature (a key appears
only when its upload completes); local writes go to a temporary name and are renamed.
"""

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from job.errors import JobError, TransientStorageError
from job.settings import redact_uri

log = logging.getLogger("job")
CACHE_MANIFEST = ".trainjob-cache.json"

_retries = 10  # set from the settings by configure(); botocore attempts per request


def configure(storage_retries: int) -> None:
    global _retries
    _retries = storage_retries


def _options(protocol: str) -> dict:
    if protocol in ("s3", "s3a"):
        # botocore's standard retry mode: exponential backoff with jitter on 5xx, throttling
        # (SlowDown), connection errors and timeouts; bounded timeouts so a stalled transfer
        # fails instead of hanging (marin-community/marin#9209). Listings are not cached so a
        # pointer written by another process is always read fresh.
        return {
            "config_kwargs": {"retries": {"max_attempts": _retries, "mode": "standard"},
                              "connect_timeout": 10, "read_timeout": 60},
            "use_listings_cache": False,
        }
    return {}


def filesystem(uri: str):
    """(fs, path) for a URI; the filesystem object is cached by fsspec per set of options."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return fsspec.core.url_to_fs(uri, **_options(protocol))


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


@contextlib.contextmanager
def errors(uri: str, error: type[JobError], action: str):
    """Turn storage exceptions into one-line errors naming the URI.

    Missing or forbidden -> `error` (a data or output error: fail at once). Anything else that
    survived botocore's retries (5xx, throttling, resets, timeouts) -> exit 75, worth a retry.
    """
    shown = redact_uri(uri)
    try:
        yield
    except JobError:
        raise
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise error(f"cannot {action} {shown}: not found ({exc.__class__.__name__}); check the URI") from None
    except PermissionError:
        raise error(f"cannot {action} {shown}: permission denied; check credentials and bucket policy") from None
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.ENOSPC):
            raise error(f"cannot {action} {shown}: {os.strerror(exc.errno)}") from None
        raise TransientStorageError(f"cannot {action} {shown} after retries: {_short(exc)}") from None
    except Exception as exc:  # botocore/aiohttp errors that s3fs did not translate
        if exc.__class__.__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "gcsfs", "google"):
            raise TransientStorageError(f"cannot {action} {shown} after retries: {_short(exc)}") from None
        raise


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}"[:300]


def fresh_credentials(fn):
    """On a refusal, retry once with a new filesystem: a new botocore session, which loads the
    credentials again. Keys rotated in a credentials file by a sidecar, or an expired session
    token, then keep working (fsspec/s3fs#500, #632: ExpiredToken lost the final upload of a 12 h
    run). A real denial is refused again and reported as before."""

    @functools.wraps(fn)
    def wrapper(uri: str, *args, **kwargs):
        try:
            return fn(uri, *args, **kwargs)
        except PermissionError as exc:
            fs = filesystem(uri)[0]
            if isinstance(fs, LocalFileSystem):
                raise
            log.warning(f"{redact_uri(uri)}: the store refused our credentials ({str(exc)[:120]}); "
                        "reloading them and retrying once")
            type(fs).clear_instance_cache()
            return fn(uri, *args, **kwargs)

    return wrapper


@fresh_credentials
def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


@fresh_credentials
def write_bytes(uri: str, data: bytes) -> None:
    """Write so that a reader sees the old object or the whole new one, never a part."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)


def write_json(uri: str, obj) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(uri: str):
    return json.loads(read_bytes(uri))


@fresh_credentials
def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


@fresh_credentials
def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm_file(path)


@fresh_credentials
def copy(src: str, dst: str) -> None:
    """Server-side copy on object stores (no re-upload); a local copy is published atomically."""
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(dst_path) or ".", exist_ok=True)
        tmp = f"{dst_path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.link(src_path, tmp)  # same directory: a hard link costs nothing
        except OSError:
            fs.copy(src_path, tmp)
        os.replace(tmp, dst_path)
    else:
        fs.copy(src_path, dst_path)


@fresh_credentials
def list_names(uri: str) -> list[str]:
    """Names of the files directly under a directory URI ([] when it does not exist)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def check_writable(uri: str) -> None:
    """Write and delete a probe object, so a bad output location fails before any training."""
    probe = join(uri, f".trainjob-probe-{uuid.uuid4().hex[:8]}")
    write_bytes(probe, b"ok")
    remove(probe)


def _version(info: dict) -> str:
    """What identifies one version of a remote file: ETag on S3, etag/md5 on GCS, else mtime."""
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


@fresh_credentials
def pull(uri: str, cache_dir: str, include=None) -> str:
    """Make the dataset at `uri` available as a local directory and return its path.

    Local datasets are read in place. Remote ones are copied into `cache_dir` with one batched
    `fs.get` (s3fs/gcsfs transfer many files concurrently), skipping files whose size and version
    match what the cache recorded; an interrupted pull simply resumes on the next start.
    `include(relative_path) -> bool` limits the pull to the files a caller needs.
    """
    fs, root = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        if not os.path.isdir(root):
            raise FileNotFoundError(root)
        return root
    local_root = os.path.join(cache_dir, hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16])
    os.makedirs(local_root, exist_ok=True)
    manifest_path = os.path.join(local_root, CACHE_MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    listing = fs.find(root, detail=True)
    if not listing:
        raise FileNotFoundError(root)
    remote, local, wanted = [], [], {}
    for path, info in listing.items():
        rel = path[len(root.rstrip("/")):].lstrip("/")
        if not rel or info.get("type") == "directory" or (include and not include(rel)):
            continue
        key = [info.get("size"), _version(info)]
        dest = os.path.join(local_root, rel)
        wanted[rel] = key
        if manifest.get(rel) == key and os.path.exists(dest) and os.path.getsize(dest) == key[0]:
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        remote.append(path)
        local.append(dest)
    if remote:
        fs.get(remote, local)
    if wanted != manifest:
        tmp = manifest_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(wanted, f)
        os.replace(tmp, manifest_path)
    return local_root


@fresh_credentials
def remove_tree(uri: str) -> None:
    """Delete a directory URI and everything under it (used only for smoke outputs)."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)

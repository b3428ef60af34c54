"""The local mirror of a dataset in object storage (files, not shards): JOB_CACHE_DIR holds an
exact copy of the listing, fetched in bounded chunks, kept across restarts (a file whose size
and version are unchanged is not fetched again), every key proven to stay inside the cache."""

import errno
import hashlib
import json
import logging
import os
import shutil
import time

from fsspec.implementations.local import LocalFileSystem

from job import stop, storage
from job.errors import CacheError, DataError

log = logging.getLogger("job")
CACHE_MANIFEST = ".trainjob-cache.json"
PULL_CHUNK_FILES, PULL_CHUNK_BYTES = 256, 256 << 20  # one bounded, concurrent fs.get per chunk


def cache_root(uri: str, cache_dir: str) -> str:
    return os.path.join(cache_dir, hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16])


def check_cache_dir(cache_dir: str, need_bytes: int = 0) -> None:
    """The local cache must take writes and have room: its own clear error (exit 4), never a
    data or credentials error."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        storage.write_local(os.path.join(cache_dir, ".trainjob-probe"), b"ok")
        os.remove(os.path.join(cache_dir, ".trainjob-probe"))
    except OSError as exc:
        raise CacheError(
            f"JOB_CACHE_DIR={cache_dir} is not writable ({os.strerror(exc.errno) if exc.errno else exc}); "
            "mount a writable volume there (docker: --tmpfs /cache; Kubernetes: an emptyDir) or set "
            "JOB_CACHE_DIR to a writable directory"
        ) from None
    free = shutil.disk_usage(cache_dir).free
    if need_bytes > free:
        raise CacheError(
            f"JOB_CACHE_DIR={cache_dir} has {_mb(free)} free but the dataset needs {_mb(need_bytes)} more; "
            "give the cache volume more space (e.g. the emptyDir's sizeLimit) or point JOB_CACHE_DIR elsewhere"
        )


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def local_path(root: str, rel: str, name: str) -> str:
    """root/rel, proven to stay under root. `rel` comes from a remote listing that a careless or
    hostile bucket owner controls: '..', '.' or empty segments are refused (DataError naming the
    object `name`), and the resolved path must lie under the resolved root."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise DataError(
            f"object {name!r} has an empty, '.' or '..' segment in its key; refusing a dataset whose keys "
            "could write outside the cache (JOB_CACHE_DIR)"
        )
    path = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise DataError(f"object {name!r} resolves outside the cache (JOB_CACHE_DIR); refusing the dataset")
    return path



def _version(info: dict) -> str:
    """What identifies one version of a remote file: ETag on S3, etag/md5 on GCS, else mtime."""
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


@storage.operation("list")
def listing_digest(uri: str) -> str:
    """A hash of what is under `uri`: every object's name, size and version (ETag or mtime). It
    changes when an object is added, removed or rewritten."""
    root = storage.filesystem(uri)[1].rstrip("/")
    listing = storage.find(uri)
    entries = sorted((path[len(root) + 1:], info.get("size"), _version(info)) for path, info in listing.items())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def pull(uri: str, cache_dir: str, include=None) -> str:
    """Make the dataset at `uri` available as a local directory and return its path.

    Local datasets are read in place. Remote ones are mirrored into `cache_dir`: files whose
    size and version match what the cache recorded are kept, the rest fetched in bounded chunks
    (s3fs/gcsfs transfer each chunk's files concurrently), and local files the listing no longer
    has are deleted, so the cache is exactly the listing. An interrupted pull resumes on the next
    start. `include(relative_path) -> bool` limits the pull to the files a caller needs.
    """
    fs, root = storage.filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        if not os.path.isdir(root):
            raise FileNotFoundError(root)
        return root
    local_root = cache_root(uri, cache_dir)
    check_cache_dir(cache_dir)
    os.makedirs(local_root, exist_ok=True)
    manifest_path = os.path.join(local_root, CACHE_MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    log.info(f"listing {storage.redact_uri(uri)}")
    listing = storage.find(uri)
    if not listing:
        raise FileNotFoundError(root)
    wanted, todo = _plan(listing, root, local_root, manifest, include)
    _remove_unlisted(local_root, wanted)
    need = sum(size for _, _, size in todo)
    check_cache_dir(cache_dir, need)
    if todo:
        _fetch(uri, todo, len(wanted), local_root)
    if wanted != manifest:
        storage.write_local(manifest_path, json.dumps(wanted).encode())
    return local_root


def _plan(listing: dict, root: str, local_root: str, manifest: dict, include):
    """({relative name: [size, version]} of the files the cache must hold, [(remote, local, size)]
    of those to fetch). Raises DataError for keys that cannot be mirrored safely."""
    base = root.rstrip("/") + "/"
    wanted, todo = {}, []
    for path, info in sorted(listing.items()):
        if info.get("type") == "directory" or path.endswith("/"):  # folder markers
            continue
        if not path.startswith(base):
            raise DataError(f"object {path!r} is listed under {root} but is not inside it; refusing the dataset")
        rel = path[len(base) :]
        if include and not include(rel):
            continue
        dest = local_path(local_root, rel, path)
        key = [info.get("size"), _version(info)]
        wanted[rel] = key
        if manifest.get(rel) == key and os.path.isfile(dest) and os.path.getsize(dest) == key[0]:
            continue
        todo.append((path, dest, int(info.get("size") or 0)))
    folders = {rel.rsplit("/", 1)[0] for rel in wanted if "/" in rel}
    clash = sorted(folders & set(wanted))
    if clash:
        raise DataError(f"object key {clash[0]!r} is both a file and a folder of other keys; refusing the dataset")
    return wanted, todo


def _remove_unlisted(local_root: str, wanted: dict) -> None:
    """Delete cached files the listing no longer has (deleted from the bucket: never trained on)."""
    for folder, _, files in os.walk(local_root):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, local_root).replace(os.sep, "/")
            if rel != CACHE_MANIFEST and rel not in wanted:
                os.remove(path)


@storage.operation("pull")
def _get(uri: str, remote: list[str], local: list[str]) -> None:
    storage.filesystem(uri)[0].get(remote, local)


def _fetch(uri: str, todo: list, total_files: int, local_root: str) -> None:
    """Fetch [(remote, local, size)] in chunks, each one bounded operation; progress lines."""
    total = sum(size for _, _, size in todo)
    shown = storage.redact_uri(uri)
    log.info(f"pulling {len(todo)} of {total_files} files ({_mb(total)}) from {shown} into {local_root}")
    start, last_log, done_files, done_bytes = time.monotonic(), time.monotonic(), 0, 0
    i = 0
    while i < len(todo):
        stop.check("while pulling the dataset: the files fetched are kept for the next start")
        chunk: list = []
        size = 0
        while i < len(todo) and len(chunk) < PULL_CHUNK_FILES and (not chunk or size < PULL_CHUNK_BYTES):
            chunk.append(todo[i])
            size += todo[i][2]
            i += 1
        for _, dest, _ in chunk:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            _get(uri, [r for r, _, _ in chunk], [d for _, d, _ in chunk], nbytes=size)
        except OSError as exc:
            local_fault = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or not os.access(local_root, os.W_OK)
            if local_fault:
                reason = os.strerror(exc.errno) if exc.errno else exc.__class__.__name__
                raise CacheError(
                    f"cannot write the dataset into JOB_CACHE_DIR ({local_root}): {reason}; "
                    f"{_mb(total - done_bytes)} still to fetch; give the cache volume more space or "
                    "make it writable"
                ) from None
            raise
        done_files, done_bytes = done_files + len(chunk), done_bytes + size
        now = time.monotonic()
        if now - last_log >= storage.log_every() or i == len(todo):
            last_log = now
            rate = done_bytes / max(now - start, 1e-9)
            eta = (total - done_bytes) / rate if rate > 0 else 0
            log.info(
                f"pull {done_files}/{len(todo)} files ({100 * done_bytes / max(total, 1):.0f}%), "
                f"{_mb(done_bytes)} of {_mb(total)}, {rate / 1e6:.2f} MB/s, elapsed {now - start:.0f} s, ETA "
                f"{eta:.0f} s"
            )

"""A sharded dataset's index.json: what `python -m job prepare` wrote and training trusts.

Format (WebDataset-compatible, readable by webdataset and DALI): tar shards
`<split>-NNNNNN.tar` of samples `<key>.jpg` (`.png` for IDX images) + `<key>.cls` (the class
index as text), written with fixed headers so the same input gives the same bytes; and
`index.json`: class names, per split the shards with their sample counts, bytes and sha256, the
dataset fingerprint, the bad files skipped. Every image was decoded (and re-encoded at
JOB_SHARD_SHORT_SIDE) once, by prepare: training never scans, lists or hashes the dataset.

The index comes from a bucket we may not own: ShardIndex states what every field training uses
must be, so a bad one is a one-line exit 3 (never a traceback) and a shard name can never reach
outside the cache folder.
"""

import hashlib
import json
import logging
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from job import storage
from job.data.layout import INDEX, MAX_CLASSES
from job.errors import DataError, format_version, one_line
from job.settings import MAX_IMAGE_SIDE

log = logging.getLogger("job")
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")  # as prepare writes them
SHARD_NAME = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,200}\.tar"  # a plain file name: joined to the cache folder
MAX_SHARD_BYTES = 1 << 36
MAX_INDEX_BYTES = 64 << 20  # ~100k shards; read whole, so bounded
# Samples in all splits together: training holds index tensors of this length (8 bytes a sample,
# several of them) before any shard is read; 100M is 7x ImageNet-21k.
MAX_SAMPLES = 100_000_000
IDX_SHAPE = [1, 28, 28]  # an IDX shard's sample shape when its entry names none (the first prepares)


class Shard(BaseModel):
    """One shard's entry. Strict: "3" is not 3 and true is not 1."""

    model_config = ConfigDict(strict=True, extra="allow")
    name: str
    samples: int
    bytes: int
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    shape: list[int] | None = None  # IDX shards: [1, height, width]

    @field_validator("name")
    @classmethod
    def _plain(cls, name: str) -> str:
        if not re.fullmatch(SHARD_NAME, name):
            raise ValueError(f"shard name {name!r} is not a unique plain file name ending in .tar")
        return name

    @model_validator(mode="after")
    def _plausible(self) -> "Shard":
        # a sample takes two 512-byte tar headers at least: counts cannot outgrow the bytes
        if not (1 <= self.samples and 1024 * self.samples <= self.bytes <= MAX_SHARD_BYTES):
            raise ValueError(f"shard {self.name} has no plausible samples and bytes")
        return self


class ShardIndex(BaseModel):
    """index.json, as training reads it (other fields, e.g. the source and plan, are kept as written)."""

    model_config = ConfigDict(strict=True, extra="allow")
    format: Literal["trainjob-shards"]
    format_version: Annotated[int, format_version(FORMAT_VERSION)]
    kind: Literal["image", "idx"]
    class_names: list[str] = Field(min_length=2, max_length=MAX_CLASSES)
    fingerprint: str
    files: int = Field(ge=0)
    bad_files: list[list[str]]
    splits: dict[str, list[Shard]]
    order: str | None = None  # "shuffled": each split written in a seeded permutation

    @field_validator("bad_files")
    @classmethod
    def _pairs(cls, bad: list[list[str]]) -> list[list[str]]:
        if not all(len(b) == 2 for b in bad):
            raise ValueError("bad_files is not a list of [name, reason]")
        return bad

    @model_validator(mode="after")
    def _shards(self) -> "ShardIndex":
        total = sum(s.samples for shards in self.splits.values() for s in shards)
        if total > MAX_SAMPLES:
            raise ValueError(f"its shards hold {total:,} samples in all, over the bound of {MAX_SAMPLES:,}")
        names = [s.name for shards in self.splits.values() for s in shards]
        if len(set(names)) != len(names):
            twice = _first_repeat(names)
            raise ValueError(f"shard name {twice!r} is not a unique plain file name ending in .tar")
        if self.kind == "idx":
            shapes = {str(s.shape or IDX_SHAPE) for shards in self.splits.values() for s in shards}
            for s in (s for shards in self.splits.values() for s in shards):
                shape = s.shape or IDX_SHAPE
                if len(shape) != 3 or shape[0] != 1 or not all(1 <= d <= MAX_IMAGE_SIDE for d in shape):
                    raise ValueError(f"shard {s.name} has shape {shape!r}, not [1, height, width]")
            if len(shapes) > 1:
                raise ValueError("its IDX shards differ in shape")
        return self


def _first_repeat(names: list[str]) -> str:
    """The first name seen twice, in one pass (names.count() per name is quadratic over 100k shards)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return ""


def problem(error: ValidationError) -> str:
    """A validation error as one line: where, and what is wrong (the first problem found)."""
    where, message = one_line(error)
    return f"{where}: {message}" if where else message


def find_index(uri: str) -> dict | None:
    """The dataset's index.json if `uri` is a sharded dataset (one small read), else None. The
    index is checked against ShardIndex, and its fingerprint recomputed from the shards it lists."""
    where = storage.redact_uri(storage.join(uri, INDEX))
    try:
        text = storage.read_bytes(storage.join(uri, INDEX), max_bytes=MAX_INDEX_BYTES)
        if len(text) > MAX_INDEX_BYTES:
            raise DataError(f"{where} is over {MAX_INDEX_BYTES} bytes")
        index = json.loads(text)
    except FileNotFoundError:
        return None
    except ValueError:
        raise DataError(f"{where} is not valid JSON: an interrupted or foreign write; run python -m job prepare "
                        "again") from None
    if not isinstance(index, dict) or index.get("format") != "trainjob-shards":
        raise DataError(f"{where} is not a trainjob shard index")
    try:
        ShardIndex.model_validate(index)  # strict: the dict is exactly what was validated
    except ValidationError as exc:
        raise DataError(f"{where} is malformed: {problem(exc)}; run python -m job prepare again") from None
    if fingerprint(index["splits"]) != index["fingerprint"]:  # the shards it lists are not the ones it names
        raise DataError(f"{where} has a fingerprint that does not match its shards' sha256s: edited or mixed with "
                        "another prepare; run python -m job prepare again")
    if index.get("order") != "shuffled":
        log.warning(f"{storage.redact_uri(uri)} was prepared by an older trainjob, class by class: its batches hold "
                    "few classes and it learns worse than the same images as folders; run python -m job prepare "
                    "again to write shards that each hold every class")
    return index


def split_shards(index: dict, split: str, limit: int = 0) -> list[dict]:
    shards = index["splits"].get(split) or []
    return shards[:limit] if limit else shards


def fingerprint(splits: dict) -> str:
    """The dataset's identity: a hash over every shard's name and sha256, split by split in the
    order prepare writes them (train, val, test), whatever order a JSON writer keeps."""
    order = sorted(splits, key=lambda split: (SPLITS.index(split) if split in SPLITS else len(SPLITS), split))
    listed = "".join(f"{split} {s['name']} {s['sha256']}\n" for split in order for s in splits[split])
    return hashlib.sha256(listed.encode()).hexdigest()

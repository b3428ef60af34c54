"""Attacks on sharded datasets (issue 16) by a bucket owner we cannot trust and an unlucky
operator, each through the real job where the job must meet it: hostile indexes and shards,
decompression bombs and 16-bit images in a shard, labels outside the classes, a store that
freezes while a shard downloads or while prepare reads, and real signals."""

import json
import os

import numpy as np
import pytest
import stage_dataset
from conftest import (
    DIGITS,
    read_history,
    run_job,
    sigterm,
    start_job,
    stop_within_grace,
    time_unit,
    wait_for,
    wait_for_epochs,
    wait_until_idle,
)
from faultproxy import FaultProxy
from PIL import Image
from test_hostile import png_bomb


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory, digits_arrays):
    """The digits, prepared as shards in a local folder: the original every attack copies."""
    root = tmp_path_factory.mktemp("digit-shards")
    stage_dataset.stage(digits_arrays, str(root / "digits"))
    result = run_job("prepare", str(root / "digits"), str(root / "shards"), shard_bytes=200_000)
    assert result.returncode == 0, result.stdout
    return root / "shards"


def rewrite(blob: bytes, ext: str, *replacements: bytes) -> bytes:
    """A shard with the first samples' `ext` members (cls, png) replaced, in order."""
    import io
    import tarfile

    out, todo = io.BytesIO(), list(replacements)
    with tarfile.open(fileobj=io.BytesIO(blob)) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith("." + ext) and todo:
                data = todo.pop(0)
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out.getvalue()


def relabel(blob: bytes, label: bytes) -> bytes:
    return rewrite(blob, "cls", label)


def _rewrite_first_shard(folder, index, blob):
    import hashlib

    shard = index["splits"]["train"][0]
    (folder / shard["name"]).write_bytes(blob)
    shard.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())


def _gzip_first_shard(folder, index):
    """Compressed: tarfile's auto-detection would read it, at offsets that are not the file's."""
    import gzip

    _rewrite_first_shard(folder, index, gzip.compress((folder / index["splits"]["train"][0]["name"]).read_bytes()))
    index["splits"]["train"][0]["samples"] = index["splits"]["train"][0]["bytes"] // 1024  # plausible for its size


INDEX_ATTACKS = {  # what is done to the index (and its shards) -> what the one-line error says
    "a shard name that climbs out of the cache": (
        lambda f, i: i["splits"]["train"][0].update(name="../../../../escape.tar"), "is not a unique plain file name"),
    "an absolute shard name": (lambda f, i: i["splits"]["train"][0].update(name="/tmp/escape.tar"), "is not a unique plain"),
    "the same shard twice": (lambda f, i: i["splits"]["val"].append(i["splits"]["train"][0]), "is not a unique plain"),
    "no kind": (lambda f, i: i.pop("kind"), "kind: Field required"),
    "splits as a list": (lambda f, i: i.update(splits=[]), "splits: Input should be a valid dictionary"),
    "zero samples": (lambda f, i: i["splits"]["train"][0].update(samples=0), "no plausible samples"),
    "one class": (lambda f, i: i.update(class_names=["0"]), "class_names: List should have at least 2 items"),
    "an IDX shape of a billion pixels": (
        lambda f, i: [s.update(shape=[1, 40000, 40000]) for s in i["splits"]["train"]], "has shape [1, 40000, 40000]"),
    "more samples in the index than in the shard": (
        lambda f, i: i["splits"]["train"][0].update(samples=i["splits"]["train"][0]["samples"] + 1), "its index says"),
    "a label outside the classes": (
        lambda f, i: _rewrite_first_shard(f, i, relabel((f / i["splits"]["train"][0]["name"]).read_bytes(), b"77")),
        "label 77 outside the 10 classes"),
    "bad files that are not pairs": (lambda f, i: i.update(bad_files=[1]), "bad_files.0: Input should be a valid list"),
    "a trillion samples": (lambda f, i: i["splits"]["train"][0].update(samples=10**12), "no plausible samples"),
    "a billion samples over its shards": (  # each entry plausible (64 GiB), together index tensors of 8 GB
        lambda f, i: [s.update(samples=1 << 26, bytes=1 << 36) for s in i["splits"]["train"]], "samples in all, over"),
    "a test split of another shape": (
        lambda f, i: [s.update(shape=[1, 20, 20]) for s in i["splits"]["test"]], "IDX shards differ in shape"),
    "a gzipped shard": (lambda f, i: _gzip_first_shard(f, i), "is not a readable trainjob shard"),
    "a label that is not a number": (
        lambda f, i: _rewrite_first_shard(f, i, relabel((f / i["splits"]["train"][0]["name"]).read_bytes(), b"\xff\xfe")),
        "is not a readable trainjob shard"),
}


def resign(index: dict) -> None:
    """Whoever writes a hostile index can also write its fingerprint to match the shards it lists
    (an edited index with a stale one is refused earlier: tests/unit/test_shards_in_process.py)."""
    from job.data.index import fingerprint

    try:
        index["fingerprint"] = fingerprint(index["splits"])
    except (KeyError, TypeError, AttributeError):  # too malformed to fingerprint: refused for that first
        pass


# the job itself meets these (each costs a start of PyTorch); the rest are checked in process
THROUGH_THE_JOB = {"a shard name that climbs out of the cache", "more samples in the index than in the shard",
                   "a label outside the classes", "a label that is not a number", "a gzipped shard"}


@pytest.mark.parametrize("attack", INDEX_ATTACKS)
def test_a_hostile_shard_index_or_shard_is_refused_in_one_line(digit_shards, tmp_path, attack):
    import shutil

    mutate, expected = INDEX_ATTACKS[attack]
    folder = tmp_path / "shards"
    shutil.copytree(digit_shards, folder)
    index = json.loads((folder / "index.json").read_text())
    mutate(folder, index)
    resign(index)
    (folder / "index.json").write_text(json.dumps(index))
    if attack not in THROUGH_THE_JOB:  # refused from the index alone: find_index is the job's first read of it
        from job.errors import DataError
        from job.data.index import find_index

        with pytest.raises(DataError) as refused:
            find_index(str(folder))
        assert expected in str(refused.value) and refused.value.exit_code == 3
        return
    result = run_job(data_uri=str(folder), output_uri=str(tmp_path / "out"), run_name="r", epochs=1, num_workers=0,
                     cache_dir=str(tmp_path / "cache"), **DIGITS)
    assert result.returncode == 3, result.stdout
    assert expected in result.stdout.strip().splitlines()[-1] and "Traceback" not in result.stdout, result.stdout
    assert not list(tmp_path.parent.rglob("escape*")) and not os.path.exists("/tmp/escape.tar")


def test_a_16_bit_image_or_a_bomb_in_a_shard_is_a_skipped_sample(digit_shards, tmp_path):
    import io
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(digit_shards, folder)
    index = json.loads((folder / "index.json").read_text())
    deep = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(deep, format="PNG")  # 16-bit grayscale
    first = index["splits"]["train"][0]["name"]
    _rewrite_first_shard(folder, index, rewrite((folder / first).read_bytes(), "png", deep.getvalue(), png_bomb(20000)))
    resign(index)
    (folder / "index.json").write_text(json.dumps(index))
    result = run_job(data_uri=str(folder), output_uri=str(tmp_path / "out"), run_name="r", epochs=1, num_workers=0,
                     cache_dir=str(tmp_path / "cache"), max_image_pixels=10**6, **DIGITS)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("skipping a corrupt sample") == 2 and "Traceback" not in result.stdout, result.stdout


def test_prepare_refuses_idx_labels_outside_the_training_classes(digits_arrays, tmp_path):
    arrays = dict(digits_arrays)
    arrays["test_labels"] = arrays["test_labels"].copy()
    arrays["test_labels"][5] = 12
    stage_dataset.stage(arrays, str(tmp_path / "digits"))
    result = run_job("prepare", str(tmp_path / "digits"), str(tmp_path / "shards"))
    assert result.returncode == 3 and "has label 12, outside the 10 classes" in result.stdout, result.stdout
    assert not (tmp_path / "shards" / "index.json").exists()


def test_sigterm_while_a_shard_download_hangs_saves_the_last_step(s3, s3_server, digit_shards, tmp_path, monkeypatch):
    """The store freezes mid-epoch: training waits for a shard the prefetcher cannot get. A
    SIGTERM must still end the run within the grace period with a checkpoint of the last step."""
    s3.put(str(digit_shards), "data/digit-shards", recursive=True)
    unit = time_unit()
    # the job gives the stalled download half the grace period and saves its last step in the other
    # half: that save (a small model, to a local folder) costs well under a unit, so two units each
    grace = max(8.0, 4 * unit)
    proxy = FaultProxy(s3_server, 0.0)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        settings = dict(data_uri="s3://data/digit-shards", output_uri=str(tmp_path), run_name="r", num_workers=0,
                        batch_size=16, shard_cache_bytes=2_400_000, cache_dir=str(tmp_path / "c"), **DIGITS)
        proc = start_job(epochs=1000, stop_grace_seconds=grace, storage_timeout_seconds=600, **settings)
        wait_for_epochs(tmp_path / "r", 1, proc)
        proxy.freeze()
        wait_for(lambda: proxy.counts["frozen"] > 0, proc, what="a shard request to the frozen store")
        # the shards in the cache get used up and the loop waits for one the store does not send:
        # seen as a job that uses no CPU at all, its main thread asleep, for a second (half a unit
        # on a slower machine), instead of a sleep that hopes the loop got there
        wait_until_idle(proc, max(1.0, unit / 2), what="the training loop waiting for a shard")
        out = stop_within_grace(proc, grace, unit)
    finally:
        proxy.close()
    assert proc.returncode == 143, out
    last = out.strip().splitlines()[-1]
    assert "while waiting for shard" in out and "after saving a checkpoint: checkpoints/step-" in last, out
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    rerun = run_job(epochs=len(read_history(tmp_path / "r")) + 1, **settings)
    assert rerun.returncode == 0 and "resumed from checkpoints/step-" in rerun.stdout, rerun.stdout


def test_sigterm_while_prepare_reads_a_frozen_store_ends_at_once(s3, s3_server, digits_arrays, tmp_path, monkeypatch):
    stage_dataset.png_folder(digits_arrays["train_images"][:600], digits_arrays["train_labels"][:600], "s3://data/pngs/train")
    unit = time_unit()
    grace = max(25.0, 10 * unit)  # "at once" must mean sooner than the grace period: far above the slack below
    proxy = FaultProxy(s3_server, 0.0)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proc = start_job("prepare", "s3://data/pngs", str(tmp_path / "shards"), shard_bytes=20_000,
                         storage_timeout_seconds=600, stop_grace_seconds=grace, cache_dir=str(tmp_path / "c"))
        wait_for(lambda: len(list((tmp_path / "shards").glob("*.json"))) >= 1, proc, what="a shard written")
        proxy.freeze()  # the reads queued in the pool now wait for answers that never come
        wait_for(lambda: proxy.counts["frozen"] > 0, proc, what="a read from the frozen store")
        unit = max(unit, time_unit())
        out, took = sigterm(proc)
    finally:
        proxy.close()
    # at once: the signal's delivery, the last line and the interpreter's exit, less than a unit each
    assert proc.returncode == 143 and took < 3 * unit < grace, (took, unit, grace, out)
    last = out.strip().splitlines()[-1]
    assert "while preparing shards" in last and "run python -m job prepare again" in last, out


def _prepared_copy(digit_shards, tmp_path):
    """A copy of the digit shards to attack: (folder, index, the first train shard's path)."""
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(digit_shards, folder)
    index = json.loads((folder / "index.json").read_text())
    return folder, index, folder / index["splits"]["train"][0]["name"]


def _train_once(folder, tmp_path, **settings):
    return run_job(data_uri=str(folder), output_uri=str(tmp_path / "out"), run_name="r", epochs=1, num_workers=0,
                   cache_dir=str(tmp_path / "cache"), **DIGITS, **settings)


def test_an_animated_gif_in_a_shard_is_refused_before_its_frames_are_decoded(digit_shards, tmp_path):
    """200 frames, each within JOB_MAX_IMAGE_PIXELS (the header's check): torchvision would decode
    every one (200 times the memory); a shard holds JPEG or PNG as prepare writes, the GIF is skipped."""
    import io

    folder, index, first = _prepared_copy(digit_shards, tmp_path)
    frames = [Image.new("L", (500, 500), color=i) for i in range(200)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=10)
    _rewrite_first_shard(folder, index, rewrite(first.read_bytes(), "png", gif.getvalue()))
    resign(index)
    (folder / "index.json").write_text(json.dumps(index))
    result = _train_once(folder, tmp_path, max_image_pixels=10**6)
    assert result.returncode == 0 and "Traceback" not in result.stdout, result.stdout
    skipped = [line for line in result.stdout.splitlines() if "skipping a corrupt sample" in line]
    assert len(skipped) == 1 and "not a JPEG or PNG" in skipped[0], result.stdout


def test_a_shard_larger_than_its_index_entry_is_refused_without_reading_it_whole(digit_shards, tmp_path):
    folder, index, first = _prepared_copy(digit_shards, tmp_path)
    with open(first, "ab") as f:
        f.truncate(first.stat().st_size + (1 << 30))  # 1 GiB more, sparse: read whole, it would be held twice
    result = _train_once(folder, tmp_path)
    assert result.returncode == 3 and "Traceback" not in result.stdout, result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert f"is larger than the {index['splits']['train'][0]['bytes']} bytes its entry in index.json says" in last
    assert "fetching it again" not in result.stdout, result.stdout


@pytest.mark.parametrize("kind", ["a link to /dev/zero", "a FIFO"])
def test_a_local_shard_that_is_not_a_regular_file_is_refused(digit_shards, tmp_path, kind):
    folder, index, first = _prepared_copy(digit_shards, tmp_path)
    first.unlink()
    if kind == "a FIFO":
        os.mkfifo(first)  # a plain open waits for a writer for ever
    else:
        os.symlink("/dev/zero", first)  # a plain read never ends
    result = _train_once(folder, tmp_path)
    assert result.returncode == 3 and "Traceback" not in result.stdout, result.stdout
    assert "not a regular file" in result.stdout.strip().splitlines()[-1], result.stdout

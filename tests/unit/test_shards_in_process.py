"""The sharded dataset's pure functions in process: the window order, the rotation and the
augmentation. Sharded datasets through the job are tested in tests/job/test_shards.py."""

import random

import torch

from job.data import augment, cache, images, prepare_shards, stream
from job.data import index as shard_index


def test_the_window_order_is_a_permutation_and_independent_of_processes():
    shard_list = [{"name": f"s{i}", "samples": n, "bytes": 1, "sha256": ""} for i, n in enumerate([5, 7, 3, 9, 4, 6])]
    source = stream.ShardSource.__new__(stream.ShardSource)
    source.starts = torch.tensor([0, 5, 12, 15, 24, 28, 34])
    indices = torch.arange(34)
    order = source.order(indices, seed=1, epoch=2)
    assert sorted(order.tolist()) == indices.tolist()
    assert torch.equal(order, source.order(indices, seed=1, epoch=2))
    assert not torch.equal(order, source.order(indices, seed=1, epoch=3))
    shard_of, _ = source.locate(order)  # a window's samples come from at most WINDOW shards
    first = set(shard_of[:int(sum(shard_list[i]["samples"] for i in set(shard_of[:1].tolist())))].tolist())
    assert len(first) <= cache.WINDOW


def test_rotation_matches_torchvisions_nearest_rotation_on_the_interior():
    from torchvision.transforms.v2 import functional as TF

    x = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    for degrees in (-17.5, 0.0, 12.0):
        ours = augment.rotate_nearest(x, degrees)
        theirs = TF.rotate(x, degrees)  # torchvision's default: nearest, about the centre, zero fill
        inner = (slice(None), slice(16, 48), slice(16, 48))
        assert (ours[inner] != theirs[inner]).float().mean() < 0.02, degrees  # rounding at pixel edges only


def test_augmentation_is_a_function_of_the_seed():
    x = torch.randint(0, 255, (3, 120, 160), dtype=torch.uint8)
    a = augment.augment(x, 64, True, random.Random(7))
    assert a.shape == (3, 64, 64) and a.dtype == torch.uint8
    assert torch.equal(a, augment.augment(x, 64, True, random.Random(7)))
    assert augment.augment(x, 64, False, random.Random(0)).shape == (3, 64, 64)


def png_image(tmp_path, seed: int = 0) -> tuple[str, bytes]:
    """A 90x120 RGB PNG on disk (lossless: both paths decode the same pixels); (path, bytes)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    path = str(tmp_path / f"image-{seed}.png")
    Image.fromarray(pixels).save(path)
    return path, open(path, "rb").read()


def test_folders_and_shards_augment_an_image_alike_for_the_same_seed(tmp_path):
    """One augmentation for both paths: an image read from a class folder (PIL, in a worker) and
    the same image read from a shard (torchvision.io) become the same pixels for the same seed,
    with JOB_AUGMENT on (training) and off (evaluation)."""
    from job.data.augment import sample_seed

    path, blob = png_image(tmp_path)
    for train in (True, False):
        folder = images.ImageItems([(path, 0)], images.ImageTransform(48, True, normalize=False), train,
                                   max_pixels=10**6)
        for seed in (sample_seed(0, 0, 0), sample_seed(0, 1, 0), sample_seed(5, 2, 17)):
            from_folder, _ = folder[(0, seed)]
            from_shard = stream.decode(torch.frombuffer(bytearray(blob), dtype=torch.uint8), "image", 48, train, seed)
            assert torch.equal(from_folder, from_shard.float().div(255)), (train, seed)


def test_image_folders_augment_each_sample_by_seed_epoch_and_index(tmp_path):
    """Folders, like shards, draw a sample's augmentation from (JOB_SEED, epoch, sample): the same
    epoch reads the same pixels again (a resumed run trains on what an uninterrupted one would),
    another epoch other pixels."""
    from job.data.sources import FileSource

    pairs = [(png_image(tmp_path, seed)[0], seed % 2) for seed in range(6)]
    items = images.ImageItems(pairs, images.ImageTransform(32, True, normalize=True), max_pixels=10**6)
    source = FileSource(items, 32, 0, torch.device("cpu"), seed=3)
    order = torch.tensor([4, 1, 5, 0])

    def read(epoch):
        return torch.cat([x for x, _ in source.batches(order, 2, train=True, epoch=epoch)])

    first = read(1)
    assert torch.equal(first, read(1))
    assert not torch.equal(first, read(2))
    evaluation = torch.cat([x for x, _ in source.batches(order, 2, train=False)])
    assert torch.equal(evaluation, torch.cat([x for x, _ in source.batches(order, 4, train=False)]))


def distinct_classes_per_batch(labels: torch.Tensor, order: torch.Tensor, batch: int) -> float:
    return sum(len(set(labels[order[i:i + batch]].tolist())) for i in range(0, len(order) - batch + 1, batch)) \
        / (len(order) // batch)


def test_many_classes_in_tiny_shards_give_batches_as_mixed_as_folders():
    """200 classes of 30 samples in shards of 10 (ImageNet's shape: about one class per shard if
    written in class order): prepare's seeded permutation and the window shuffle give batches
    holding as many classes as a full shuffle of the folder path does."""
    per_class, classes, per_shard, batch = 30, 200, 10, 64
    entries = [(f"c{c}/{k}.png", c) for c in range(classes) for k in range(per_class)]  # as _plan lists them
    written = prepare_shards.shuffled(entries, seed=0)
    labels = torch.tensor([label for _, label in written])
    source = stream.ShardSource.__new__(stream.ShardSource)
    source.starts = torch.arange(0, len(written) + 1, per_shard)
    indices = torch.arange(len(written))
    from job.data.sources import epoch_order

    folders = distinct_classes_per_batch(torch.tensor([label for _, label in entries]),
                                         epoch_order(indices, 0, 0), batch)
    sharded = distinct_classes_per_batch(labels, source.order(indices, seed=0, epoch=0), batch)
    class_ordered = distinct_classes_per_batch(torch.tensor([label for _, label in entries]),
                                               source.order(indices, seed=0, epoch=0), batch)
    assert sharded >= 0.95 * folders, (sharded, folders)
    assert class_ordered < 0.25 * folders  # what shards written class by class gave: a handful of classes a batch


def test_training_recomputes_the_fingerprint_from_the_shards_the_index_lists(tmp_path):
    """index.json is written with sorted keys (test before train): the fingerprint does not depend
    on that order, and an index whose shard list was edited (or mixed with another prepare's) is
    refused before a shard is read."""
    import json

    import pytest

    from job import storage
    from job.errors import DataError

    def entry(name, fill):
        return {"name": name, "samples": 1, "bytes": 2048, "sha256": fill * 64}

    splits = {"train": [entry("train-000000.tar", "a")], "val": [entry("val-000000.tar", "b")],
              "test": [entry("test-000000.tar", "c")]}
    index = {"format": "trainjob-shards", "format_version": shard_index.FORMAT_VERSION, "kind": "image",
             "class_names": ["a", "b"], "files": 3, "bad_files": [], "splits": splits, "order": "shuffled",
             "fingerprint": shard_index.fingerprint(splits)}
    storage.write_json(str(tmp_path / "ok" / "index.json"), index)
    assert list(json.loads((tmp_path / "ok" / "index.json").read_text())["splits"]) == ["test", "train", "val"]
    assert shard_index.find_index(str(tmp_path / "ok"))["fingerprint"] == index["fingerprint"]
    splits["val"][0]["sha256"] = "d" * 64  # another shard under the same name: the fingerprint no longer says it
    storage.write_json(str(tmp_path / "edited" / "index.json"), index)
    with pytest.raises(DataError, match="fingerprint that does not match"):
        shard_index.find_index(str(tmp_path / "edited"))

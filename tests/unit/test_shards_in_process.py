"""The sharded dataset's pure functions in process: the window order, the rotation and the
augmentation. Sharded datasets through the job are tested in tests/job/test_shards.py."""

import random

import torch

from job import shards


def test_the_window_order_is_a_permutation_and_independent_of_processes():
    shard_list = [{"name": f"s{i}", "samples": n, "bytes": 1, "sha256": ""} for i, n in enumerate([5, 7, 3, 9, 4, 6])]
    source = shards.ShardSource.__new__(shards.ShardSource)
    source.starts = torch.tensor([0, 5, 12, 15, 24, 28, 34])
    indices = torch.arange(34)
    order = source.order(indices, seed=1, epoch=2)
    assert sorted(order.tolist()) == indices.tolist()
    assert torch.equal(order, source.order(indices, seed=1, epoch=2))
    assert not torch.equal(order, source.order(indices, seed=1, epoch=3))
    shard_of, _ = source.locate(order)  # a window's samples come from at most WINDOW shards
    first = set(shard_of[:int(sum(shard_list[i]["samples"] for i in set(shard_of[:1].tolist())))].tolist())
    assert len(first) <= shards.WINDOW


def test_rotation_matches_torchvisions_nearest_rotation_on_the_interior():
    from torchvision.transforms.v2 import functional as TF

    x = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    for degrees in (-17.5, 0.0, 12.0):
        ours = shards.rotate_nearest(x, degrees)
        theirs = TF.rotate(x, degrees)  # torchvision's default: nearest, about the centre, zero fill
        inner = (slice(None), slice(16, 48), slice(16, 48))
        assert (ours[inner] != theirs[inner]).float().mean() < 0.02, degrees  # rounding at pixel edges only


def test_augmentation_is_a_function_of_the_seed():
    x = torch.randint(0, 255, (3, 120, 160), dtype=torch.uint8)
    a = shards.augment(x, 64, True, random.Random(7))
    assert a.shape == (3, 64, 64) and a.dtype == torch.uint8
    assert torch.equal(a, shards.augment(x, 64, True, random.Random(7)))
    assert shards.augment(x, 64, False, random.Random(0)).shape == (3, 64, 64)

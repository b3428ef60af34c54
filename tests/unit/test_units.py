"""The pure parts, in process: order, sharding, split, lr schedule, checkpoint fallback, the cache
mirror's bookkeeping, the lease and the log's escaping. memory:// stands in for an object store
(fsspec's in-process filesystem: no server, no network)."""

import io
import json
import os
import uuid

import pytest
import torch

from job import checkpoint, lease, storage
from job.data import mirror
from job.data import sources as data
from job.errors import DataError
from job.optim import lr_factor
from job.report import printable
from job.settings import Settings


def fresh_uri() -> str:
    return f"memory://units-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("n, batch, world", [(1000, 100, 1), (1000, 100, 2), (1151, 50, 2), (1151, 32, 3), (7, 4, 4)])
def test_shards_are_disjoint_equal_and_cover_the_order(n, batch, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shards = [data.shard(order, batch, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    assert set(torch.cat(shards).tolist()) == set(order.tolist())
    padded = sum(len(s) for s in shards) - n
    assert 0 <= padded < world  # only the last block is padded, by less than one sample per rank
    for step in range(n // (batch * world)):  # step k of every rank: the k-th block of batch x world
        block = torch.cat([s[step * batch:(step + 1) * batch] for s in shards])
        assert torch.equal(block, order[step * batch * world:(step + 1) * batch * world])


def test_epoch_order_depends_only_on_seed_and_epoch():
    idx = torch.arange(100, 200)
    assert torch.equal(data.epoch_order(idx, 3, 5), data.epoch_order(idx, 3, 5))
    assert not torch.equal(data.epoch_order(idx, 3, 5), data.epoch_order(idx, 3, 6))
    assert not torch.equal(data.epoch_order(idx, 3, 5), data.epoch_order(idx, 4, 5))
    assert sorted(data.epoch_order(idx, 3, 5).tolist()) == idx.tolist()


def test_split_is_seeded_disjoint_and_refuses_an_empty_side():
    train, val = data.split_indices(1000, 0.2, seed=7)
    assert len(val) == 200 and len(train) == 800 and not set(train.tolist()) & set(val.tolist())
    assert torch.equal(data.split_indices(1000, 0.2, seed=7)[1], val)
    with pytest.raises(DataError, match="empty split"):
        data.split_indices(3, 0.2, seed=0)


@pytest.mark.parametrize("schedule, at, expected", [
    ("constant", 7.5, 1.0), ("step", 4.99, 1.0), ("step", 5.0, 0.2), ("step", 9.5, 0.2),
    ("cosine", 0.0, 1.0), ("cosine", 5.0, 0.5), ("cosine", 10.0, 0.0),
    ("onecycle", 0.0, 1 / 25), ("onecycle", 3.0, 1.0), ("onecycle", 10.0, 1 / 25e4),
])
def test_lr_factor_is_a_function_of_progress_in_epochs(schedule, at, expected):
    settings = Settings(data_uri="/x", epochs=10, lr_schedule=schedule, lr_milestones=[5], lr_gamma=0.2)
    assert lr_factor(settings, at) == pytest.approx(expected, abs=1e-9)


def test_load_latest_falls_back_past_a_corrupt_checkpoint_and_quarantines_it():
    run = fresh_uri()
    for step in (10, 20):
        blob = checkpoint.serialize({"step": step})
        checkpoint.commit(run, f"step-{step:09d}", blob, {"epoch": step // 10, "seen": 0, "global_step": step}, False, 5)
    storage.write_bytes(storage.join(run, "checkpoints", "step-000000020.pt"), b"garbage")
    state, name = checkpoint.load_latest(run)
    assert state == {"step": 10} and name == "step-000000010"
    assert storage.exists(storage.join(run, "checkpoints", "corrupt", "step-000000020.pt"))
    assert checkpoint.load_latest(fresh_uri()) == (None, None)


def test_the_pointer_never_moves_back_while_the_newer_checkpoint_exists():
    run = fresh_uri()
    meta = lambda step: {"epoch": 1, "seen": 0, "global_step": step}
    checkpoint.commit(run, "step-000000020", b"new", meta(20), False, 5)
    with pytest.raises(lease.LeaseLost, match="not moving it back"):
        checkpoint.commit(run, "step-000000010", b"old", meta(10), False, 5)
    assert storage.read_json(storage.join(run, "checkpoints", "latest.json"))["global_step"] == 20
    storage.remove(storage.join(run, "checkpoints", "step-000000020.pt"))  # gone: moving back is right
    checkpoint.commit(run, "step-000000010", b"old", meta(10), False, 5)
    assert storage.read_json(storage.join(run, "checkpoints", "latest.json"))["global_step"] == 10


def test_pull_mirrors_the_listing_and_refetches_only_what_changed(tmp_path):
    remote = fresh_uri() + "/ds"
    for name, body in {"a.txt": b"1", "sub/b.txt": b"22", "sub/c.txt": b"333"}.items():
        storage.write_bytes(storage.join(remote, name), body)
    root = mirror.pull(remote, str(tmp_path))
    assert open(os.path.join(root, "sub", "c.txt"), "rb").read() == b"333"
    manifest = json.load(open(os.path.join(root, mirror.CACHE_MANIFEST)))
    assert sorted(manifest) == ["a.txt", "sub/b.txt", "sub/c.txt"]
    os.utime(os.path.join(root, "a.txt"), (0, 0))  # unchanged remote: the local file is kept as it is
    storage.remove(storage.join(remote, "sub/b.txt"))
    storage.write_bytes(storage.join(remote, "sub/c.txt"), b"4444")
    mirror.pull(remote, str(tmp_path))
    assert os.stat(os.path.join(root, "a.txt")).st_mtime == 0
    assert not os.path.exists(os.path.join(root, "sub", "b.txt"))  # deleted remotely: gone from the cache
    assert open(os.path.join(root, "sub", "c.txt"), "rb").read() == b"4444"


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "a//b", "./a", "a/."])
def test_local_paths_from_keys_stay_under_their_root(tmp_path, rel):
    with pytest.raises(DataError, match="refusing"):
        mirror.local_path(str(tmp_path), rel, rel)


def test_one_writer_per_run():
    run = fresh_uri()
    first = lease.Lease(run, seconds=30)
    first.acquire()
    second = lease.Lease(run, seconds=0.1)
    with pytest.raises(lease.LeaseLost, match="another job is writing"):
        second.acquire()  # the first holder is alive here, and its lease is good for 30 s
    first.release()
    second.acquire()  # released: taken at once
    with pytest.raises(lease.LeaseLost, match="lost the run's lease"):
        first.renew()
    second.release()


def test_printable_keeps_one_record_on_one_line():
    assert printable("rose\n2026-01-01T00:00:00 INFO forged") == "rose\\n2026-01-01T00:00:00 INFO forged"
    assert printable("caf\udce9 \x1b[31m é") == "caf\\udce9 \\x1b[31m é"


def test_tiny_epochs_checkpoint_at_most_once_per_interval_and_keep_the_best(monkeypatch):
    """Epoch ends inside JOB_CHECKPOINT_MIN_SECONDS are not committed, but a best epoch among them
    is snapshotted and becomes best.pt with the next commit; the last epoch always commits."""
    from job import loop
    from job.checkpoint import Checkpointer
    from job.data import Data
    from job.runtime import Runtime

    settings = Settings(data_uri="/x", epochs=3, checkpoint_min_seconds=1000)
    module = torch.nn.Linear(4, 2)
    state = loop.TrainState(torch.optim.SGD(module.parameters(), lr=0.1), None, torch.arange(8), torch.arange(8, 10))
    run = fresh_uri()
    from job.data.sources import TensorSource

    samples = TensorSource(torch.zeros(10, 4), torch.zeros(10, dtype=torch.int64))
    ckpt = Checkpointer(settings, Runtime(torch.device("cpu")), run, module, state, Data(samples, None, ["a", "b"], "fp"),
                        None, started=0.0)
    for epoch, best in ((1, True), (2, False), (3, False)):
        with torch.no_grad():
            module.weight.fill_(epoch)
        state.progress = loop.Progress(epoch=epoch, global_step=epoch * 10)
        assert ckpt.save(best=best, epoch_end=True) == (epoch == 3)  # only the last epoch is due
    ckpt.uploader.wait()
    names = storage.list_names(storage.join(run, "checkpoints"))
    assert [n for n in names if n.startswith("step-")] == ["step-000000030.json", "step-000000030.pt"]
    load = lambda name: torch.load(io.BytesIO(storage.read_bytes(storage.join(run, "checkpoints", name))), weights_only=True)
    assert load("best.pt")["progress"]["epoch"] == 1 and float(load("best.pt")["model"]["weight"][0, 0]) == 1.0
    assert load("last.pt")["progress"]["epoch"] == 3
    assert storage.read_json(storage.join(run, "checkpoints", "best.json"))["epoch"] == 1


def test_a_checkpoints_records_are_published_after_its_commit_as_they_were_when_it_was_taken():
    """The Checkpointer publishes nothing of its own: it calls the run's `records` at the snapshot
    and runs what that returns after the commit (so no history row runs ahead of a checkpoint)."""
    from job import loop
    from job.checkpoint import Checkpointer
    from job.data import Data
    from job.data.sources import TensorSource
    from job.runtime import Runtime

    module = torch.nn.Linear(4, 2)
    state = loop.TrainState(torch.optim.SGD(module.parameters(), lr=0.1), None, torch.arange(8), torch.arange(8, 10))
    run = fresh_uri()
    seen = []

    def records():
        taken = len(state.history)  # the run as it is when the checkpoint is taken
        return lambda: seen.append((taken, storage.exists(storage.join(run, "checkpoints", "latest.json"))))

    samples = TensorSource(torch.zeros(10, 4), torch.zeros(10, dtype=torch.int64))
    ckpt = Checkpointer(Settings(data_uri="s3://b/d"), Runtime(torch.device("cpu")), run, module, state,
                        Data(samples, None, ["a", "b"], "fp"), None, started=0.0, records=records)
    state.history.append({"epoch": 1})
    state.progress = loop.Progress(epoch=1, global_step=10)
    assert ckpt.save()
    state.history.append({"epoch": 2})  # after the snapshot: not in what this checkpoint publishes
    ckpt.uploader.wait()
    assert seen == [(1, True)] and ckpt.published_epochs == 1

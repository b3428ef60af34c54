"""Which pointers answer a rerun as complete before the data is read (checkpoint.finished, issue
24): exactly those a resume would take and find at JOB_EPOCHS. The same through the real job, with
the dataset gone, is tests/job/test_completed_rerun.py."""

import json

import pytest

from job import checkpoint
from job.settings import Settings

BASE = dict(data_uri="/data/digits", output_uri="/out", run_name="r", epochs="2", optimizer="adam", lr="0.01")


def pointer(run, epoch=2, **changed) -> None:
    """checkpoints/latest.json as a commit writes it, for a run trained under BASE + `changed`."""
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / "step-000000024.pt").write_bytes(b"x")
    saved = Settings(**{**BASE, **changed}).public_dict()
    manifest = json.dumps({"file": "step-000000024.pt", "size": 1, "sha256": "0", "epoch": epoch, "seen": 0,
                           "global_step": 24, "settings": saved, "input_kind": "idx"})
    (run / "checkpoints" / "step-000000024.json").write_text(manifest)
    (run / "checkpoints" / "latest.json").write_text(manifest)


@pytest.mark.parametrize("now, complete", [
    ({}, True),
    ({"lr": "0.02", "batch_size": "50"}, True),  # schedule settings: a resume records them and goes on
    ({"image_size": "64"}, True),  # IDX images keep their own size
    ({"epochs": "3"}, False),  # trains on
    ({"hidden_sizes": "64"}, False),  # a resume refuses it: the run says so
    ({"optimizer": "sgd"}, False),
    ({"data_uri": "/data/other"}, False),  # other data: its fingerprint is compared where it is read
    ({"data_format": "mnist"}, False),
    ({"resume": "never"}, False),  # refused, complete or not
])
def test_only_what_a_resume_would_take_at_its_last_epoch_is_finished(tmp_path, now, complete):
    pointer(tmp_path / "r")
    found = checkpoint.finished(str(tmp_path / "r"), Settings(**{**BASE, **now}))
    assert (found is not None) is complete


def test_a_pointer_that_cannot_tell_sends_the_run_the_long_way(tmp_path):
    run = tmp_path / "r"
    settings = Settings(**BASE)
    assert checkpoint.finished(str(run), settings) is None  # a new run
    pointer(run)
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    (run / "checkpoints" / "latest.json").write_text(json.dumps({k: v for k, v in latest.items() if k != "settings"}))
    assert checkpoint.finished(str(run), settings) is None  # written by an older trainjob
    pointer(run)
    (run / "checkpoints" / "step-000000024.pt").unlink()
    assert checkpoint.finished(str(run), settings) is None  # the resume falls back to an older checkpoint
    pointer(run)
    (run / "checkpoints" / "step-000000024.json").write_bytes(b"garbage")
    assert checkpoint.finished(str(run), settings) is None  # the resume finds it corrupt
    pointer(run)
    assert checkpoint.finished(str(run), settings) is not None
    pointer(run, epoch=1)
    assert checkpoint.finished(str(run), settings) is None

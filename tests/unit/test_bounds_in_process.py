"""Bounds before allocation (issue 22) in process: an mlp too large for its data's input is refused
before a layer is made. Through the job: tests/job/test_hostile_bounds.py."""

import pytest

from job import models
from job.errors import SettingsError


def test_an_mlp_too_large_for_its_input_is_refused_before_it_is_built():
    # one width of 65536 passes the settings' own bound; on 3 x 4096 x 4096 images it is 3.3e12 weights
    settings = type("Settings", (), {"hidden_sizes": [65536]})
    with pytest.raises(SettingsError, match="over the bound of 2,000,000,000") as refused:
        models.mlp(settings, (3, 4096, 4096), 10)
    assert "JOB_HIDDEN_SIZES=65536" in str(refused.value) and refused.value.exit_code == 2


def test_more_classes_than_a_confusion_matrix_can_hold_are_refused_before_any_work():
    """Each evaluation keeps a classes x classes confusion matrix: 100,000 classes (what an index
    used to allow) would allocate 80 GB at the first evaluation. Image folders and shard indexes
    say so at once, naming the bound."""
    import pytest
    from pydantic import ValidationError

    from job.data import index, layout
    from job.errors import DataError

    too_many = {f"c{i:05d}": [f"train/c{i:05d}/0.jpg"] for i in range(layout.MAX_CLASSES + 1)}
    with pytest.raises(DataError, match=f"{layout.MAX_CLASSES + 1:,} class folders; at most {layout.MAX_CLASSES:,}"):
        layout.image_splits({"train": too_many}, "/data")
    names = list(too_many)
    with pytest.raises(ValidationError, match="class_names"):
        index.ShardIndex.model_validate({"format": "trainjob-shards", "format_version": index.FORMAT_VERSION,
                                         "kind": "image", "class_names": names, "fingerprint": "x", "files": 1,
                                         "bad_files": [], "splits": {}})
    classes, items, _ = layout.image_splits({"train": dict(list(too_many.items())[:layout.MAX_CLASSES])}, "/data")
    assert len(classes) == layout.MAX_CLASSES and len(items["train"]) == layout.MAX_CLASSES

"""`python -m job evaluate` and `predict` name what they read (issue 24): by default evaluate writes
to <run>/evaluations/<name>-<hash of the URI>-<split>/ and predict to
<run>/predictions/<name>-<hash of the URI>.jsonl, so two datasets both called `photos` do not
overwrite each other, and evaluation.json says which dataset (its URI, redacted) and split."""

import json
import os
import re

import pytest
import stage_dataset
from conftest import DIGITS, run_job


@pytest.fixture(scope="module")
def photos(tmp_path_factory, digits_arrays):
    """A trained run, and two different datasets with the same last segment: a/photos with MNIST's
    t10k pair (its test split is scored), b/photos with the training pair only (scored as "train")."""
    tmp_path = tmp_path_factory.mktemp("naming")
    stage_dataset.stage(digits_arrays, str(tmp_path / "digits"))
    trained = run_job(data_uri=str(tmp_path / "digits"), output_uri=str(tmp_path / "runs"), run_name="r", epochs=1,
                      **DIGITS)
    assert trained.returncode == 0, trained.stdout
    stage_dataset.stage(digits_arrays, str(tmp_path / "a" / "photos"))
    stage_dataset.stage(digits_arrays, str(tmp_path / "b" / "photos"))
    for name in os.listdir(tmp_path / "b" / "photos"):
        if name.startswith("t10k"):
            os.remove(tmp_path / "b" / "photos" / name)
    return tmp_path


def test_two_datasets_called_photos_get_their_own_evaluations_naming_uri_and_split(photos):
    tmp_path, run = photos, photos / "runs" / "r"
    scored = {}
    for where in ("a", "b"):
        uri = str(tmp_path / where / "photos")
        result = run_job("evaluate", str(run), uri)
        assert result.returncode == 0, result.stdout
        assert "split" in result.stdout and uri in result.stdout  # the log line names both too
        scored[where] = result
    folders = sorted(os.listdir(run / "evaluations"))
    assert len(folders) == 2 and all(re.fullmatch(r"photos-[0-9a-f]{8}-(test|train)", f) for f in folders), folders
    evaluations = {f: json.loads((run / "evaluations" / f / "evaluation.json").read_text()) for f in folders}
    by_data = {e["data"]: (f, e) for f, e in evaluations.items()}
    assert set(by_data) == {str(tmp_path / "a" / "photos"), str(tmp_path / "b" / "photos")}
    folder_a, a = by_data[str(tmp_path / "a" / "photos")]
    folder_b, b = by_data[str(tmp_path / "b" / "photos")]
    assert a["split"] == "test" and folder_a.endswith("-test")
    assert b["split"] == "train" and folder_b.endswith("-train")
    assert a["samples"] != b["samples"]  # each scored its own data: nothing overwritten
    for f in folders:
        assert (run / "evaluations" / f / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    # the same dataset evaluated again writes to the same folder (a re-evaluation replaces it)
    again = run_job("evaluate", str(run), str(tmp_path / "a" / "photos") + "/")
    assert again.returncode == 0, again.stdout
    assert sorted(os.listdir(run / "evaluations")) == folders


def test_two_input_folders_called_photos_get_their_own_predictions(photos):
    """predict wrote <run>/predictions/photos.jsonl for both: the second overwrote the first."""
    tmp_path, run = photos, photos / "runs" / "r"
    written = {}
    for where in ("a", "b"):
        uri = str(tmp_path / where / "photos")
        result = run_job("predict", str(run), uri)
        assert result.returncode == 0, result.stdout
        written[where] = re.search(r"predictions for \d+ inputs written to (\S+)$", result.stdout, re.M)[1]
    files = sorted(os.listdir(run / "predictions"))
    assert len(files) == 2 and all(re.fullmatch(r"photos-[0-9a-f]{8}\.jsonl", f) for f in files), files
    assert sorted(os.path.basename(w) for w in written.values()) == files  # the log names the file
    inputs = {w: {json.loads(line)["input"] for line in open(path)} for w, path in written.items()}
    # a/photos has the t10k images too, b/photos the training images only: each file holds its own
    assert any(name.startswith("t10k-images") for name in inputs["a"])
    assert not any(name.startswith("t10k-images") for name in inputs["b"])
    again = run_job("predict", str(run), str(tmp_path / "a" / "photos") + "/")  # the same inputs: the same file
    assert again.returncode == 0, again.stdout
    assert sorted(os.listdir(run / "predictions")) == files

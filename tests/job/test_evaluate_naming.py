"""`python -m job evaluate` names what it scored (issue 24): by default it writes to
<run>/evaluations/<name>-<hash of the URI>-<split>/, so two datasets both called `photos` do not
overwrite each other, and evaluation.json says which dataset (its URI, redacted) and split."""

import json
import os
import re

import stage_dataset
from conftest import DIGITS, run_job


def test_two_datasets_called_photos_get_their_own_evaluations_naming_uri_and_split(tmp_path, digits_arrays):
    stage_dataset.stage(digits_arrays, str(tmp_path / "digits"))
    trained = run_job(data_uri=str(tmp_path / "digits"), output_uri=str(tmp_path / "runs"), run_name="r", epochs=1,
                      **DIGITS)
    assert trained.returncode == 0, trained.stdout
    run = tmp_path / "runs" / "r"
    # two different datasets with the same last segment: one with MNIST's t10k pair (its test split
    # is scored), one with the training pair only (scored as "train")
    stage_dataset.stage(digits_arrays, str(tmp_path / "a" / "photos"))
    stage_dataset.stage(digits_arrays, str(tmp_path / "b" / "photos"))
    for name in os.listdir(tmp_path / "b" / "photos"):
        if name.startswith("t10k"):
            os.remove(tmp_path / "b" / "photos" / name)
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

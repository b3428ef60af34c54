"""Records that name files, and resumes under changed settings (issue 22, items 4 and 5), through
the real job: a checkpoint pointer or manifest that climbs out of its folder, `export` following
one, `predict --output` into the model, a resume with a changed input size or freeze, and one
with a changed learning rate. The in-process side is tests/unit/test_records_in_process.py."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import stage_dataset
from conftest import DIGITS, error_line, read_history, run_job
from PIL import Image


def files(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, digits_arrays):
    """Two completed runs side by side in one output location: `victim` (whose files an attack
    aims at) and `r` (whose records are forged), two epochs each, with their exported models."""
    root = tmp_path_factory.mktemp("records")
    stage_dataset.stage(digits_arrays, str(root / "digits"))
    for name, lr in (("victim", "0.02"), ("r", DIGITS["lr"])):
        result = run_job(data_uri=str(root / "digits"), output_uri=str(root / "out"), run_name=name, epochs=2,
                         **{**DIGITS, "lr": lr})
        assert result.returncode == 0, result.stdout
    return root


@pytest.fixture
def runs(two_runs, tmp_path):
    """A copy of the two runs for one test to attack: (output location, settings that resume `r`)."""
    shutil.copytree(two_runs / "out", tmp_path / "out")
    settings = dict(data_uri=str(two_runs / "digits"), output_uri=str(tmp_path / "out"), run_name="r", epochs=3,
                    **DIGITS)
    return tmp_path / "out", settings


def forge(path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_a_pointer_into_another_run_is_refused_and_moves_nothing(runs):
    """The critical finding: a resume followed latest.json to ../../victim/checkpoints/best.pt,
    found it "corrupt" against r's checkpoint and moved the victim's best.pt into r."""
    out, settings = runs
    forge(out / "r" / "checkpoints" / "latest.json", file="../../victim/checkpoints/best.pt")
    victim = files(out / "victim")
    result = run_job(**settings)
    assert result.returncode == 3, result.stdout
    line = error_line(result)
    assert "checkpoints/latest.json" in line and "../../victim/checkpoints/best.pt" in line, line
    assert files(out / "victim") == victim
    assert not (out / "r" / "checkpoints" / "corrupt").exists()
    assert len(read_history(out / "r")) == 2  # r did not train on


def test_a_manifest_naming_another_runs_checkpoint_is_refused(runs):
    """A manifest whose file climbs out, with the size and sha256 of what it names: followed, r
    went on from the victim's weights, optimizer and history as if they were its own."""
    out, settings = runs
    best = (out / "victim" / "checkpoints" / "best.pt").read_bytes()
    newest = sorted((out / "r" / "checkpoints").glob("step-*.json"))[-1]
    forge(newest, file="../../victim/checkpoints/best.pt", size=len(best), sha256=hashlib.sha256(best).hexdigest())
    victim = files(out / "victim")
    result = run_job(**settings)
    assert result.returncode == 3, result.stdout
    line = error_line(result)
    assert f"checkpoints/{newest.name}" in line and "not a file in its own folder" in line, line
    assert files(out / "victim") == victim and len(read_history(out / "r")) == 2


def test_export_refuses_a_manifest_that_climbs_out(runs, tmp_path):
    out, _ = runs
    best = (out / "victim" / "checkpoints" / "best.pt").read_bytes()
    forge(out / "r" / "checkpoints" / "best.json", file="../../victim/checkpoints/best.pt", size=len(best),
          sha256=hashlib.sha256(best).hexdigest())
    result = run_job("export", str(out / "r" / "checkpoints" / "best.pt"), "--output", str(tmp_path / "model"))
    assert result.returncode == 3, result.stdout
    assert "checkpoints/best.json" in error_line(result)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("command, model, output", [
    ("predict", "r/model", "r/model/model.safetensors"),
    ("predict", "r", "r/model/config.json"),  # the run's URI: its model/ folder is the model's
    ("predict", "r/model", "r/model/sub/../predictions.jsonl"),
    ("evaluate", "r/model", "r/model"),
    ("predict", "r", "r/checkpoints/best.pt"),  # the run the model came from: its checkpoints too
    ("evaluate", "r/model", "r/checkpoints"),
])
def test_predict_and_evaluate_refuse_an_output_inside_the_model(runs, command, model, output):
    out, settings = runs
    before = files(out / "r")
    result = run_job(command, str(out / model), settings["data_uri"], "--output", str(out / output))
    assert result.returncode == 2, result.stdout
    assert "is inside" in error_line(result) and "could overwrite" in error_line(result)
    assert files(out / "r") == before


def test_a_changed_learning_rate_continues_logged_and_recorded(runs):
    """The same run name with lr 0.01 -> 0.02 (and one more epoch) continued silently, and the
    summary's recipe then described epochs it did not train."""
    out, settings = runs
    result = run_job(**{**settings, "lr": "0.02"})
    assert result.returncode == 0, result.stdout
    changed = [line for line in result.stdout.splitlines() if "settings changed since the checkpoint" in line]
    assert len(changed) == 1 and "JOB_LR 0.01 -> 0.02" in changed[0] and "JOB_EPOCHS 2 -> 3" in changed[0], changed
    summary = json.loads((out / "r" / "summary.json").read_text())
    [segment] = summary["settings_changes"]
    assert segment["epoch"] == 2 and segment["seen"] == 0
    assert segment["changes"] == {"epochs": {"old": 2, "new": 3}, "lr": {"old": 0.01, "new": 0.02}}
    # the recipe of each segment, and of the best epoch: not the last settings for every epoch
    assert [(r["from_epoch"], r["recipe"].split(", ")[1]) for r in summary["recipe_segments"]] == \
        [(1, "adam lr 0.01"), (3, "adam lr 0.02")], summary["recipe_segments"]
    assert summary["best_epoch_recipe"] == next(r["recipe"] for r in reversed(summary["recipe_segments"])
                                                if r["from_epoch"] <= summary["best_epoch"])
    assert [row["lr"] for row in read_history(out / "r")] == [0.01, 0.01, 0.02]


def image_folders(root, per_class: int = 12) -> None:
    rng = np.random.default_rng(0)
    for c, color in (("rose", (220, 40, 40)), ("tulip", (40, 40, 220))):
        (root / "train" / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(color) + rng.normal(0, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "train" / c / f"{i:03d}.png")


def test_a_resume_that_would_change_the_model_or_its_inputs_names_each_change(tmp_path):
    """A changed JOB_IMAGE_SIZE or JOB_FREEZE was exit 1 with a state_dict traceback."""
    image_folders(tmp_path / "data")
    settings = dict(data_uri=str(tmp_path / "data"), output_uri=str(tmp_path / "out"), run_name="r", model="mlp",
                    image_size=16, epochs=1, batch_size=8, num_workers=0, **DIGITS)
    assert run_job(**settings).returncode == 0
    for changes, named in (
        ({"image_size": 20}, ["JOB_IMAGE_SIZE was 16, now 20"]),
        ({"freeze": "all", "hidden_sizes": "16"},
         ["JOB_FREEZE was none, now all", "JOB_HIDDEN_SIZES was [32], now [16]"]),
    ):
        result = run_job(**{**settings, **changes, "epochs": 2})
        assert result.returncode == 3, result.stdout
        line = error_line(result)
        assert all(n in line for n in named) and "JOB_RUN_NAME" in line, line
    assert len(read_history(tmp_path / "out" / "r")) == 1

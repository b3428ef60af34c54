"""Errors and hints in the user's terms (issue 24): an error names the URI the user gave, never
the local cache folder it was mirrored into; an existing empty folder is "empty", not "not
found"; a file that is not an image is named by its key; and the quiet traps each get a line:
photos on the default mlp, a remote dataset with the outputs left in the container, a JOB_FREEZE
past the model's stages, bad files named by every rank. The job as a real subprocess, S3 a real
server (moto), torchrun real with gloo."""

import io
import os
import subprocess
import sys

import numpy as np
from conftest import CACHE_DIR, ROOT, error_line, job_env, run_job
from PIL import Image
from test_launch import run_launcher

from job.errors import DataError, SettingsError


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(value).integers(0, 40, (16, 16, 3))
    Image.fromarray(np.clip(value + noise, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def photos(put, per_class: int = 6) -> None:
    """Two classes of small PNGs and one text file named .png, through `put(relative key, bytes)`."""
    for i in range(per_class):
        put(f"train/rose/{i}.png", png(30 + i))
        put(f"train/tulip/{i}.png", png(200 - i))
    put("train/tulip/notes.png", b"shopping list, not a photo")


def local_photos(root) -> str:
    def put(key, data):
        os.makedirs(os.path.dirname(os.path.join(root, key)), exist_ok=True)
        with open(os.path.join(root, key), "wb") as f:
            f.write(data)

    photos(put)
    return str(root)


def test_errors_about_a_remote_dataset_name_its_uri_not_the_cache(s3, tmp_path):
    s3.pipe("data/one/train/rose/a.png", png(10))
    for args in ((), ("--check",), ("prepare", "s3://data/one", "s3://data/one-shards")):
        result = run_job(*args, data_uri="s3://data/one", output_uri="s3://out/runs")
        assert result.returncode == DataError.exit_code, result.stdout[-3000:]
        line = error_line(result)
        # prepare said "data/one/train holds ...": the bucket's path, not the URI given
        assert "s3://data/one/train holds 1 class folder(s); a classifier needs at least 2" in line, (args, line)
        assert CACHE_DIR not in line, line


def test_a_file_where_the_data_folder_belongs_is_a_setting_to_fix(s3, tmp_path):
    """A file as JOB_DATA_URI was "not found (NotADirectoryError)" (exit 3), or on S3 an object
    "listed under itself but not inside it"; it is a file, a folder is expected: exit 2."""
    (tmp_path / "photo.png").write_bytes(png(10))
    s3.pipe("data/photo.png", png(10))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text("{}")
    expected = ("is a file, not a folder: give the folder that holds the data (image files in class folders, "
                "MNIST-format IDX files, or a sharded dataset's index.json)")
    for uri in (str(tmp_path / "photo.png"), "s3://data/photo.png"):
        for args in ((), ("--check",)):
            result = run_job(*args, data_uri=uri, output_uri=str(tmp_path / "out"))
            assert result.returncode == SettingsError.exit_code, (args, result.stdout[-3000:])
            line = error_line(result)
            assert f"JOB_DATA_URI={uri} {expected} (exit 2" in line and "not found" not in line, (args, line)
        prepared = run_job("prepare", uri, str(tmp_path / "dest"))  # prepare's source: no variable to name
        assert prepared.returncode == SettingsError.exit_code and f"{uri} {expected} (exit 2" in error_line(prepared)
    index = run_job("--check", data_uri=str(tmp_path / "shards" / "index.json"), output_uri=str(tmp_path / "out"))
    assert f"; here JOB_DATA_URI={tmp_path / 'shards'} (exit 2" in error_line(index)  # the folder to give


def test_a_file_that_is_not_an_image_is_named_by_its_key(s3, tmp_path):
    photos(lambda key, data: s3.pipe(f"data/photos/{key}", data))
    result = run_job(data_uri="s3://data/photos", output_uri="s3://out/runs", image_size=16, epochs=1,
                     max_bad_fraction=0.01)
    assert result.returncode == DataError.exit_code, result.stdout[-3000:]
    assert "skipping s3://data/photos/train/tulip/notes.png: not an image" in result.stdout, result.stdout[-3000:]
    assert "BytesIO" not in result.stdout and CACHE_DIR not in error_line(result)
    assert ("1 of 13 files in s3://data/photos are not readable images (7.7% > JOB_MAX_BAD_FRACTION=0.01); first: "
            "s3://data/photos/train/tulip/notes.png: not an image") in error_line(result)


def test_an_existing_empty_folder_is_empty_not_missing(s3, tmp_path):
    (tmp_path / "empty").mkdir()
    s3.pipe("data/empty/", b"")  # the S3 console's "Create folder": a marker object, nothing under it
    for uri in (str(tmp_path / "empty"), "s3://data/empty"):
        for args in ((), ("--check",)):
            result = run_job(*args, data_uri=uri, output_uri=str(tmp_path / "out"))
            assert result.returncode == DataError.exit_code, result.stdout[-3000:]
            line = error_line(result)
            assert f"no dataset found at {uri} (it is empty)" in line and "not found" not in line, (args, line)
    missing = run_job("--check", data_uri=str(tmp_path / "missing"), output_uri=str(tmp_path / "out"))
    assert "not found" in error_line(missing)


def test_photos_on_the_default_mlp_get_a_hint_naming_a_torchvision_model(tmp_path):
    data = local_photos(tmp_path / "photos")
    hint = "hint: JOB_MODEL is not set, so an mlp (the MNIST recipe) trains on these 3x16x16 colour images"
    for args in (("--check",), ()):  # --check first: after the run, both answer "complete" from its records
        result = run_job(*args, data_uri=data, output_uri=str(tmp_path / "out"), image_size=16, epochs=1,
                         max_bad_fraction=0.5)
        assert result.returncode == 0, result.stdout[-3000:]
        assert result.stdout.count(hint) == 1 and "JOB_MODEL=resnet18" in result.stdout, result.stdout[-3000:]
    chosen = run_job("--check", data_uri=data, output_uri=str(tmp_path / "out"), image_size=16, model="mlp",
                     max_bad_fraction=0.5)
    assert chosen.returncode == 0 and "hint: JOB_MODEL" not in chosen.stdout, chosen.stdout[-3000:]


def test_remote_data_with_outputs_left_in_the_container_is_warned_once(s3, tmp_path):
    """cwd is a scratch folder: the default ./runs must not land in the repository."""
    s3.pipe("data/one/train/rose/a.png", png(10))
    env = {k: v for k, v in job_env(data_uri="s3://data/one").items() if k != "JOB_OUTPUT_URI"}
    env["PYTHONPATH"] = ROOT
    for args in ((), ("--check",)):
        result = subprocess.run([sys.executable, "-m", "job", *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=600)
        warning = "WARNING JOB_OUTPUT_URI is not set: this run writes its checkpoints and model to ./runs inside the "
        assert result.stdout.count(warning) == 1, result.stdout[-3000:]
        assert "lost with it (the data comes from s3://data/one)" in result.stdout
    given = run_job("--check", data_uri="s3://data/one", output_uri="s3://out/runs")
    assert "JOB_OUTPUT_URI is not set" not in given.stdout, given.stdout[-3000:]


def test_a_freeze_past_the_models_stages_is_refused_naming_the_range(tmp_path):
    data = local_photos(tmp_path / "photos")
    for args in ((), ("--check",)):
        result = run_job(*args, data_uri=data, output_uri=str(tmp_path / "out"), model="resnet18", freeze=9,
                         image_size=16, max_bad_fraction=0.5)
        assert result.returncode == SettingsError.exit_code, result.stdout[-3000:]
        assert ("JOB_FREEZE=9: ResNet has 6 backbone stage(s) (conv1, bn1, layer1, layer2, layer3, layer4), so N, "
                "the last stages to train, can be 1 to 5") in error_line(result)


def test_only_rank_0_names_the_bad_files(tmp_path):
    """Every rank scans the image folder; one list of skipped files in the log, not one a rank."""
    data = local_photos(tmp_path / "photos")
    result = run_launcher("--standalone", "--nproc-per-node=2", data_uri=data, output_uri=str(tmp_path / "out"),
                          model="resnet18", pretrained="none", freeze="none", image_size=16, epochs=1,
                          max_bad_fraction=0.5)
    assert result.returncode == 0, result.stdout[-3000:]
    named = f"skipping {data}/train/tulip/notes.png: not an image"
    skipped = [line for line in result.stdout.splitlines() if named in line]
    assert len(skipped) == 1 and " rank 0 " in skipped[0], result.stdout[-3000:]

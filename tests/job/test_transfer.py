"""Image folders and transfer learning: real JPEG/PNG trees (bad files included) in the S3 server,
resnet18 with weights from an s3:// state dict, freeze modes and the feature cache."""

import io
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from conftest import read_history, run_job
from PIL import Image

from job.data import images
from job.models import build_model

CLASSES = ("daisy", "rose", "tulip")
COLORS = {"daisy": (230, 230, 60), "rose": (200, 30, 40), "tulip": (120, 40, 200)}
RECIPE = dict(model="resnet18", image_size=32, epochs=2, batch_size=16, optimizer="adam", lr=0.001,
              num_workers=0, freeze="all", max_bad_fraction=0.1)


def make_tree(root, per_class=10, val=True, bad=True):
    """Class folders of real JPEG and PNG photos-to-be: a class colour plus noise, in several
    sizes and modes (RGB, L, RGBA, CMYK, P), and a truncated JPEG and a text file named .jpg."""
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "CMYK", "P"]
    for split, n in (("train", per_class), ("valid", per_class // 2)) if val else (("train", per_class),):
        for c in CLASSES:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                h, w = [(40, 30), (64, 64), (50, 80)][i % 3]
                pixels = np.clip(np.array(COLORS[c]) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels).convert(modes[i % len(modes)])
                ext = "png" if img.mode in ("RGBA", "P") or (i % 2 and img.mode != "CMYK") else "jpg"
                img.save(os.path.join(root, split, c, f"{i:03d}.{ext}"))
    if bad:
        good = open(os.path.join(root, "train", "rose", "000.jpg"), "rb").read()
        open(os.path.join(root, "train", "rose", "truncated.jpg"), "wb").write(good[: len(good) // 2])
        open(os.path.join(root, "train", "tulip", "notes.jpg"), "w").write("not an image")


def weights_file(path, model="resnet18"):
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(model).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowers")
    make_tree(str(root / "data"))
    return root


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_flowers_from_s3_with_weights_from_s3(s3, tree, tmp_path):
    s3.put(str(tree / "data"), "data/flowers", recursive=True)
    s3.put(weights_file(str(tmp_path / "resnet18.pt")), "data/weights/resnet18.pt")
    result = run_job(data_uri="s3://data/flowers", output_uri="s3://out", run_name="flowers",
                     pretrained="s3://data/weights/resnet18.pt", cache_dir=str(tmp_path / "cache"), **RECIPE)
    assert result.returncode == 0, result.stdout
    assert "skipping s3://data/flowers/train/rose/truncated.jpg" in result.stdout  # the object's URI, not the cache's
    assert "skipping s3://data/flowers/train/tulip/notes.jpg" in result.stdout
    assert "feature cache: computing backbone features" in result.stdout
    summary = json.loads(s3.cat_file("out/flowers/summary.json"))
    assert summary["status"] == "completed" and summary["bad_files"] == 2
    assert summary["class_to_idx"] == {c: i for i, c in enumerate(CLASSES)}
    assert summary["train_samples"] == 30 and summary["val_samples"] == 15  # valid/ is the validation set
    history = read_history((s3, "out/flowers"))
    assert [r["epoch"] for r in history] == [1, 2]
    best = torch.load(io.BytesIO(s3.cat_file("out/flowers/checkpoints/best.pt")), map_location="cpu", weights_only=True)
    assert best["class_names"] == list(CLASSES)
    # the best checkpoint, loaded into a fresh model, reproduces its recorded validation accuracy
    settings = type("S", (), {"model": "resnet18", "pretrained": "none", "hidden_sizes": []})
    model, _ = build_model(settings, (3, 32, 32), 3)
    model.load_state_dict(best["model"])
    model.eval()
    found = images.scan(str(tree / "data"), 1, 1 << 30, 50_000_000)
    evaluation = images.ImageTransform(32, augment=False, normalize=True)
    with torch.no_grad():
        x = torch.stack([evaluation(Image.open(p).convert("RGB"), False, None) for p, _ in found["val"]])
        accuracy = (model(x).argmax(1) == torch.tensor([y for _, y in found["val"]])).float().mean().item()
    assert accuracy == pytest.approx(summary["best_val_accuracy"], abs=1e-6)


@pytest.mark.parametrize("freeze, trained", [("all", ("fc.",)), ("1", ("fc.", "layer4."))])
def test_freeze_trains_exactly_the_chosen_stages(tmp_path, tree, freeze, trained):
    weights = weights_file(str(tmp_path / "w.pt"))
    result = run_job(data_uri=str(tree / "data"), output_uri=str(tmp_path), run_name="r", pretrained=weights,
                     **{**RECIPE, "epochs": 1, "freeze": freeze, "feature_cache": "off"})
    assert result.returncode == 0, result.stdout
    before, after = load(weights), load(tmp_path / "r" / "checkpoints" / "last.pt")["model"]
    for name, tensor in after.items():
        changed = name not in before or before[name].shape != tensor.shape or not torch.equal(before[name], tensor)
        assert changed == name.startswith(trained), name  # batch-norm statistics of frozen stages too


def test_feature_cache_matches_the_full_forward_and_is_reused(tmp_path, tree):
    weights = weights_file(str(tmp_path / "w.pt"))
    common = dict(data_uri=str(tree / "data"), output_uri=str(tmp_path), pretrained=weights,
                  cache_dir=str(tmp_path / "cache"), **RECIPE)
    cached = run_job(run_name="cached", **common)
    full = run_job(run_name="full", feature_cache="off", **common)
    again = run_job(run_name="again", **common)
    for r in (cached, full, again):
        assert r.returncode == 0, r.stdout
    assert "feature cache: computing" in cached.stdout and "feature cache: using" in again.stdout
    for a, b in zip(read_history(tmp_path / "cached"), read_history(tmp_path / "full"), strict=True):
        for k in ("train_loss", "val_loss", "val_accuracy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    # the cached run's checkpoint still holds the whole model, backbone included
    assert "layer1.0.conv1.weight" in load(tmp_path / "cached" / "checkpoints" / "last.pt")["model"]


def test_bad_image_folders_exit_3_with_a_clear_message(tmp_path):
    one = tmp_path / "one"
    os.makedirs(one / "train" / "rose")
    Image.new("RGB", (8, 8)).save(one / "train" / "rose" / "a.png")
    result = run_job(data_uri=str(one), output_uri=str(tmp_path / "out"), **{**RECIPE, "freeze": "none"})
    assert result.returncode == 3 and "at least 2" in result.stdout, result.stdout

    os.makedirs(one / "train" / "tulip")
    result = run_job(data_uri=str(one), output_uri=str(tmp_path / "out"), **{**RECIPE, "freeze": "none"})
    assert result.returncode == 3 and "empty class folder(s)" in result.stdout and "tulip" in result.stdout

    many_bad = tmp_path / "bad"
    make_tree(str(many_bad), per_class=4, val=False)
    result = run_job(data_uri=str(many_bad), output_uri=str(tmp_path / "out"), **{**RECIPE, "max_bad_fraction": 0.01})
    assert result.returncode == 3 and "JOB_MAX_BAD_FRACTION=0.01" in result.stdout
    assert "Traceback" not in result.stdout


def test_weights_that_do_not_fit_and_unknown_models(tmp_path, tree):
    wrong = weights_file(str(tmp_path / "mobilenet.pt"), "mobilenet_v3_small")
    result = run_job(data_uri=str(tree / "data"), output_uri=str(tmp_path), pretrained=wrong, **RECIPE)
    assert result.returncode == 3, result.stdout
    assert "do not fit ResNet" in result.stdout and "missing" in result.stdout and "unexpected" in result.stdout
    result = run_job(data_uri=str(tree / "data"), output_uri=str(tmp_path), **{**RECIPE, "model": "resnet15"})
    assert result.returncode == 2 and "did you mean" in result.stdout and "resnet152" in result.stdout

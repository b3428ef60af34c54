"""config.json's preprocessing is a recipe a user can follow without PyTorch (issue 24): PIL,
numpy and ONNX Runtime alone, reading config.json literally, give `python -m job predict`'s
classes and probabilities. Configs written before the recipe fields still load; one whose recipe
says something predict does not do is refused. Both kinds: photos (a resnet18) and IDX digits
given as image files."""

import json
import shutil

import numpy as np
import onnxruntime
import pytest
import stage_dataset
from conftest import DIGITS, run_job
from PIL import Image
from test_transfer import CLASSES, COLORS, RECIPE, make_tree, weights_file

# photos of several sizes (downscaled 2-27x: the antialiasing matters; odd sizes: the crop offsets
# round half to even) and modes PIL converts to RGB
SIZES = [(40, 30), (64, 64), (50, 80), (480, 640), (333, 500), (1001, 751), (75, 203), (38, 39)]
MODES = ["RGB", "L", "RGBA", "P", "CMYK"]


def photos(folder) -> list[str]:
    rng = np.random.default_rng(1)
    folder.mkdir()
    names = []
    for i, (h, w) in enumerate(SIZES):
        c = CLASSES[i % len(CLASSES)]
        # a class colour, smooth shading and noise: detail the resize has to average away
        shade = np.linspace(-60, 60, w)[None, :, None]
        pixels = np.clip(np.array(COLORS[c]) + shade + rng.normal(0, 50, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels).convert(MODES[i % len(MODES)])
        name = f"{i:02d}.{'jpg' if img.mode in ('RGB', 'L', 'CMYK') else 'png'}"
        img.save(folder / name)
        names.append(name)
    return names


def recipe(path, prep: dict) -> np.ndarray:
    """One image as config.json's preprocessing says, with PIL and numpy only."""
    assert prep["kind"] == "image" and prep["exif_orientation"] == "ignored"
    img = Image.open(path).convert(prep["convert"])
    w, h = img.size
    short = prep["resize_shorter_side"]
    assert prep["resize_longer_side"] == "floor" and prep["interpolation"] == "bilinear" and prep["antialias"]
    size = (short, short * h // w) if w <= h else (short * w // h, short)
    img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)  # PIL antialiases when it reduces
    crop = prep["center_crop"]
    assert prep["center_crop_offset"] == "round_half_even"  # Python's round
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    img = img.crop((left, top, left + crop, top + crop))
    assert prep["channel_order"] == "RGB" and img.mode == "RGB"
    x = np.asarray(img).astype(prep["dtype"]) * np.float32(prep["scale"])  # (H, W, C)
    if prep["mean"] is not None:
        x = (x - np.array(prep["mean"], dtype=prep["dtype"])) / np.array(prep["std"], dtype=prep["dtype"])
    assert prep["layout"] == "CHW"
    return x.transpose(2, 0, 1).astype(prep["dtype"])


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    make_tree(str(root / "data"), per_class=12, bad=False)
    result = run_job(data_uri=str(root / "data"), output_uri=str(root / "runs"), run_name="r", export="onnx",
                     pretrained=weights_file(str(root / "w.pt")), **{**RECIPE, "max_bad_fraction": 0.0})
    assert result.returncode == 0, result.stdout
    return root, root / "runs" / "r"


def test_pil_numpy_and_onnxruntime_following_config_json_give_predicts_answers(image_run):
    root, run = image_run
    names = photos(root / "new")
    result = run_job("predict", str(run), str(root / "new"), "--output", str(root / "p.jsonl"))
    assert result.returncode == 0, result.stdout
    predicted = {r["input"]: r for r in map(json.loads, (root / "p.jsonl").read_text().splitlines())}
    assert sorted(predicted) == names
    config = json.loads((run / "model" / "config.json").read_text())
    prep = config["preprocessing"]
    assert config["input"] == {"layout": "NCHW", "dtype": "float32", "batch": "dynamic"}
    assert len(prep["steps"]) == 5 and "reducing_gap=None" in prep["steps"][1]
    session = onnxruntime.InferenceSession(str(run / "model" / config["onnx"]), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images"
    batch = np.stack([recipe(root / "new" / n, prep) for n in names])
    probabilities = softmax(session.run(None, {"images": batch})[0])
    for name, probs in zip(names, probabilities, strict=True):
        row = predicted[name]
        assert config["class_names"][int(probs.argmax())] == row["class"], name
        theirs = {t["class"]: t["probability"] for t in row["top5"]}
        ours = dict(zip(config["class_names"], probs.tolist(), strict=True))
        # PIL's resize and torchvision's (what predict runs) differ by 1/255 on 0.1-2% of the pixels:
        # probabilities up to 1.6e-4 apart here; PIL's bilinear straight to 32x32 gave 6e-3 to 3e-2
        assert ours == pytest.approx(theirs, abs=1e-3), name


def test_a_config_from_before_the_recipe_still_loads_and_a_false_recipe_is_refused(image_run, tmp_path):
    root, run = image_run
    for name in ("old", "false"):
        shutil.copytree(run / "model", tmp_path / name)
    config = json.loads((run / "model" / "config.json").read_text())
    prep = config["preprocessing"]
    old = {k: prep[k] for k in ("kind", "convert", "resize_shorter_side", "center_crop", "scale", "mean", "std")}
    (tmp_path / "old" / "config.json").write_text(json.dumps({**config, "preprocessing": old}))
    inputs = root / "data" / "valid" / CLASSES[0]
    result = run_job("predict", str(tmp_path / "old"), str(inputs), "--output", str(tmp_path / "old.jsonl"))
    assert result.returncode == 0, result.stdout
    reference = run_job("predict", str(run), str(inputs), "--output", str(tmp_path / "new.jsonl"))
    assert reference.returncode == 0, reference.stdout
    assert (tmp_path / "old.jsonl").read_text() == (tmp_path / "new.jsonl").read_text()
    false = {**config, "preprocessing": {**prep, "interpolation": "nearest"}}
    (tmp_path / "false" / "config.json").write_text(json.dumps(false))
    refused = run_job("predict", str(tmp_path / "false"), str(inputs), "--output", str(tmp_path / "f.jsonl"))
    assert refused.returncode == 3 and "interpolation" in refused.stdout, refused.stdout


def test_an_idx_models_recipe_for_image_files_gives_predicts_answers(tmp_path, digits_arrays):
    stage_dataset.stage(digits_arrays, str(tmp_path / "digits"))
    trained = run_job(data_uri=str(tmp_path / "digits"), output_uri=str(tmp_path / "runs"), run_name="r", epochs=2,
                      export="onnx", **DIGITS)
    assert trained.returncode == 0, trained.stdout
    model = tmp_path / "runs" / "r" / "model"
    # digits as image files: some as stored, some enlarged, in colour and out of shape
    (tmp_path / "new").mkdir()
    names = []
    for i, pixels in enumerate(digits_arrays["test_images"][:12]):
        img = Image.fromarray(pixels)
        if i % 2:
            img = img.convert("RGB").resize((42 + i, 56), Image.Resampling.NEAREST)
        names.append(f"{i:02d}.png")
        img.save(tmp_path / "new" / names[-1])
    result = run_job("predict", str(model), str(tmp_path / "new"), "--output", str(tmp_path / "p.jsonl"))
    assert result.returncode == 0, result.stdout
    predicted = {r["input"]: r for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    config = json.loads((model / "config.json").read_text())
    prep = config["preprocessing"]
    assert prep["kind"] == "idx" and prep["convert"] == "L" and prep["interpolation"] == "bilinear"
    assert prep["mean"] is None and prep["layout"] == "CHW" and prep["channels"] == 1

    def follow(path) -> np.ndarray:
        img = Image.open(path).convert(prep["convert"]).resize((prep["width"], prep["height"]),
                                                               Image.Resampling.BILINEAR)
        return (np.asarray(img).astype(prep["dtype"]) * np.float32(prep["scale"]))[None]

    session = onnxruntime.InferenceSession(str(model / config["onnx"]), providers=["CPUExecutionProvider"])
    probabilities = softmax(session.run(None, {"images": np.stack([follow(tmp_path / "new" / n) for n in names])})[0])
    for name, probs in zip(names, probabilities, strict=True):
        row = predicted[name]
        assert config["class_names"][int(probs.argmax())] == row["class"], name
        theirs = {t["class"]: t["probability"] for t in row["top5"]}
        ours = {c: p for c, p in zip(config["class_names"], probs.tolist(), strict=True) if c in theirs}
        assert ours == pytest.approx(theirs, abs=1e-4), name  # PIL both sides: only ONNX against PyTorch

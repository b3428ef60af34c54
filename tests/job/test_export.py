"""Using what was trained (issue 15), through the real job: the exported model, predict and
evaluate against the checkpoint's own answers, export from any checkpoint, and experiment
tracking with an MLflow store that really runs (SQLite), one that refuses connections, one that
never answers, and TensorBoard event files."""

import json
import os
import struct

import numpy as np
import pytest
import stage_dataset
import torch
from conftest import DIGITS, _free_port, read_history, run_job
from faultproxy import FaultProxy
from PIL import Image
from test_transfer import CLASSES, RECIPE, make_tree, weights_file

from job import export
from job.data import images
from job.data.idx import idx_bytes, read_idx
from job.errors import DataError


def command(*args, timeout=600, **settings):
    return run_job(*args, timeout=timeout, **settings)


def checkpoint_model(run_dir, config) -> torch.nn.Module:
    """The run's best checkpoint in a model built as trainjob builds it: the reference answers."""
    state = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    model = export.build(config)
    model.load_state_dict(state["model"])
    return model.eval()


def predictions(path) -> dict:
    return {row["input"]: row for row in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_arrays):
    root = tmp_path_factory.mktemp("digits-run")
    stage_dataset.stage(digits_arrays, str(root / "digits"))
    result = run_job(data_uri=str(root / "digits"), output_uri=str(root / "runs"), run_name="r", epochs=3,
                     export="onnx", **DIGITS)
    assert result.returncode == 0, result.stdout
    return root, root / "runs" / "r", result


def test_a_completed_run_exports_a_verified_model(digits_run):
    root, run, result = digits_run
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["class_names"] == [str(i) for i in range(10)] and config["input_shape"] == [1, 28, 28]
    assert config["preprocessing"]["kind"] == "idx" and config["onnx"] == "model.onnx"
    assert config["verification"]["samples"] == 287 and config["verification"]["top1_disagreements"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert config["source"]["epoch"] == summary["best_epoch"]
    assert config["source"]["val_accuracy"] == pytest.approx(summary["best_val_accuracy"])
    assert "model exported to" in result.stdout
    # the ONNX model alone, in ONNX Runtime, answers as the checkpoint does on the test images
    import onnxruntime

    x = torch.from_numpy(read_idx(str(root / "digits" / "t10k-images-idx3-ubyte.gz"), 3, 1 << 30).copy())
    x = x.unsqueeze(1).float() / 255
    session = onnxruntime.InferenceSession(str(run / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_classes = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].argmax(1)
    with torch.no_grad():
        assert (checkpoint_model(run, config)(x).argmax(1).numpy() == onnx_classes).all()


def test_predict_on_idx_files_matches_the_checkpoint(digits_run):
    root, run, _ = digits_run
    result = command("predict", str(run), str(root / "digits"))
    assert result.returncode == 0, result.stdout
    (written,) = (run / "predictions").glob("digits-*.jsonl")  # named by the inputs and a hash of their URI
    rows = predictions(written)
    config = json.loads((run / "model" / "config.json").read_text())
    x = torch.from_numpy(read_idx(str(root / "digits" / "t10k-images-idx3-ubyte.gz"), 3, 1 << 30).copy())
    with torch.no_grad():
        expected = checkpoint_model(run, config)(x.unsqueeze(1).float() / 255).softmax(1)
    assert len(rows) == len(x)
    for i, probs in enumerate(expected):
        row = rows[f"t10k-images-idx3-ubyte.gz#{i}"]
        assert row["class"] == str(int(probs.argmax())) and row["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert len(row["top5"]) == 5 and row["top5"][0]["class"] == row["class"]


def test_evaluate_scores_labelled_data_as_the_training_run_does(digits_run, tmp_path):
    root, run, _ = digits_run
    result = command("evaluate", str(run / "model"), str(root / "digits"), "--output", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stdout
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    config = json.loads((run / "model" / "config.json").read_text())
    x = torch.from_numpy(read_idx(str(root / "digits" / "t10k-images-idx3-ubyte.gz"), 3, 1 << 30).copy())
    y = torch.from_numpy(read_idx(str(root / "digits" / "t10k-labels-idx1-ubyte.gz"), 1, 1 << 30).astype(np.int64))
    with torch.no_grad():
        accuracy = (checkpoint_model(run, config)(x.unsqueeze(1).float() / 255).argmax(1) == y).float().mean().item()
    assert evaluation["accuracy"] == pytest.approx(accuracy) and evaluation["samples"] == len(y)
    assert sum(map(sum, evaluation["confusion_matrix"])) == len(y)
    assert set(evaluation["per_class_accuracy"]) == {str(i) for i in range(10)}
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_export_from_any_checkpoint_old_ones_too(digits_run, tmp_path):
    _, run, _ = digits_run
    step = sorted((run / "checkpoints").glob("step-*.pt"))[0]
    result = command("export", str(step), "--output", str(tmp_path / "model"), export="onnx")
    assert result.returncode == 0, result.stdout
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    saved = torch.load(step, map_location="cpu", weights_only=True)
    assert config["source"]["epoch"] == saved["progress"]["epoch"] and config["onnx"] == "model.onnx"
    # a checkpoint written by trainjob 0.1 records no input shape: it is read off the first layer
    del saved["input_shape"], saved["input_kind"]
    torch.save(saved, tmp_path / "old.pt")
    old = command("export", str(tmp_path / "old.pt"), "--output", str(tmp_path / "old-model"), export="onnx")
    assert old.returncode == 0, old.stdout
    assert json.loads((tmp_path / "old-model" / "config.json").read_text())["input_shape"] == [1, 28, 28]
    missing = command("export", str(tmp_path / "nope.pt"))
    assert missing.returncode == 3 and "nope.pt" in missing.stdout


def test_predict_and_evaluate_images_with_the_evaluation_preprocessing(tmp_path):
    make_tree(str(tmp_path / "data"), per_class=12, bad=False)
    result = run_job(data_uri=str(tmp_path / "data"), output_uri=str(tmp_path / "runs"), run_name="r", export="onnx",
                     pretrained=weights_file(str(tmp_path / "w.pt")), **{**RECIPE, "max_bad_fraction": 0.0})
    assert result.returncode == 0, result.stdout
    run = tmp_path / "runs" / "r"
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["class_names"] == list(CLASSES) and config["preprocessing"]["center_crop"] == 32
    # held-out photos, in subfolders, with one that is not an image
    inputs = tmp_path / "new"
    make_tree(str(tmp_path / "held-out"), per_class=4, val=False, bad=False)
    for c in CLASSES:
        os.makedirs(inputs / "batch1" / c)
        for f in (tmp_path / "held-out" / "train" / c).iterdir():
            f.rename(inputs / "batch1" / c / f.name)
    (inputs / "batch1" / "notes.jpg").write_text("not an image")
    result = command("predict", str(run), str(inputs), "--output", str(tmp_path / "p.jsonl"))
    assert result.returncode == 0, result.stdout
    assert f"skipping {inputs}/batch1/notes.jpg: not an image" in result.stdout  # named as the user gave it
    rows = predictions(tmp_path / "p.jsonl")
    assert len(rows) == 12
    evaluation = images.ImageTransform(32, augment=False, normalize=True)
    model = checkpoint_model(run, config)
    with torch.no_grad():
        for name, row in rows.items():
            x = evaluation(Image.open(inputs / name).convert("RGB"), False, None).unsqueeze(0)
            assert row["class"] == CLASSES[int(model(x).argmax())], name
    # evaluate on the dataset's own validation split: the run's final val accuracy, if best is final
    evaluation = command("evaluate", str(run), str(tmp_path / "data"), "--output", str(tmp_path / "eval"))
    assert evaluation.returncode == 0, evaluation.stdout
    scored = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert scored["samples"] == 18 and set(scored["per_class_accuracy"]) == set(CLASSES)
    (tmp_path / "odd" / "lily").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "odd" / "lily" / "a.png")
    unknown = command("evaluate", str(run), str(tmp_path / "odd"))
    assert unknown.returncode == 3 and "'lily'" in unknown.stdout


def mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id]) if found else []


def test_mlflow_sees_the_run_its_metrics_params_and_artifacts_and_a_resume_continues_it(tmp_path, digits_dir, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "digits")
    from mlflow.tracking import MlflowClient

    # the experiment made first, with its artifacts under tmp_path (a SQLite store's default,
    # ./mlruns, would land in the checkout: the job runs from the repository root)
    MlflowClient(tracking_uri=uri).create_experiment("digits", artifact_location=(tmp_path / "artifacts").as_uri())
    common = dict(data_uri=str(digits_dir), output_uri=str(tmp_path / "runs"), run_name="r", **DIGITS)
    assert run_job(epochs=2, **common).returncode == 0
    again = run_job(epochs=4, **common)  # a later pod continues the run: the same MLflow run
    assert again.returncode == 0, again.stdout
    client, runs = mlflow_runs(uri, "digits")
    assert len(runs) == 1 and runs[0].info.run_name == "r" and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    history = read_history(tmp_path / "runs" / "r")
    logged = client.get_metric_history(run_id, "val_accuracy")
    assert [m.step for m in logged] == [1, 2, 3, 4]  # each epoch once, across the two processes
    assert [m.value for m in logged] == pytest.approx([row["val_accuracy"] for row in history])
    assert runs[0].data.params["model"] == "mlp" and runs[0].data.params["lr"] == "0.01"
    assert not any("SECRET" in k.upper() for k in runs[0].data.params)
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"summary.json", "model/config.json", "model/model.safetensors"} <= artifacts


@pytest.mark.parametrize("tracker", ["refuses connections", "never answers"])
def test_a_tracker_that_is_down_changes_nothing(tmp_path, digits_dir, monkeypatch, tracker):
    proxy = None
    if tracker == "refuses connections":
        uri = f"http://127.0.0.1:{_free_port()}"
    else:
        proxy = FaultProxy("http://127.0.0.1:9", 0.0)
        proxy.freeze()
        uri = proxy.url
    try:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        common = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), epochs=3, **DIGITS)
        plain = run_job(run_name="plain", **common)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        tracked = run_job(run_name="tracked", **common)
    finally:
        if proxy:
            proxy.close()
    assert plain.returncode == 0 and tracked.returncode == 0, tracked.stdout
    assert "experiment tracking failed" in tracked.stdout and "training goes on" in tracked.stdout
    from conftest import assert_same_history

    assert_same_history(read_history(tmp_path / "tracked"), read_history(tmp_path / "plain"))


def tensorboard_scalars(folder) -> dict:
    """{tag: [(step, value)]} from TensorBoard event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_event_files_hold_every_epoch(tmp_path, digits_dir):
    result = run_job(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", epochs=3, tensorboard="true",
                     **DIGITS)
    assert result.returncode == 0, result.stdout
    scalars = tensorboard_scalars(tmp_path / "r" / "tensorboard")
    history = read_history(tmp_path / "r")
    assert [s for s, _ in scalars["val_accuracy"]] == [1, 2, 3]
    assert [v for _, v in scalars["val_accuracy"]] == pytest.approx([row["val_accuracy"] for row in history])


def test_an_idx_trained_model_classifies_a_folder_of_images(digits_run, digits_arrays, tmp_path):
    """The quickstart's last step: PNG files of digits through the model trained on IDX files."""
    _, run, _ = digits_run
    stage_dataset.png_folder(digits_arrays["test_images"], digits_arrays["test_labels"], str(tmp_path / "pngs"))
    result = command("predict", str(run), str(tmp_path / "pngs"), "--output", str(tmp_path / "p.jsonl"))
    assert result.returncode == 0, result.stdout
    rows = predictions(tmp_path / "p.jsonl")
    config = json.loads((run / "model" / "config.json").read_text())
    x = torch.from_numpy(digits_arrays["test_images"].copy()).unsqueeze(1).float() / 255
    with torch.no_grad():
        expected = checkpoint_model(run, config)(x).argmax(1).tolist()
    for i, (label, cls) in enumerate(zip(digits_arrays["test_labels"], expected, strict=True)):
        assert rows[f"{label}/{i:04d}.png"]["class"] == str(cls)


CONFIG_ATTACKS = {  # a model folder from someone else: config.json -> what the one-line error says
    "weights outside the folder": (lambda c: c.update(weights="../../../../etc/passwd"), "weights must name a file"),
    "a billion classes": (lambda c: c.update(num_classes=10**9), "num_classes must be 2 to"),
    "class names that do not match": (lambda c: c.update(class_names=["a"] * 3), "class_names must be num_classes"),
    "a huge input": (lambda c: c.update(input_shape=[1, 10**6, 10**6]), "input_shape must be"),
    "a huge mlp": (lambda c: c.update(hidden_sizes=[65536] * 40), "an mlp of over"),
    "no preprocessing": (lambda c: c.pop("preprocessing"), "preprocessing is missing"),
    "preprocessing for another input": (lambda c: c["preprocessing"].update(height=20), "must match input_shape"),
    "a list, not an object": (lambda c: c.clear(), "not a trainjob model config"),
}


@pytest.mark.parametrize("attack", CONFIG_ATTACKS)
def test_predict_refuses_a_hostile_model_config_in_one_line(digits_run, tmp_path, attack):
    import shutil

    root, run, _ = digits_run
    shutil.copytree(run / "model", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    mutate, expected = CONFIG_ATTACKS[attack]
    mutate(config)
    (tmp_path / "model" / "config.json").write_text(json.dumps(config if config else []))
    if attack != "weights outside the folder":  # the rest in process: export.load is what predict reads it with
        with pytest.raises(DataError) as refused:
            export.load(str(tmp_path / "model"))
        assert expected in str(refused.value) and refused.value.exit_code == 3
        return
    result = command("predict", str(tmp_path / "model"), str(root / "digits"), timeout=300)
    assert result.returncode == 3, result.stdout
    assert expected in result.stdout.strip().splitlines()[-1] and "Traceback" not in result.stdout, result.stdout


def test_predict_on_a_fifo_named_like_idx_images_or_a_fifo_config_does_not_hang(digits_run, tmp_path):
    root, run, _ = digits_run
    (tmp_path / "inputs").mkdir()
    os.mkfifo(tmp_path / "inputs" / "t10k-images-idx3-ubyte")  # opened plainly, a read would wait forever
    result = command("predict", str(run), str(tmp_path / "inputs"), timeout=300)
    assert result.returncode == 3 and "not a regular file" in result.stdout, result.stdout
    (tmp_path / "model").mkdir()
    os.mkfifo(tmp_path / "model" / "config.json")
    result = command("predict", str(tmp_path / "model"), str(root / "digits"), timeout=300)
    assert result.returncode == 3 and "config.json is not a regular file" in result.stdout, result.stdout


def test_predict_refuses_idx_images_of_another_size(digits_run, tmp_path):
    root, run, _ = digits_run
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((4, 20, 20), dtype=np.uint8)))
    result = command("predict", str(run), str(tmp_path / "inputs"), timeout=300)
    assert result.returncode == 3 and "holds 20x20 images; this model takes 28x28" in result.stdout, result.stdout

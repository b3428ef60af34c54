"""Using an exported model: `python -m job predict` and `python -m job evaluate`.

predict   MODEL INPUTS [--output URI]: every image under INPUTS (any fsspec URI, subfolders
          included), or the images of IDX files there, through the model in batches on the
          device, with the evaluation preprocessing the model's config.json records ->
          predictions.jsonl: input name, top class, its probability, the top 5.
evaluate  MODEL DATA [--output URI]: a labelled set (class folders, an image-folder dataset's
          test/ or valid/ split, or MNIST-format IDX files) through the training run's own
          evaluate() -> evaluation.json (accuracy, loss, per-class accuracy, the confusion
          matrix) and confusion.png.
Bad images are skipped and named; errors are one line with the usual exit codes.
"""

import io
import json
import logging
import os
import time

import numpy as np
import torch

from job import datasets, export, images, loop, report, shards, storage
from job.data import FileSource, Source, TensorSource
from job.errors import DataError, OutputError
from job.settings import dataset_name

log = logging.getLogger("job")


def run_dir(model_uri: str) -> str:
    """The run a model belongs to: <run>/model -> <run>."""
    return model_uri.rstrip("/")[:-len("/model")] if model_uri.rstrip("/").endswith("/model") else model_uri.rstrip("/")


def _source(settings, runtime, root: str, config: dict) -> tuple[Source, list[str], list[tuple[str, str]]]:
    """(source, input names, bad files) for the unlabelled inputs under a local root."""
    found = [n for n in sorted(os.listdir(root)) if not n.startswith(".")]
    idx = [n for n in found if "-images-idx3-ubyte" in n]
    if idx:
        if config["preprocessing"]["kind"] != "idx":
            raise DataError(f"this model takes image files, not IDX images ({idx[0]})")
        array = datasets.read_idx(os.path.join(root, idx[0]), 3, settings.max_file_bytes)
        if list(array.shape[1:]) != config["input_shape"][1:]:
            raise DataError(f"{idx[0]} holds {array.shape[1]}x{array.shape[2]} images; this model takes "
                            f"{config['input_shape'][1]}x{config['input_shape'][2]}")
        return TensorSource(_idx_tensor(array, runtime.device), torch.zeros(len(array), dtype=torch.int64)), \
            [f"{idx[0]}#{i}" for i in range(len(array))], []
    paths = []
    for here, dirs, files in os.walk(root):  # every file, subfolders included; hidden ones skipped
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(here, n) for n in sorted(files) if not n.startswith(".")]
    good, bad = _checked(settings, root, paths)
    return (
        _image_source(settings, runtime, [(p, 0) for p in good], config),
        [os.path.relpath(p, root) for p in good],
        bad,
    )


def _checked(settings, root: str, paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Decode-check every file as training does (regular files, size and pixel limits)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    good, bad = [], []
    for path in paths:
        reason, _ = images._check(path, settings.max_file_bytes, settings.max_image_pixels)
        if reason:
            bad.append((os.path.relpath(path, root), reason))
            log.warning(f"skipping {os.path.relpath(path, root)}: {reason}")
        else:
            good.append(path)
    return good, bad


def _idx_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array.copy()).to(device).unsqueeze(1).float().div_(255)


def _image_source(settings, runtime, items: list[tuple[str, int]], config: dict) -> FileSource:
    """Files read with the model's evaluation preprocessing (config.json), by DataLoader workers."""
    prep = config["preprocessing"]
    transform: images.ImageTransform | GrayTransform
    if prep["kind"] == "image":  # what training's evaluation does (job.augment)
        transform = images.ImageTransform(prep["center_crop"], augment=False, normalize=prep["mean"] is not None)
        size = prep["center_crop"]
    else:  # a model trained on IDX images, given image files: grayscale at the IDX size, in [0, 1]
        transform = GrayTransform(prep["channels"], prep["height"], prep["width"])
        size = prep["height"]
    source = images.ImageItems(items, transform, max_pixels=settings.max_image_pixels)
    return FileSource(source, size, runtime.workers, runtime.device)


class GrayTransform:
    """PIL image -> grayscale (channels) at an IDX model's height and width, in [0, 1]. Picklable,
    for DataLoader workers."""

    def __init__(self, channels: int, height: int, width: int):
        self.channels, self.height, self.width = channels, height, width

    def __call__(self, img, train: bool, rng) -> torch.Tensor:
        from torchvision import transforms as T

        return T.Compose([T.Grayscale(self.channels), T.Resize((self.height, self.width)), T.ToTensor()])(img)


def _pull(settings, uri: str, what: str) -> str:
    with storage.errors(uri, DataError, f"read {what}"):
        return storage.pull(uri, settings.cache_dir)


@torch.no_grad()
def predict(settings, runtime, model_uri: str, inputs_uri: str, output_uri: str | None) -> dict:
    model, config = export.load(model_uri)
    model.to(runtime.device)
    names_of = config["class_names"]
    root = _pull(settings, inputs_uri, "inputs")
    source, names, bad = _source(settings, runtime, root, config)
    if not names:
        raise DataError(
            f"no readable input under {storage.redact_uri(inputs_uri)}{f' ({len(bad)} bad files)' if bad else ''}"
        )
    output_uri = output_uri or storage.join(run_dir(model_uri), "predictions", f"{dataset_name(inputs_uri)}.jsonl")
    log.info(
        f"predicting {len(names)} inputs from {storage.redact_uri(inputs_uri)} with {config['architecture']} "
        f"({len(names_of)} classes) on {runtime.device}; {len(bad)} bad files skipped"
    )
    rows: list[dict] = []
    start = last = time.monotonic()
    k = min(5, len(names_of))
    for x, _ in source.batches(torch.arange(len(names)), settings.batch_size, train=False):
        with runtime.autocast():
            probs = torch.softmax(model(x).float(), 1)
        top_p, top_i = probs.topk(k, 1)
        for p_row, i_row in zip(top_p.tolist(), top_i.tolist(), strict=True):
            rows.append(
                {
                    "input": names[len(rows)],
                    "class": names_of[i_row[0]],
                    "probability": p_row[0],
                    "top5": [{"class": names_of[i], "probability": p} for p, i in zip(p_row, i_row, strict=True)],
                }
            )
        if time.monotonic() - last >= settings.log_every_seconds:
            last = time.monotonic()
            rate = len(rows) / (last - start)
            log.info(
                f"predict: {len(rows)}/{len(names)} inputs ({100 * len(rows) / len(names):.0f}%), {rate:,.1f} "
                "inputs/s, "
                f"ETA {report.duration((len(names) - len(rows)) / rate)}"
            )
    with storage.errors(output_uri, OutputError, "write predictions to"):
        storage.write_bytes(output_uri, "".join(json.dumps(r) + "\n" for r in rows).encode())
    log.info(f"predictions for {len(rows)} inputs written to {storage.redact_uri(output_uri)}")
    return {"predictions": len(rows), "bad_files": bad, "output": output_uri}


def _labelled(settings, runtime, root: str, uri: str, config: dict):
    """(source, class names of the data, bad files) for a labelled set under a local root."""
    names = [n for n in sorted(os.listdir(root)) if not n.startswith(".")]
    if any(
        n.startswith(datasets.MNIST_FILES["train_images"]) or n.startswith(datasets.MNIST_FILES["test_images"])
        for n in names
    ):
        role = "test" if any(n.startswith(datasets.MNIST_FILES["test_images"]) for n in names) else "train"
        pair = datasets._read_pair(
            root,
            datasets.MNIST_FILES[f"{role}_images"],
            datasets.MNIST_FILES[f"{role}_labels"],
            True,
            settings.max_file_bytes,
        )
        labels = torch.from_numpy(pair[1].astype(np.int64)).to(runtime.device)
        return (
            TensorSource(_idx_tensor(pair[0], runtime.device), labels),
            [str(i) for i in range(int(pair[1].max()) + 1)],
            [],
        )
    split = next((d for d in ("test", *images.VAL_DIRS) if d in names), None) if "train" in names else None
    folder = os.path.join(root, split) if split else root
    classes = images._class_dirs(os.path.dirname(folder), os.path.basename(folder))
    if not classes:
        raise DataError(
            f"{storage.redact_uri(uri)} holds no class folders to evaluate on (expected <class>/<image> "
            "folders, an image-folder dataset with test/ or valid/, or MNIST-format IDX files)"
        )
    unknown = sorted(set(classes) - set(config["class_names"]))
    if unknown:
        raise DataError(
            f"{storage.redact_uri(uri)} has classes the model does not know: {', '.join(map(repr, unknown[:10]))}"
        )
    paths = [p for files in classes.values() for p in files]
    good, bad = _checked(settings, folder, paths)
    good_set = set(good)
    items = [(p, config["class_names"].index(c)) for c, files in classes.items() for p in files if p in good_set]
    return _image_source(settings, runtime, items, config), list(classes), bad


def _sharded(settings, runtime, uri: str, index: dict, config: dict):
    """(source, its sample indices, class names, bad files, split) of a sharded dataset's test
    split, or its validation split when it has none, read with the model's preprocessing."""
    if index["class_names"] != config["class_names"]:
        raise DataError(f"{storage.redact_uri(uri)} has the classes {index['class_names'][:10]}; the model was "
                        f"trained on {config['class_names'][:10]}, in that order")
    prep = config["preprocessing"]
    size = prep["center_crop"] if prep["kind"] == "image" else settings.image_size
    sharded = datasets.load_shards(settings.model_copy(update={"data_uri": uri, "image_size": size, "augment": False}),
                                   runtime, index, normalize=prep.get("mean") is not None)
    bad = [tuple(b) for b in index["bad_files"]]
    if sharded.test is not None:
        return sharded.test, torch.arange(len(sharded.test)), index["class_names"], bad, "test"
    assert sharded.split is not None  # a sharded dataset always has its train and val shards
    return sharded.samples, sharded.split[1], index["class_names"], bad, "val"


def evaluate(settings, runtime, model_uri: str, data_uri: str, output_uri: str | None) -> dict:
    module, config = export.load(model_uri)
    module.to(runtime.device)
    with storage.errors(data_uri, DataError, "read the labelled data"):
        index = shards.find_index(data_uri)
    if index is not None:  # streamed, as training streams it: the test split, else the validation split
        source, indices, data_classes, bad, split = _sharded(settings, runtime, data_uri, index, config)
    else:
        root = _pull(settings, data_uri, "the labelled data")
        source, data_classes, bad = _labelled(settings, runtime, root, data_uri, config)
        indices, split = torch.arange(len(source)), "all"
    if list(source.sample_shape) != config["input_shape"]:
        raise DataError(
            f"{storage.redact_uri(data_uri)} holds samples of shape {list(source.sample_shape)}; this model "
            f"takes {config['input_shape']}"
        )
    if config["preprocessing"]["kind"] == "idx" and len(data_classes) > config["num_classes"]:
        raise DataError(
            f"{storage.redact_uri(data_uri)} has labels up to {len(data_classes) - 1}; the model knows "
            f"{config['num_classes']} classes"
        )
    if not len(indices):
        raise DataError(f"no readable sample in {storage.redact_uri(data_uri)}")
    output_uri = output_uri or storage.join(run_dir(model_uri), "evaluations", dataset_name(data_uri))
    log.info(
        f"evaluating {config['architecture']} on {len(indices)} samples of {storage.redact_uri(data_uri)} "
        f"({split}); {len(bad)} bad files skipped"
    )
    model = loop.Model(module, module, head="")
    loss, accuracy, confusion = loop.evaluate(
        settings, runtime, model, source, indices, config["num_classes"], what=dataset_name(data_uri)
    )
    names = config["class_names"]
    result = {
        "model": storage.redact_uri(model_uri),
        "data": storage.redact_uri(data_uri),
        "split": split,
        "samples": len(indices),
        "accuracy": accuracy,
        "loss": loss,
        "class_names": names,
        "per_class_accuracy": {n: a for n, a in report.per_class(confusion, names).items() if n in data_classes},
        "confusion_matrix": confusion.tolist(),
        "confusion_matrix_rows": "true class",
        "bad_files": bad,
    }
    with storage.errors(output_uri, OutputError, "write the evaluation to"):
        storage.write_json(storage.join(output_uri, "evaluation.json"), result)
        storage.write_bytes(
            storage.join(output_uri, "confusion.png"),
            report.confusion_png(confusion, names, f"{dataset_name(data_uri)}: confusion matrix"),
        )
    log.info(
        f"accuracy={accuracy:.4f} loss={loss:.4f} on {len(indices)} samples; evaluation.json and confusion.png in "
        f"{storage.redact_uri(output_uri)}"
    )
    return result


def export_checkpoint(settings, checkpoint_uri: str, output_uri: str | None) -> dict:
    """`python -m job export`: model/ from any checkpoint (checked against its manifest when it
    has one). With no dataset at hand, the ONNX form is verified on random inputs."""
    from job import checkpoint

    folder, _, file = checkpoint_uri.rstrip("/").rpartition("/")
    run, name = folder.removesuffix("/checkpoints"), file.removesuffix(".pt")
    with storage.errors(checkpoint_uri, DataError, "read the checkpoint"):
        if folder.endswith("/checkpoints") and storage.exists(storage.join(folder, f"{name}.json")):
            state = checkpoint.read(run, name)  # checked against its manifest
        else:
            state = torch.load(io.BytesIO(storage.read_bytes(checkpoint_uri)), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "settings" not in state:
        raise DataError(f"{storage.redact_uri(checkpoint_uri)} is not a trainjob checkpoint")
    saved = state["settings"]
    trained = type(
        "Settings",
        (),
        {
            "model": saved["model"],
            "hidden_sizes": saved.get("hidden_sizes") or [],
            "image_size": saved.get("image_size", 224),
        },
    )
    shape, kind = input_of(state)
    source = {
        "checkpoint": storage.redact_uri(checkpoint_uri),
        "epoch": state["progress"]["epoch"],
        "best_val_accuracy": state.get("best_val_accuracy"),
        "dataset_fingerprint": state.get("dataset_fingerprint"),
    }
    config = export.config_for(trained, state["class_names"], shape, from_images=kind == "image", source=source)
    module = export.build(config)
    module.load_state_dict(state["model"])
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, *shape, generator=generator)]
    output_uri = output_uri or storage.join(run, "model")
    config = export.write(output_uri, module, config, batches, onnx=settings.export != "safetensors")
    if config.get("verification"):
        config["verification"]["inputs"] = "random"
    return config


def input_of(state: dict) -> tuple[tuple[int, ...], str]:
    """(input shape, "image" or "idx") a checkpoint's model takes: recorded by trainjob >= 0.2,
    inferred from the first layer for older checkpoints."""
    if "input_shape" in state:
        return tuple(state["input_shape"]), state["input_kind"]
    saved, weights = state["settings"], state["model"]
    size = saved.get("image_size", 224)
    first = next(v for k, v in weights.items() if k.endswith("weight"))
    if saved["model"] == "mlp" and first.shape[1] == 784:
        return (1, 28, 28), "idx"
    if saved["model"] == "cnn" and first.shape[1] == 1:
        return (1, 28, 28), "idx"
    return (3, size, size), "image"

"""Using an exported model: `python -m job predict` and `python -m job evaluate`.

predict   MODEL INPUTS [--output URI]: every image under INPUTS (any fsspec URI, subfolders
          included), the images of IDX files there, or every sample of a sharded dataset,
          through the model in batches on the
          device, with the evaluation preprocessing the model's config.json records ->
          predictions.jsonl: input name, top class, its probability, the top 5.
evaluate  MODEL DATA [--output URI]: a labelled set (class folders, an image-folder dataset's
          test/ or valid/ split, a sharded dataset's test or val split, or MNIST-format IDX
          files; job.data.inference) through the training run's own
          evaluate() -> evaluation.json (accuracy, loss, per-class accuracy, the confusion
          matrix) and confusion.png.
Bad images are skipped and named; errors are one line with the usual exit codes.
"""

import hashlib
import io
import json
import logging
import os
import time

import torch

from job import data, export, loop, report, storage
from job.errors import MALFORMED, DataError, OutputError, SettingsError
from job.settings import dataset_name

log = logging.getLogger("job")


def run_dir(model_uri: str) -> str:
    """The run a model belongs to: <run>/model -> <run>."""
    return model_uri.rstrip("/")[:-len("/model")] if model_uri.rstrip("/").endswith("/model") else model_uri.rstrip("/")


def _refuse_output_in_model(model_uri: str, output_uri: str | None) -> None:
    """An --output inside the model's folder (the one holding its config.json, as export.load looks
    for it) is refused, and inside the run it belongs to except its predictions/ and evaluations/:
    predictions or an evaluation must never overwrite the model's files or the run's checkpoints."""
    if output_uri is None:
        return
    with storage.errors(model_uri, DataError, "read the model from"):
        has_config = storage.exists(storage.join(model_uri, "config.json"))
    folder = model_uri if has_config else storage.join(model_uri, "model")
    run = run_dir(folder) if folder.rstrip("/").endswith("/model") else None
    outputs = [storage.join(run, d) for d in ("predictions", "evaluations")] if run else []
    inside = folder if storage.within(output_uri, folder) else (
        run if run and storage.within(output_uri, run) and not any(storage.within(output_uri, o) for o in outputs)
        else None)
    if inside:
        raise SettingsError(
            f"--output {storage.redact_uri(output_uri)} is inside {storage.redact_uri(inside)}, where it could "
            "overwrite the model's or the run's files; choose an --output outside it (or under the run's "
            "predictions/ or evaluations/)"
        )


def output_name(uri: str) -> str:
    """What predict and evaluate name their default output after (<run>/predictions/<name>.jsonl,
    <run>/evaluations/<name>-<split>/): the data's last segment and a hash of its whole URI
    (redacted; a local path made absolute), so s3://a/photos and s3://b/photos never share one:
    s3://b/photos -> photos-1c2d3e4f."""
    where = storage.redact_uri(uri).rstrip("/").removeprefix("file://")
    if "://" not in where:  # ./photos, /work/photos and file:///work/photos are the same data
        where = os.path.abspath(where)
    return f"{dataset_name(uri)}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


@torch.no_grad()
def predict(settings, runtime, model_uri: str, inputs_uri: str, output_uri: str | None) -> dict:
    _refuse_output_in_model(model_uri, output_uri)
    model, config = export.load(model_uri)
    model.to(runtime.device)
    names_of = config["class_names"]
    runtime.stop.check("while loading the model: no predictions written")
    found = data.inputs(settings, runtime, inputs_uri, config)
    source, names, bad = found.source, found.names, found.bad_files
    runtime.stop.check("while reading the inputs: no predictions written")
    if not names:
        raise DataError(
            f"no readable input under {storage.redact_uri(inputs_uri)}{f' ({len(bad)} bad files)' if bad else ''}"
        )
    output_uri = output_uri or storage.join(run_dir(model_uri), "predictions", f"{output_name(inputs_uri)}.jsonl")
    log.info(
        f"predicting {len(names)} inputs from {storage.redact_uri(inputs_uri)} with {config['architecture']} "
        f"({len(names_of)} classes) on {runtime.device}; {len(bad)} bad files skipped"
    )
    rows: list[dict] = []
    start = last = time.monotonic()
    k = min(5, len(names_of))
    for x, _ in source.batches(torch.arange(len(names)), settings.batch_size, train=False):
        runtime.stop.check("while predicting: no predictions written")
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


def evaluate(settings, runtime, model_uri: str, data_uri: str, output_uri: str | None) -> dict:
    _refuse_output_in_model(model_uri, output_uri)
    module, config = export.load(model_uri)
    module.to(runtime.device)
    runtime.stop.check("while loading the model: nothing written")
    found = data.labelled(settings, runtime, data_uri, config)
    runtime.stop.check("while reading the labelled data: nothing written")
    source, indices, data_classes, bad, split = found.source, found.indices, found.class_names, found.bad_files, \
        found.split
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
    output_uri = output_uri or storage.join(run_dir(model_uri), "evaluations", f"{output_name(data_uri)}-{split}")
    log.info(
        f"evaluating {config['architecture']} on {len(indices)} samples of {storage.redact_uri(data_uri)} "
        f"({split} split); {len(bad)} bad files skipped"
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
            report.confusion_png(confusion, names, f"{dataset_name(data_uri)} ({split}): confusion matrix"),
        )
    log.info(
        f"accuracy={accuracy:.4f} loss={loss:.4f} on {len(indices)} samples ({split} split of "
        f"{storage.redact_uri(data_uri)}); evaluation.json and confusion.png in "
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
            try:
                state = checkpoint.read(run, name)  # checked against its manifest
            except checkpoint.Corrupt as exc:  # truncated by a crash, or edited: the run's other checkpoints may serve
                raise DataError(f"{storage.redact_uri(checkpoint_uri)} fails verification: {exc}; export another "
                                "checkpoint of the run (best.pt, last.pt or a step-*.pt)") from None
        else:  # a checkpoint file on its own: bounded, as an exported model's weights are
            blob = storage.read_bytes(checkpoint_uri, max_bytes=export.MAX_WEIGHT_BYTES)
            if len(blob) > export.MAX_WEIGHT_BYTES:
                raise DataError(f"{storage.redact_uri(checkpoint_uri)} is over {export.MAX_WEIGHT_BYTES} bytes")
            try:
                state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as exc:  # not a checkpoint at all (or one from a format this version cannot read)
                raise DataError(f"{storage.redact_uri(checkpoint_uri)} is not a trainjob checkpoint "
                                f"({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "settings" not in state:
        raise DataError(f"{storage.redact_uri(checkpoint_uri)} is not a trainjob checkpoint")
    try:
        module, config = _from_checkpoint(state, checkpoint_uri)
    except MALFORMED as exc:
        # it verified against its manifest (or has none): written so, or edited by hand
        raise DataError(f"{storage.redact_uri(checkpoint_uri)} is not a usable trainjob checkpoint: "
                        f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:200]}") from None
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, *config["input_shape"], generator=generator)]
    output_uri = output_uri or storage.join(run, "model")
    config = export.write(output_uri, module, config, batches, onnx=settings.export != "safetensors")
    if config.get("verification"):
        config["verification"]["inputs"] = "random"
    return config


def _from_checkpoint(state: dict, checkpoint_uri: str) -> tuple[torch.nn.Module, dict]:
    """(the model with the checkpoint's weights, its export config), the weights' shapes checked
    against the architecture before it is built."""
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
    problem = export.config_problem({**config, "format": "trainjob-model", "format_version": export.FORMAT_VERSION,
                                     "weights": "model.safetensors"})  # the bounds an exported config gets
    if problem:
        raise ValueError(problem)
    return export.fitted(config, state["model"]), config


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

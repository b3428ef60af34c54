"""The model people use once training ends: `<run>/model/`, written at the end of every completed
run (and by `python -m job export` from any checkpoint).

  model.safetensors  the weights (safetensors: no pickle, loads without running code)
  config.json        architecture, classes in index order, input shape, the evaluation
                     preprocessing, where the weights came from and how well they did
  model.onnx         the whole model as ONNX (opset 18, dynamic batch): onnxruntime and Triton
                     load it with no Python or PyTorch on the serving side

The ONNX file is verified when written: on validation samples it must give the checkpoint's own
top-1 class and probabilities within PROB_TOLERANCE, or it is not written (and config.json says
why). load() rebuilds a PyTorch model from model.safetensors + config.json for predict/evaluate.
"""

import io
import itertools
import json
import logging
import math
import os
import re
import time
import warnings

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from job import __version__, images, models, storage
from job.errors import DataError, OutputError
from job.settings import MAX_IMAGE_SIDE

log = logging.getLogger("job")
FORMAT_VERSION = 1
OPSET = 18
PROB_TOLERANCE = 1e-4  # softmax probabilities: ONNX Runtime against PyTorch on the same inputs
VERIFY_SAMPLES = 1000  # validation samples compared at export (all of them when fewer)


def preprocessing(model_name: str, sample_shape: tuple[int, ...], image_size: int, from_images: bool) -> dict:
    """How an input becomes a model input, as evaluation does it: for photos, resize the shorter
    side, centre crop, scale to [0, 1], normalise with ImageNet's statistics for torchvision
    models; for IDX images, scale to [0, 1]."""
    normalize = model_name not in ("mlp", "cnn")
    if from_images:
        return {"kind": "image", "convert": "RGB", "resize_shorter_side": round(image_size * 256 / 224),
                "center_crop": image_size, "scale": 1 / 255,
                "mean": list(images.IMAGENET_MEAN) if normalize else None,
                "std": list(images.IMAGENET_STD) if normalize else None}
    return {"kind": "idx", "channels": sample_shape[0], "height": sample_shape[1], "width": sample_shape[2],
            "scale": 1 / 255, "mean": None, "std": None}


MAX_CLASSES = 100_000
MAX_PARAMETERS = 2_000_000_000  # an mlp's, from its config, before it is built
MAX_CONFIG_BYTES = 16 << 20
MAX_WEIGHT_BYTES = 16 << 30


def _ints(values, low, high, count=None) -> bool:
    return (isinstance(values, list) and (count is None or len(values) == count) and
            all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values))


def config_problem(config) -> str | None:
    """What makes a config.json unusable (None: nothing). A model folder may come from anyone:
    sizes are bounded before anything is allocated, and the weights must be a file beside it."""
    if not isinstance(config, dict) or config.get("format") != "trainjob-model":
        return "not a trainjob model config"
    if config.get("format_version") != FORMAT_VERSION:
        return f"format_version {config.get('format_version')!r}, this job reads {FORMAT_VERSION}"
    if not isinstance(config.get("weights"), str) or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*",
                                                                      config["weights"]):
        return "weights must name a file beside config.json"
    return _model_problem(config) or _preprocessing_problem(config)


def _model_problem(config: dict) -> str | None:
    """Architecture, classes and sizes, each bounded before the model is built."""
    if not isinstance(config.get("architecture"), str):
        return "architecture is missing"
    if not _ints([config.get("num_classes")], 2, MAX_CLASSES):
        return f"num_classes must be 2 to {MAX_CLASSES}"
    names = config.get("class_names")
    if not isinstance(names, list) or len(names) != config["num_classes"] or not all(isinstance(n, str) for n in names):
        return "class_names must be num_classes names"
    if not _ints(config.get("input_shape"), 1, MAX_IMAGE_SIDE, 3):
        return f"input_shape must be [channels, height, width], each 1 to {MAX_IMAGE_SIDE}"
    hidden = config.get("hidden_sizes")
    if hidden is not None and not (_ints(hidden, 1, 65536) and len(hidden) <= 64):
        return "hidden_sizes must be up to 64 widths of 1 to 65536"
    widths = [math.prod(config["input_shape"]), *(hidden or []), config["num_classes"]]
    if config["architecture"] == "mlp" and sum(a * b for a, b in itertools.pairwise(widths)) > MAX_PARAMETERS:
        return f"an mlp of over {MAX_PARAMETERS} parameters"
    return None


def _preprocessing_problem(config: dict) -> str | None:
    """What predict's transforms use must be what the model takes."""
    prep = config.get("preprocessing")
    if not isinstance(prep, dict) or prep.get("kind") not in ("image", "idx"):
        return "preprocessing is missing"
    if prep["kind"] == "image":
        crop = prep.get("center_crop")
        if not _ints([crop], 1, MAX_IMAGE_SIDE) or config["input_shape"] != [3, crop, crop]:
            return "preprocessing center_crop must match input_shape [3, crop, crop]"
        if "mean" not in prep or "std" not in prep:
            return "preprocessing mean and std are missing (null: not normalised)"
        return None
    channels = prep.get("channels")
    if not _ints([channels], 1, 3) or channels == 2 or config["input_shape"] != [channels, prep.get("height"),
                                                                                  prep.get("width")]:
        return "preprocessing channels (1 or 3), height and width must match input_shape"
    return None


def build(config: dict) -> torch.nn.Module:
    """The PyTorch model a config describes, with a freshly initialised body (load the weights)."""
    fake = type(
        "Settings",
        (),
        {"model": config["architecture"], "hidden_sizes": config.get("hidden_sizes") or [], "pretrained": "none"},
    )
    model, _ = models.build_model(fake, tuple(config["input_shape"]), config["num_classes"])
    return model


@torch.no_grad()
def _onnx_bytes(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    """ONNX through torch.export (the current exporter), falling back to the TorchScript-based one."""
    batch = torch.export.Dim("batch", min=1)
    errors = []
    for dynamo in (True, False):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dynamo:
                    program = torch.onnx.export(
                        model,
                        (example,),
                        dynamo=True,
                        opset_version=OPSET,
                        input_names=["images"],
                        output_names=["logits"],
                        dynamic_shapes=({0: batch},),
                        verbose=False,
                    )
                    if program is None:  # only with an f= to write to, which is not given here
                        raise RuntimeError("torch.onnx.export returned no program")
                    return program.model_proto.SerializeToString()
                buffer = io.BytesIO()
                torch.onnx.export(
                    model,
                    (example,),
                    buffer,  # type: ignore[arg-type]  # a file object is accepted, as torch's docs say
                    dynamo=False,
                    opset_version=OPSET,
                    input_names=["images"],
                    output_names=["logits"],
                    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                )
                return buffer.getvalue()
        except Exception as exc:  # the exporter's own errors are long; the first line says enough
            errors.append(
                f"{'torch.export' if dynamo else 'TorchScript'}: {exc.__class__.__name__}: "
                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            )
    raise RuntimeError("; ".join(errors))


@torch.no_grad()
def verify(model: torch.nn.Module, onnx_blob: bytes, batches) -> dict:
    """Run the ONNX model in ONNX Runtime and the PyTorch model on the same batches. Top-1 must
    agree except where the checkpoint's two best classes are within the tolerance of each other
    (a tie either may break), and every probability within PROB_TOLERANCE."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_blob, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    samples, disagree, worst = 0, 0, 0.0
    for x in batches:
        x = x.float().cpu()
        reference = torch.softmax(model(x).float(), 1)
        got = torch.softmax(torch.from_numpy(session.run(None, {name: x.numpy()})[0]).float(), 1)
        top2 = reference.topk(min(2, reference.shape[1]), 1).values
        clear = (top2[:, 0] - top2[:, -1]) > PROB_TOLERANCE
        disagree += int(((reference.argmax(1) != got.argmax(1)) & clear).sum())
        worst = max(worst, float((reference - got).abs().max()))
        samples += len(x)
    result = {
        "samples": samples,
        "top1_disagreements": disagree,
        "max_abs_probability_difference": worst,
        "tolerance": PROB_TOLERANCE,
        "runtime": f"onnxruntime {onnxruntime.__version__}",
    }
    if disagree or worst > PROB_TOLERANCE:
        raise ValueError(
            f"ONNX Runtime disagrees with the checkpoint: {disagree} top-1 difference(s), "
            f"probabilities up to {worst:.2e} apart over {samples} samples (tolerance {PROB_TOLERANCE})"
        )
    return result


def write(out_uri: str, model: torch.nn.Module, config: dict, batches, onnx: bool = True) -> dict:
    """Write model/ (weights, config, verified ONNX) to `out_uri`; returns the config written.
    `batches` yields CPU input tensors for the verification (validation samples)."""
    model = model.float().cpu().eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = {
        **config,
        "format": "trainjob-model",
        "format_version": FORMAT_VERSION,
        "weights": "model.safetensors",
        "trainjob_version": __version__,
        "torch_version": torch.__version__,
        "onnx": None,
    }
    with storage.errors(out_uri, OutputError, "write the model to"):
        storage.write_bytes(
            storage.join(out_uri, "model.safetensors"),
            save_safetensors(state, metadata={"format": "pt", "architecture": config["architecture"]}),
        )
        if onnx:
            start = time.monotonic()
            batches = list(batches)
            try:
                blob = _onnx_bytes(model, batches[0][:1])
                config["verification"] = verify(model, blob, batches)
                storage.write_bytes(storage.join(out_uri, "model.onnx"), blob)
                config.update(onnx="model.onnx", onnx_opset=OPSET)
                log.info(
                    f"model exported to {storage.redact_uri(out_uri)} (ONNX verified on "
                    f"{config['verification']['samples']} samples in {time.monotonic() - start:.1f} s)"
                )
            except OutputError:
                raise
            except Exception as exc:  # the weights and config still serve; say why there is no ONNX
                config["onnx_error"] = str(exc)[:500]
                log.warning(
                    f"no ONNX model written to {storage.redact_uri(out_uri)}: {config['onnx_error']}; "
                    "model.safetensors and config.json are"
                )
        storage.write_json(storage.join(out_uri, "config.json"), config)
    return config


def config_for(
    settings, class_names: list[str], sample_shape: tuple[int, ...], from_images: bool, source: dict
) -> dict:
    return {
        "architecture": settings.model,
        "hidden_sizes": settings.hidden_sizes if settings.model == "mlp" else None,
        "num_classes": len(class_names),
        "class_names": class_names,
        "input_shape": list(sample_shape),
        "input": {"layout": "NCHW", "dtype": "float32", "batch": "dynamic"},
        "preprocessing": preprocessing(settings.model, sample_shape, settings.image_size, from_images),
        "source": source,
    }


def _regular(uri: str) -> None:
    """A local file must be a regular one: a FIFO would hang the read, a link to a device fill memory."""
    if storage.is_local(uri) and os.path.lexists(uri) and not os.path.isfile(uri):
        raise DataError(f"{storage.redact_uri(uri)} is not a regular file")


def load(model_uri: str) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on the CPU, config) from an exported model: `<run>/model/` or the run
    directory itself."""
    for uri in (model_uri, storage.join(model_uri, "model")):
        config_uri = storage.join(uri, "config.json")
        with storage.errors(config_uri, DataError, "read the model from"):
            if not storage.exists(config_uri):
                continue
            _regular(config_uri)
            text = storage.read_bytes(config_uri, max_bytes=MAX_CONFIG_BYTES)
            try:
                config = json.loads(text) if len(text) <= MAX_CONFIG_BYTES else None
            except ValueError:
                config = None
            problem = config_problem(config)
            if problem or not isinstance(config, dict):
                raise DataError(f"{storage.redact_uri(config_uri)} is not a usable trainjob model config: {problem}")
            _regular(storage.join(uri, config["weights"]))
            blob = storage.read_bytes(storage.join(uri, config["weights"]), max_bytes=MAX_WEIGHT_BYTES)
            if len(blob) > MAX_WEIGHT_BYTES:
                raise DataError(
                    f"{storage.redact_uri(storage.join(uri, config['weights']))} is over {MAX_WEIGHT_BYTES} bytes"
                )
        try:
            model = build(config)
            model.load_state_dict(load_safetensors(blob))
        except Exception as exc:
            raise DataError(
                f"the weights in {storage.redact_uri(uri)} do not fit its config.json "
                f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})"
            ) from None
        return model.eval(), config
    raise DataError(
        f"no exported model at {storage.redact_uri(model_uri)}: expected config.json there or in its "
        "model/ folder (a completed run writes <run>/model/; `python -m job export` makes one from a checkpoint)"
    )

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

import contextlib
import io
import json
import logging
import math
import os
import re
import time
import warnings
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from job import __version__, models, storage
from job.data import images, layout
from job.data.augment import EVAL_RESIZE
from job.errors import DataError, JobError, OutputError, format_version, one_line
from job.report import phase
from job.settings import MAX_HIDDEN_LAYERS, MAX_IMAGE_SIDE, MAX_MLP_PARAMETERS, mlp_parameters

log = logging.getLogger("job")
FORMAT_VERSION = 1
OPSET = 18
PROB_TOLERANCE = 1e-4  # softmax probabilities: ONNX Runtime against PyTorch on the same inputs
VERIFY_SAMPLES = 1000  # validation samples compared at export (all of them when fewer)


def preprocessing(model_name: str, sample_shape: tuple[int, ...], image_size: int, from_images: bool) -> dict:
    """How an input becomes a model input, as predict and evaluate do it, exactly enough to do it
    without PyTorch: for photos (job.data.augment's evaluation), PIL's RGB conversion, the shorter
    side resized (bilinear, antialiased; the longer side rounded down, as torchvision does), the
    centre crop (its offset rounded half to even, as torchvision does), scaled to [0, 1] and
    normalised with ImageNet's statistics for torchvision models; for IDX images, scaled to [0, 1];
    image files for an IDX model, grayscale stretched to its height and width. `steps` says it in
    words, with the numbers filled in."""
    normalize = model_name not in ("mlp", "cnn")
    if from_images:
        short, crop = round(image_size * EVAL_RESIZE), image_size
        mean = list(images.IMAGENET_MEAN) if normalize else None
        std = list(images.IMAGENET_STD) if normalize else None
        return {
            "kind": "image", "convert": "RGB", "exif_orientation": "ignored", "resize_shorter_side": short,
            "resize_longer_side": "floor", "interpolation": "bilinear", "antialias": True, "center_crop": crop,
            "center_crop_offset": "round_half_even", "scale": 1 / 255, "mean": mean, "std": std,
            "channel_order": "RGB", "layout": "CHW", "dtype": "float32",
            "steps": [
                "decode the file with PIL and convert it to RGB (Image.convert('RGB'): alpha dropped, palette, "
                "grayscale and CMYK expanded); the EXIF orientation is not applied",
                f"resize to {short} px on the shorter side and floor({short} * longer / shorter) px on the longer, "
                "bilinear with antialiasing (PIL: img.resize((width, height), Image.Resampling.BILINEAR, "
                "reducing_gap=None); predict runs torchvision's resize, which PIL matches to within 1/255 on a few "
                "pixels)",
                f"crop the centre {crop}x{crop} of the resized image: left = round((width - {crop}) / 2), top = "
                f"round((height - {crop}) / 2), halves rounded to even (Python's round)",
                "to float32, divided by 255 (values in [0, 1])"
                + (f"; then per channel (R, G, B) minus mean {mean}, divided by std {std}" if normalize else ""),
                f"channels first: (3, {crop}, {crop}) per image, batches (N, 3, {crop}, {crop}), float32, the "
                "ONNX model's 'images' input",
            ],
        }
    channels, height, width = sample_shape
    return {
        "kind": "idx", "channels": channels, "height": height, "width": width, "scale": 1 / 255, "mean": None,
        "std": None, "convert": "L", "interpolation": "bilinear", "antialias": True, "layout": "CHW",
        "dtype": "float32",
        "steps": [
            f"IDX images ({height}x{width}): the uint8 pixels as stored; image files: decoded with PIL, converted "
            f"to grayscale (Image.convert('L')), resized to exactly {width}x{height} (the aspect ratio is not "
            "kept) with img.resize((width, height), Image.Resampling.BILINEAR)",
            "to float32, divided by 255 (values in [0, 1]), no normalisation",
            f"channels first: ({channels}, {height}, {width}) per image"
            + (" (the gray channel repeated 3 times)" if channels == 3 else "")
            + f", batches (N, {channels}, {height}, {width}), float32, the ONNX model's 'images' input",
        ],
    }


MAX_CLASSES = layout.MAX_CLASSES  # what training can produce
MAX_CONFIG_BYTES = 16 << 20
MAX_WEIGHT_BYTES = 16 << 30


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # "3" is not 3; fields we do not read are kept


class ImagePreprocessing(_Strict):
    """What predict reads. The resize fields are optional (configs written before they were added
    lack them: format_version 1 is extended, not bumped, so older trainjobs read new configs too)
    but where present must say what predict does."""

    kind: Literal["image"]
    center_crop: int
    mean: list[float] | None  # required; null: not normalised
    std: list[float] | None
    resize_shorter_side: int | None = None  # round(center_crop * 256 / 224), job.data.augment's
    interpolation: Literal["bilinear"] = "bilinear"
    antialias: Literal[True] = True

    @model_validator(mode="after")
    def _resize(self) -> "ImagePreprocessing":
        wanted = round(self.center_crop * EVAL_RESIZE)
        if self.resize_shorter_side is not None and self.resize_shorter_side != wanted:
            raise ValueError(f"resize_shorter_side must be round(center_crop * 256 / 224) = {wanted}, what predict "
                             "does")
        return self


class IdxPreprocessing(_Strict):
    kind: Literal["idx"]
    channels: int
    height: int
    width: int


class ModelConfig(_Strict):
    """config.json, as predict and evaluate read it. A model folder may come from anyone: sizes
    are bounded before anything is allocated, and the weights must be a file beside it."""

    format: Literal["trainjob-model"]
    format_version: Annotated[int, format_version(FORMAT_VERSION)]
    weights: str
    architecture: str
    num_classes: int
    class_names: list[str]
    input_shape: list[int]
    hidden_sizes: list[int] | None = None
    preprocessing: ImagePreprocessing | IdxPreprocessing = Field(discriminator="kind")

    @field_validator("weights")
    @classmethod
    def _beside(cls, weights: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", weights):
            raise ValueError("weights must name a file beside config.json")
        return weights

    @field_validator("num_classes")
    @classmethod
    def _classes(cls, n: int) -> int:
        if not 2 <= n <= MAX_CLASSES:
            raise ValueError(f"num_classes must be 2 to {MAX_CLASSES}")
        return n

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, shape: list[int]) -> list[int]:
        if len(shape) != 3 or not all(1 <= d <= MAX_IMAGE_SIDE for d in shape):
            raise ValueError(f"input_shape must be [channels, height, width], each 1 to {MAX_IMAGE_SIDE}")
        return shape

    @field_validator("hidden_sizes")
    @classmethod
    def _hidden(cls, hidden: list[int] | None) -> list[int] | None:
        if hidden is not None and not (len(hidden) <= MAX_HIDDEN_LAYERS and all(1 <= h <= 65536 for h in hidden)):
            raise ValueError(f"hidden_sizes must be up to {MAX_HIDDEN_LAYERS} widths of 1 to 65536")
        return hidden

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if len(self.class_names) != self.num_classes:
            raise ValueError("class_names must be num_classes names")
        widths = [math.prod(self.input_shape), *(self.hidden_sizes or []), self.num_classes]
        if self.architecture == "mlp" and mlp_parameters(widths) > MAX_MLP_PARAMETERS:
            raise ValueError(f"an mlp of over {MAX_MLP_PARAMETERS:,} parameters")
        prep = self.preprocessing  # what predict's transforms use must be what the model takes
        if isinstance(prep, ImagePreprocessing) and self.input_shape != [3, prep.center_crop, prep.center_crop]:
            raise ValueError("preprocessing center_crop must match input_shape [3, crop, crop]")
        if isinstance(prep, IdxPreprocessing) and (
            prep.channels not in (1, 3) or self.input_shape != [prep.channels, prep.height, prep.width]
        ):
            raise ValueError("preprocessing channels (1 or 3), height and width must match input_shape")
        return self


def config_problem(config) -> str | None:
    """What makes a config.json unusable, in one line (None: nothing)."""
    if not isinstance(config, dict) or config.get("format") != "trainjob-model":
        return "not a trainjob model config"
    try:
        ModelConfig.model_validate(config)  # strict: the dict is exactly what was validated
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["loc"] == ("preprocessing",):  # the union's own errors name pydantic's internals
            return "preprocessing is missing" if first["type"] == "missing" else \
                "preprocessing must be an object whose kind is 'image' or 'idx'"
        where, message = one_line(exc)
        return f"{message} ({where})" if where else message
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
def verify(model: torch.nn.Module, onnx_blob: bytes, batches, device: torch.device | None = None,
           threads: int | None = None) -> dict:
    """Run the ONNX model in ONNX Runtime and the PyTorch model (on `device`, where it is) on the
    same batches. Top-1 must agree except where the checkpoint's two best classes are within the
    tolerance of each other (a tie either may break), and every probability within PROB_TOLERANCE."""
    import onnxruntime

    device = device or torch.device("cpu")
    options = onnxruntime.SessionOptions()
    # ONNX Runtime's default is a thread per physical core it sees, a container's CPU quota unseen
    # (on a GPU node, 100+ threads on a few CPUs). The images ship its CPU build: it runs on the CPU.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    session = onnxruntime.InferenceSession(onnx_blob, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    samples, disagree, worst = 0, 0, 0.0
    with full_fp32(device):
        for x in batches:
            x = x.float()
            reference = torch.softmax(model(x.to(device)).float(), 1).cpu()
            got = torch.softmax(torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0]).float(), 1)
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
        "pytorch_device": str(device),
    }
    if disagree or worst > PROB_TOLERANCE:
        raise ValueError(
            f"ONNX Runtime disagrees with the checkpoint: {disagree} top-1 difference(s), "
            f"probabilities up to {worst:.2e} apart over {samples} samples (tolerance {PROB_TOLERANCE})"
        )
    return result


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """Full float32 on CUDA while the reference runs: cuDNN convolutions use TF32 by default,
    whose 10-bit mantissa can move probabilities further from ONNX Runtime's float32 than
    PROB_TOLERANCE."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def write(out_uri: str, model: torch.nn.Module, config: dict, batches, onnx: bool = True,
          device: torch.device | None = None, threads: int | None = None, log_every: float = 10.0) -> dict:
    """Write model/ (weights, config, verified ONNX) to `out_uri`; returns the config written.
    `batches` yields input tensors for the verification (validation samples), on any device;
    the checkpoint's side of it runs on `device` (the training device), ONNX Runtime on the CPU
    with `threads`. A line every `log_every` seconds, whatever the phase."""
    device = device or torch.device("cpu")
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
    shown = storage.redact_uri(out_uri)
    log.info(f"exporting the model to {shown}" + (f" (ONNX verified with PyTorch on {device})" if onnx else ""))
    with storage.errors(out_uri, OutputError, "write the model to"):
        with phase("export: writing model.safetensors", log_every):
            # an earlier export's config and ONNX file must never sit beside other weights, whatever
            # ends this one: config.json, written last, says the folder is complete
            for name in ("config.json", "model.onnx"):
                storage.remove(storage.join(out_uri, name))
            storage.write_bytes(
                storage.join(out_uri, "model.safetensors"),
                save_safetensors(state, metadata={"format": "pt", "architecture": config["architecture"]}),
            )
        onnx_seconds = 0.0
        if onnx:
            start = time.monotonic()
            try:
                with phase("export: reading the validation samples", log_every):
                    batches = list(batches)
                # Traced on the CPU: tracing is symbolic work for the CPU whatever the device, and a
                # graph traced there is the one our tests verify
                with phase("export: tracing the model for ONNX", log_every):
                    blob = _onnx_bytes(model, batches[0][:1].float().cpu())
                samples = sum(len(x) for x in batches)
                with phase(f"export: verifying the ONNX model on {samples} samples (PyTorch on {device})", log_every):
                    config["verification"] = verify(model.to(device), blob, batches, device, threads)
                with phase("export: writing model.onnx", log_every):
                    storage.write_bytes(storage.join(out_uri, "model.onnx"), blob)
                config.update(onnx="model.onnx", onnx_opset=OPSET)
                onnx_seconds = time.monotonic() - start
            except JobError:  # a storage error or a stop (Stopped): not a reason to go on without ONNX
                raise
            except Exception as exc:  # the weights and config still serve; say why there is no ONNX
                config["onnx_error"] = str(exc)[:500]
                log.warning(
                    f"no ONNX model written to {shown}: {config['onnx_error']}; "
                    "model.safetensors and config.json are"
                )
        with phase("export: writing config.json", log_every):
            storage.write_json(storage.join(out_uri, "config.json"), config)
    if config["onnx"]:
        log.info(f"model exported to {shown} (ONNX verified on {config['verification']['samples']} samples "
                 f"in {onnx_seconds:.1f} s)")
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


def fitted(config: dict, tensors: dict) -> torch.nn.Module:
    """The model `config` describes with the weights `tensors` loaded. The weights' tensors are
    compared with the architecture's shapes first, on a model without storage: a config (or a
    checkpoint) naming a huge torchvision model beside small weights is refused before it is
    built (vit_h_14 would take 2.5 GB). Raises ValueError saying what does not fit."""
    with models.shapes_only():
        wanted = {k: tuple(v.shape) for k, v in build(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != wanted:
        first = min(k for k in wanted.keys() | got.keys() if wanted.get(k) != got.get(k))
        raise ValueError(
            f"{config['architecture']} has {sum(map(math.prod, wanted.values())):,} parameters in {len(wanted)} "
            f"tensors, the weights {sum(map(math.prod, got.values())):,} in {len(got)}; first difference: "
            f"{first} {wanted.get(first, 'absent')} against {got.get(first, 'absent')}"
        )
    model = build(config)
    model.load_state_dict(tensors)
    return model


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
            model = fitted(config, load_safetensors(blob))
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

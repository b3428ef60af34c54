"""Models: our small nets and any torchvision classifier, its head replaced to fit the classes,
initial weights loaded, and the backbone frozen as asked."""

import contextlib
import io
import logging
import math

import torch
from torch import nn

from job import storage
from job.errors import DataError, SettingsError
from job.settings import MAX_MLP_PARAMETERS, mlp_parameters

log = logging.getLogger("job")


def mlp(settings, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """flatten -> Linear/ReLU per hidden size -> Linear (the tutorial's net with JOB_HIDDEN_SIZES=32)."""
    in_features = math.prod(input_shape)
    total = mlp_parameters([in_features, *settings.hidden_sizes, num_classes])
    if total > MAX_MLP_PARAMETERS:  # refused before a byte is allocated: the input's size comes from the data
        raise SettingsError(
            f"JOB_HIDDEN_SIZES={','.join(map(str, settings.hidden_sizes))} makes an mlp of {total:,} parameters for "
            f"inputs of {tuple(input_shape)} and {num_classes} classes, over the bound of {MAX_MLP_PARAMETERS:,}; "
            "use narrower layers (or a smaller JOB_IMAGE_SIZE)"
        )
    layers: list[nn.Module] = [nn.Flatten()]
    for width in settings.hidden_sizes:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two conv blocks and a small classifier: a sensible first convnet for 28x28 digits."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))


@contextlib.contextmanager
def shapes_only():
    """Inside the block, parameters live on the meta device: a model's shapes without its storage
    (each tensor is made, then dropped, one at a time), to know its size before building it. As
    accelerate's init_empty_weights; the meta device as the default device would break
    torchvision's regnets, which compute their widths with tensors."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def head_name(model: nn.Module) -> str:
    """The classifier head: the last Linear layer (resnet `fc`, efficientnet/mobilenet/convnext
    `classifier[-1]`, vit `heads.head`, densenet `classifier`, ...)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise DataError(
            f"{model.__class__.__name__} has no Linear classifier head to replace; choose another JOB_MODEL"
        )
    return names[-1]


def replace_head(model: nn.Module, num_classes: int) -> str:
    name = head_name(model)
    old = model.get_submodule(name)
    assert isinstance(old, nn.Linear)  # head_name finds Linear layers only
    model.set_submodule(name, nn.Linear(old.in_features, num_classes))
    return name


def read_state_dict(uri: str) -> dict:
    """A state dict from any URI (our own checkpoints too: their `model` entry)."""
    with storage.errors(uri, DataError, "read weights from"):
        blob = storage.read_bytes(uri)
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"JOB_PRETRAINED={storage.redact_uri(uri)} is not a loadable state dict "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    if isinstance(state, dict) and "format_version" in state and "model" in state:
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"JOB_PRETRAINED={storage.redact_uri(uri)} holds no state dict of tensors")
    return state


def load_fitting(model: nn.Module, state: dict, head: str, source: str) -> None:
    """Load weights whose keys and shapes fit the model; the head may differ (it is replaced).
    Anything else that does not fit is a clear error listing the keys."""
    own = model.state_dict()

    def is_head(k: str) -> bool:
        return k.startswith(head + ".")

    missing = [k for k in own if k not in state and not is_head(k)]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape and not is_head(k)
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        ]
        raise DataError(f"weights from {source} do not fit {model.__class__.__name__}: {'; '.join(parts)}")
    model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)


def torchvision_model(settings, num_classes: int) -> tuple[nn.Module, str]:
    import torchvision

    model = torchvision.models.get_model(settings.model)
    head = head_name(model)
    if settings.pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(settings.model).DEFAULT
        try:  # from TORCH_HOME (which images pre-bake), else downloaded there
            state = weights.get_state_dict(progress=False)
        except Exception as exc:
            raise DataError(
                f"cannot get {weights} ({exc.__class__.__name__}); pre-bake it in the image "
                "(PRETRAINED_WEIGHTS build arg) or set JOB_PRETRAINED to a state-dict URI"
            ) from None
        load_fitting(model, state, head, str(weights))
    elif settings.pretrained != "none":
        load_fitting(model, read_state_dict(settings.pretrained), head, storage.redact_uri(settings.pretrained))
    replace_head(model, num_classes)
    return model, head


def model_hint(settings, input_shape: tuple[int, ...]) -> str | None:
    """A hint when JOB_MODEL was left at its default (mlp, the MNIST tutorial's net) for colour
    images: an mlp sees a 224x224 photo as 150,528 unrelated numbers, and learns little from it."""
    if settings.model != "mlp" or "model" in getattr(settings, "model_fields_set", {"model"}):
        return None
    if len(input_shape) != 3 or input_shape[0] != 3:  # MNIST-format digits (1 channel): the mlp is their recipe
        return None
    return (
        f"hint: JOB_MODEL is not set, so an mlp (the MNIST recipe) trains on these {'x'.join(map(str, input_shape))} "
        f"colour images as {math.prod(input_shape):,} flat inputs; for photos set JOB_MODEL=resnet18 (or another "
        "torchvision model, e.g. efficientnet_b0), with JOB_PRETRAINED=imagenet and JOB_FREEZE=all to start from "
        "ImageNet weights; JOB_MODEL=mlp keeps the mlp and silences this line"
    )


def build_model(settings, input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, str]:
    """(model, name of its classifier head)."""
    hint = model_hint(settings, input_shape)
    if hint:
        log.info(hint)  # info: rank 0 alone logs it
    if settings.model in ("mlp", "cnn"):
        model = mlp(settings, input_shape, num_classes) if settings.model == "mlp" else cnn(input_shape, num_classes)
        if settings.pretrained not in ("none", "imagenet"):
            load_fitting(model, read_state_dict(settings.pretrained), "", storage.redact_uri(settings.pretrained))
        return model, head_name(model)
    return torchvision_model(settings, num_classes)


def stages(model: nn.Module, head: str) -> list[nn.Module]:
    """The backbone's stages, input to output: the blocks of its `features` (efficientnet,
    mobilenet, convnext, densenet, vgg, ...) or its top-level children (resnet's layer1..4)."""
    top = head.split(".")[0]
    children = [(n, m) for n, m in model.named_children() if n != top]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        children = [(n, m) for n, m in children if n != "features"]
        return [m for m in features.children() if any(True for _ in m.parameters())] + [
            m for _, m in children if any(True for _ in m.parameters())
        ]
    return [m for _, m in children if any(True for _ in m.parameters())]


def freeze(model: nn.Module, head: str, setting: str) -> list[nn.Module]:
    """Apply JOB_FREEZE. Returns the frozen modules, which training keeps in eval mode (batch-norm
    statistics stay as pretrained, dropout before the head stays off) with the head in train mode."""
    if setting == "none":
        return []
    head_module = model.get_submodule(head)
    if setting == "all":
        frozen, keep = list(model.children()), []
    else:
        units = stages(model, head)
        if int(setting) >= len(units):  # N >= the stages would freeze nothing: JOB_FREEZE=none, silently
            valid = f"N, the last stages to train, can be 1 to {len(units) - 1}; " if len(units) > 1 else ""
            raise SettingsError(
                f"JOB_FREEZE={setting}: {model.__class__.__name__} has {len(units)} backbone stage(s)"
                f"{_stage_names(model, units)}, so {valid}JOB_FREEZE=none trains them all, JOB_FREEZE=all only the "
                "new head"
            )
        keep = units[-int(setting) :]
        frozen = [u for u in units if all(u is not k for k in keep)]
    trainable = {id(p) for m in [*keep, head_module] for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return frozen


def _stage_names(model: nn.Module, units: list[nn.Module]) -> str:
    """' (conv1, bn1, layer1, ...)': the stages by name, the first few and the last."""
    names = {id(m): n for n, m in model.named_modules()}
    shown = [names.get(id(u), "?") for u in units]
    if len(shown) > 6:
        shown = [*shown[:3], "...", *shown[-2:]]
    return f" ({', '.join(shown)})"


def check_freeze(settings, input_shape: tuple[int, ...], num_classes: int) -> None:
    """--check: JOB_FREEZE=N fits the model's stages, as `freeze` checks it in the run (the model's
    shapes alone: no weights, no storage)."""
    if settings.freeze in ("all", "none"):
        return
    with shapes_only():
        # the model named as given: its hint, if any, is the caller's to log
        model, head = build_model(settings.model_copy(update={"pretrained": "none", "model": settings.model}),
                                  input_shape, num_classes)
    freeze(model, head, settings.freeze)


def train_mode(model: nn.Module, head: str, frozen: list[nn.Module]) -> None:
    model.train()
    for m in frozen:
        m.eval()
    model.get_submodule(head).train()


def param_groups(model: nn.Module, head: str, backbone_lr_scale: float) -> list[dict]:
    """The head at the full lr, unfrozen backbone layers at JOB_BACKBONE_LR_SCALE times it."""
    head_params = list(model.get_submodule(head).parameters())
    ids = {id(p) for p in head_params}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": head_params, "lr_scale": 1.0}]
    if backbone:
        groups.append({"params": backbone, "lr_scale": backbone_lr_scale})
    return groups

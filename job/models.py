"""Model construction from the settings."""

from torch import nn


def build_model(settings, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """mlp: flatten -> Linear/ReLU per hidden size -> Linear to the classes (the tutorial's net
    with JOB_HIDDEN_SIZES=32)."""
    in_features = 1
    for d in input_shape:
        in_features *= d
    layers: list[nn.Module] = [nn.Flatten()]
    for width in settings.hidden_sizes:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)

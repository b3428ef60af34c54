"""Optimizer and learning-rate schedule from the settings.

The lr of every step is a pure function of (settings, training progress): nothing to checkpoint,
exact after a mid-epoch resume, and cheaper per step than an LRScheduler object.
"""

import math

import torch


def build_optimizer(settings, params) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def lr_factor(settings, epochs_done: float) -> float:
    """The multiplier of the peak lr after `epochs_done` (fractional) epochs of training.

    A function of training progress in epochs, not of a step count, so the schedule is the same
    whatever the number of processes or the batch size (a resume may change either)."""
    t = min(epochs_done, settings.epochs)
    if settings.lr_schedule == "step":
        return settings.lr_gamma ** sum(int(t) >= m for m in settings.lr_milestones)
    if settings.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t / settings.epochs))
    if settings.lr_schedule == "onecycle":
        # torch's OneCycleLR shape (30% warm-up from lr/25, cosine down to lr/25e4) without its
        # momentum cycling, which would silently override JOB_MOMENTUM.
        u, start, end = t / settings.epochs, 1 / 25, 1 / 25e4
        if u < 0.3:
            return start + (1 - start) * (1 - math.cos(math.pi * u / 0.3)) / 2
        return end + (1 - end) * (1 + math.cos(math.pi * (u - 0.3) / 0.7)) / 2
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, settings, epochs_done: float) -> float:
    """Set the lr for the next step; a parameter group may scale it by its `lr_scale`."""
    lr = settings.lr * lr_factor(settings, epochs_done)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr

"""Optimizer and learning-rate schedule from the settings.

The lr of every step is a pure function of (settings, global step): nothing to checkpoint, exact
after a mid-epoch resume, and cheaper per step than an LRScheduler object (scripts/bench_mlp.py).
"""

import math

import torch


def build_optimizer(settings, params) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def lr_factor(settings, step: int, steps_per_epoch: int) -> float:
    """The multiplier of the peak lr at a given optimizer step."""
    total = settings.epochs * steps_per_epoch
    if settings.lr_schedule == "step":
        epoch = step // steps_per_epoch
        return settings.lr_gamma ** sum(epoch >= m for m in settings.lr_milestones)
    if settings.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if settings.lr_schedule == "onecycle":
        # torch's OneCycleLR shape (30% warm-up from lr/25, cosine down to lr/25e4) without its
        # momentum cycling, which would silently override JOB_MOMENTUM.
        warmup = max(1, int(0.3 * total))
        start, end = 1 / 25, 1 / 25e4
        if step < warmup:
            return start + (1 - start) * (1 - math.cos(math.pi * step / warmup)) / 2
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return end + (1 - end) * (1 + math.cos(math.pi * t)) / 2
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, settings, step: int, steps_per_epoch: int) -> float:
    """Set the lr for optimizer step `step` (0-based); a group may scale it by its `lr_scale`."""
    lr = settings.lr * lr_factor(settings, step, steps_per_epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr

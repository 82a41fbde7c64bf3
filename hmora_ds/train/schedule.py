"""Learning-rate schedules: linear warm-up, then linear / cosine decay or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_lambda(step: int, warmup: int, total: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        decay = 1.0 - progress
    elif kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"train.schedule: unknown schedule {kind!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup: int,
    total: int,
    kind: str,
    min_ratio: float = 0.0,
    scale: Callable[[int], float] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` (its state is saved in DeepSpeed checkpoints). ``scale(step)``, when
    given, multiplies the schedule at every step (a method's
    :meth:`~hmora_ds.methods.Method.lr_scale`, e.g. HiMoLE's stage 2): a pure function of the
    step, so the resumed schedule (``last_epoch`` restored) is the uninterrupted one."""
    if scale is None:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, warmup, total, kind, min_ratio)
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup, total, kind, min_ratio) * scale(s)
    )

"""Validation during training, behind one small interface.

An :class:`Evaluator` scores the model every ``eval.every`` steps; the trainer keeps the best
checkpoint by its ``metric`` (``mode`` says whether lower or higher is better) and stops early
after ``eval.patience`` evaluations without improvement. :class:`ValidationLoss` (held-out LM
loss) is the default; the benchmark evaluator of the evaluation module plugs in the same way.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.distributed as dist

from hmora_ds.model import lm_loss_sum


class Evaluator(Protocol):
    """Scores a model; every rank calls :meth:`evaluate` (it may run collectives)."""

    metric: str
    mode: str  # "min" or "max"

    def evaluate(self, model: Any, step: int) -> dict[str, float]:
        """Returns at least ``{metric: value}`` (identical on every rank)."""
        ...


class ValidationLoss:
    """Held-out LM loss (plain cross-entropy: no label smoothing) over fixed validation
    batches, sharded across ranks.

    Every rank runs the same number of forwards (ranks without a batch of their own re-run one
    with zero weight), which ZeRO-3's collectives inside forward require.
    """

    metric = "val_loss"
    mode = "min"

    def __init__(
        self,
        batches: list[dict[str, torch.Tensor]],
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.batches = batches
        self.device = device
        self.autocast_dtype = autocast_dtype

    @torch.no_grad()
    def evaluate(self, model: Any, step: int) -> dict[str, float]:
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        n = len(self.batches)
        rounds = -(-n // world)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        was_training = model.training
        model.eval()
        for r in range(rounds):
            idx = r * world + rank
            batch = self.batches[idx if idx < n else 0]
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.autocast(
                self.device.type,
                dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None,
            ):
                out = model(**batch, return_router_stats=False)
            if idx < n:
                # Plain cross-entropy whatever loss.label_smoothing trains with: the held-out
                # loss of runs (and methods) that smooth differently stays comparable.
                lm_sum, n_tokens = lm_loss_sum(out.logits, batch["labels"])
                totals[0] += lm_sum.double()
                totals[1] += n_tokens.double()
        if was_training:
            model.train()
        if world > 1:
            dist.all_reduce(totals)
        return {self.metric: (totals[0] / totals[1].clamp_min(1)).item()}


def improved(value: float, best: float | None, mode: str) -> bool:
    """Is ``value`` a new best (``mode``: ``min`` / ``max``)? A non-finite value never is (a
    diverged model's NaN loss must not become ``adapter_best``); a finite one beats no best and
    a non-finite best (kept by a checkpoint written before this rule)."""
    if not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value < best if mode == "min" else value > best

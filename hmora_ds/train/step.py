"""One optimizer step, as pure functions: forward → total loss → backward → ``engine.step``.

Global batch (spec §5): one optimizer step consumes ``grad_accum`` micro-batches on each of the
``world`` ranks. The LM loss is the summed cross-entropy over *all* of them divided by the
global number of target tokens (counted before the step and all-reduced), so with N ranks each
holding 1/N of a batch the loss value and update equal one process holding the whole batch.
DeepSpeed divides the gradient by ``grad_accum`` and averages it over ranks; the LM term is
scaled by ``world · grad_accum`` to undo exactly that. Router statistics of the auxiliary
losses are all-reduced inside the model over the data-parallel group (a differentiable
all-reduce, whose backward sums the ranks' gradients, which DeepSpeed's average then divides
back). Token routers' statistics are per micro-step (their loss is the mean over micro-steps);
the method's *step kinds* (HMoRA's task routers, ``loss.task_stats=step``) cover every sequence
of the optimizer step: the first micro-step receives the step's other micro-batches
(``step_batches``), computes that loss once, and back-propagates it scaled by ``grad_accum``
(undoing DeepSpeed's division); the later micro-steps skip it. So N ranks × K micro-steps give
the loss value and gradient of one process holding the whole global batch. The logged routing
statistics accumulate over micro-steps.

No host-device synchronisation inside a step: token counts come from the collator's host
tensors, every loss is accumulated on the device (:class:`StepMetrics`), and
:func:`materialize` reads a whole logging window back in one transfer. (DeepSpeed's own
gradient clipping may still synchronise inside ``engine.step``.)
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hmora_ds.losses import total_loss
from hmora_ds.metrics import RouterStatsAccumulator


@dataclass
class StepMetrics:
    """One step's metrics, still on the device (read back by :func:`materialize`).

    Attributes:
        counts: (2,) float64: global (target tokens, attended tokens) of the step.
        lm_sum: () float64: summed LM cross-entropy over all micro-batches and ranks.
        aux_loss: () fp32: unweighted auxiliary loss, mean over micro-steps.
        aux_weighted: () fp32: Σ_k λ_k · L_aux,k (the method's weights), mean over micro-steps.
        aux_kinds: aux-loss kind → () fp32, the unweighted loss split by kind.
        grad_norm: DeepSpeed's global gradient norm (None when it has none).
        lr: the learning rate of the first parameter group.
        applied: 1.0 if DeepSpeed applied the update, 0.0 if it skipped it (non-finite).
    """

    counts: torch.Tensor
    lm_sum: torch.Tensor
    aux_loss: torch.Tensor
    aux_weighted: torch.Tensor
    aux_kinds: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_norm: Any = None
    lr: float = 0.0
    applied: float = 1.0

    @classmethod
    def zeros(cls, counts: torch.Tensor) -> StepMetrics:
        device = counts.device
        return cls(
            counts=counts,
            lm_sum=torch.zeros((), dtype=torch.float64, device=device),
            aux_loss=torch.zeros((), dtype=torch.float32, device=device),
            aux_weighted=torch.zeros((), dtype=torch.float32, device=device),
        )

    def add_micro(self, out: Any, accum: int) -> None:
        """Accumulate one micro-step's (detached) losses from an ``HMoRAOutput``: per-micro
        kinds as the mean over the ``accum`` micro-steps, step kinds (computed once, over the
        whole step) as they are."""
        self.lm_sum += out.lm_loss_sum.detach().double()
        step = out.aux_step_weighted.detach().float()
        self.aux_weighted += (out.aux_weighted.detach().float() - step) / accum + step
        for kind, value in out.aux_by_kind.items():
            prev = self.aux_kinds.get(kind)
            value = value.detach().float() / (1 if kind in out.step_kinds else accum)
            self.aux_kinds[kind] = value if prev is None else prev + value
            self.aux_loss += value


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast on ``device`` (a no-op context when ``dtype`` is None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host batch → device without waiting on the device: pinned memory + non_blocking."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def global_token_counts(
    micro: list[dict[str, torch.Tensor]], device: torch.device, world: int
) -> torch.Tensor:
    """(2,) float64 on ``device``: target tokens and attended tokens of the step, summed over
    micro-batches (counted on the collator's host tensors: no device involved) and ranks."""
    n_target = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
    n_tokens = sum(int(m["attention_mask"].sum()) for m in micro)
    counts = torch.tensor([n_target, n_tokens], dtype=torch.float64)
    counts = to_device({"c": counts}, device)["c"]
    if world > 1:
        dist.all_reduce(counts)  # on the device: NCCL takes no host tensors
    return counts


def train_step(
    engine: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    stats: RouterStatsAccumulator | None,
    *,
    grad_accum: int,
    world: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    dp_group: Any,
) -> StepMetrics:
    """One optimizer step over ``grad_accum`` micro-batches of every rank (see the module doc).

    Args:
        engine: the DeepSpeed engine (its module is an ``HMoRAModel``).
        batches: this rank's host micro-batches; ``grad_accum`` of them are consumed.
        stats: accumulates the routing statistics of the step's micro-steps (None: off).
        dp_group: the data-parallel group the auxiliary losses are all-reduced over.
    """
    micro = [next(batches) for _ in range(grad_accum)]
    counts = global_token_counts(micro, device, world)
    # Per-token mean over the *global* batch: Σ_micro Σ_rank lm_sum / n_target, as a device
    # tensor so the loss scale needs no sync.
    scale = (world * grad_accum) / counts[0].clamp_min(1.0)
    metrics = StepMetrics.zeros(counts)
    for i, m in enumerate(micro):
        # The step kinds' loss: computed in the first micro-step over all of the step's
        # sequences (the others' prompts passed along), skipped in the later ones.
        step_kw = {"step_batches": micro[1:]} if i == 0 else {"step_aux": False}
        m = to_device(m, device)
        with autocast(device, autocast_dtype):
            out = engine(**m, aux_group=dp_group, return_router_stats=False, **step_kw)
        lm = out.lm_loss_sum * scale.to(out.lm_loss_sum.dtype)
        # DeepSpeed divides every backward by grad_accum: the once-per-step part is scaled
        # back up so that it enters the update once, in full. The method weighs its kinds.
        aux = out.aux_weighted + (grad_accum - 1) * out.aux_step_weighted
        engine.backward(total_loss(lm, aux))
        engine.step()
        metrics.add_micro(out, grad_accum)
        if stats is not None:
            stats.add(out.routing_records)
    if world > 1:
        dist.all_reduce(metrics.lm_sum)
    metrics.grad_norm = engine.get_global_grad_norm()
    metrics.lr = engine.get_lr()[0]
    metrics.applied = float(engine.was_step_applied())
    return metrics


def _device_row(r: StepMetrics, kinds: list[str]) -> torch.Tensor:
    """One step's device values as a float64 row: lm_sum, counts (2), aux, weighted aux, aux by
    kind, grad norm (NaN when None)."""
    g = r.grad_norm
    g = torch.as_tensor(float("nan") if g is None else g, dtype=torch.float64)
    return torch.cat(
        [
            r.lm_sum.reshape(1),
            r.counts.reshape(2),
            r.aux_loss.double().reshape(1),
            r.aux_weighted.double().reshape(1),
            *[r.aux_kinds[k].double().reshape(1) for k in kinds],
            g.to(r.lm_sum.device).reshape(1),
        ]
    )


def _as_floats(r: StepMetrics, v: list[float], kinds: list[str]) -> dict:
    """A row read back by :func:`_device_row` → the step's logged metrics."""
    lm_sum, n_target, n_tokens, aux, aux_weighted = v[:5]
    lm = lm_sum / max(n_target, 1.0)
    m = {
        "loss": total_loss(lm, aux_weighted),
        "lm_loss": lm,
        "aux_loss": aux,
        "lr": r.lr,
        "target_tokens": n_target,
        "tokens": n_tokens,
        "applied": r.applied,
    }
    m.update({f"aux_loss_{k}": x for k, x in zip(kinds, v[5:-1], strict=True)})
    if r.grad_norm is not None:
        m["grad_norm"] = v[-1]
    return m


def materialize(raws: list[StepMetrics]) -> list[dict[str, float]]:
    """Device metrics of several steps → floats, in ONE device-to-host transfer.

    Each step gives ``loss`` (:func:`~hmora_ds.losses.total_loss` of the global per-token LM
    loss and the method-weighted aux loss), ``lm_loss``, ``aux_loss``, ``aux_loss_<kind>``, ``lr``,
    ``target_tokens``, ``tokens``, ``applied`` and ``grad_norm`` (when DeepSpeed has one).
    """
    if not raws:
        return []
    kinds = sorted(raws[0].aux_kinds)
    values = torch.stack([_device_row(r, kinds) for r in raws]).tolist()  # the one sync
    return [_as_floats(r, v, kinds) for r, v in zip(raws, values, strict=True)]


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or on CPU the process's peak RSS, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def window_metrics(
    raws: list[StepMetrics], seconds: float, device: torch.device
) -> tuple[list[dict[str, float]], float]:
    """A logging window's steps as floats (one transfer), each with the window's throughput
    (``tokens_per_s`` over ``seconds``) and the peak memory so far; and the window's tokens."""
    metrics = materialize(raws)
    tokens = sum(m["tokens"] for m in metrics)
    tokens_per_s = tokens / max(seconds, 1e-9)
    peak = peak_memory_mb(device)
    for m in metrics:
        m["tokens_per_s"] = tokens_per_s
        m["peak_memory_mb"] = peak
    return metrics, tokens

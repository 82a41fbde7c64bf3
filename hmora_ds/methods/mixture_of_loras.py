"""Mixture-of-LoRAs: domain LoRAs from a library, trained jointly with a domain-supervised router.

Paper: Feng, Hao, Zhang, Han and Wang, "Mixture-of-LoRAs: An Efficient Multitask Tuning for
Large Language Models" (LREC-COLING 2024). No code is public; this is a reconstruction of what
the paper describes (domain-specific LoRAs trained separately, then combined by an explicit
router per layer that domain labels supervise), and docs/methods.md ("Mixture-of-LoRAs") says
what was chosen where the paper's details could not be followed. What this file decides:

- experts: the N LoRAs of a library (``options.library``, ``options.tasks``), one per domain,
  initialise the N experts of every site they adapt and keep training (unlike MoLE's);
- router: one per decoder layer, per token, ``p = softmax(W u + b)`` on the block's input after
  its input norm (``u`` normalised as MoLE's gate input), shared by the layer's adapted linears;
- gates: in training the soft mixture ``o = W₀x + s Σ_i p_i B_i A_i x`` (``options.train_gates``
  ``soft``; ``top1``: the router's argmax LoRA alone, gate 1); in evaluation and generation
  (the model in ``eval()`` mode) always the argmax LoRA alone, gate 1;
- loss: the router's cross-entropy against each record's domain, the index of its task among
  the library's (the batch input ``task_index`` (B,), −1 for a record of another task), over
  the real tokens of labelled records only, averaged per router over the global batch, then
  over the routers; weighted by ``options.route_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hmora_ds import losses
from hmora_ds.methods.base import register_method
from hmora_ds.methods.mole import GATE_KIND, LayerGate, LibraryMethod
from hmora_ds.routing.context import RouterId, RoutingRecord

#: The batch input with each record's domain: the index of its task among the library's tasks
#: (``options.tasks``), −1 for a task the library has no LoRA for. The records' column of that
#: name (``data.records.TASK_INDEX_FIELD``).
TASK_INDEX_INPUT = "task_index"
#: The record kind of a router's (cross-entropy sum, labelled token count).
ROUTE_KIND = "route"


@dataclass
class MixtureOfLoRAsOptions:
    """Mixture-of-LoRAs' settings (``options.<field>=…``).

    Attributes:
        library: the LoRA library's directory (required).
        tasks: the library's tasks, in expert order (empty: every entry); a record's domain is
            its task's index here.
        train_gates: the mixture in training: ``soft`` (every LoRA weighted by the router's
            probability) or ``top1`` (the router's argmax LoRA alone). Evaluation and
            generation always use the argmax LoRA.
        route_weight: λ of the router's cross-entropy on the domain labels (0 turns it off).
    """

    library: str | None = None
    tasks: list[str] = field(default_factory=list)
    train_gates: Literal["soft", "top1"] = "soft"
    route_weight: float = 1.0


def top1(probs: torch.Tensor) -> torch.Tensor:
    """The one-hot gates of the most probable expert (ties: the lowest index)."""
    return F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)


def route_nll(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``(Σ −log softmax(logits)[label], count)`` (2,) over the tokens of labelled rows.

    Args:
        logits: (B, T, N) router logits.
        labels: (B,) each row's domain, −1 = not one of the router's domains (ignored).
        mask: (B, T), 1 = real token (None: every position).
    """
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    b, t, _ = logp.shape
    labels = labels.to(logp.device).long().reshape(b, 1).expand(b, t)
    keep = labels >= 0
    if mask is not None:
        keep = keep & mask.bool()
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    nll = -(picked * keep.to(logp.dtype)).sum()
    return torch.stack([nll, keep.sum().to(logp.dtype)])


def route_loss(values: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    """The routing loss of R routers from their :func:`route_nll` rows ``values`` (R, 2): each
    router's mean cross-entropy over the labelled tokens of the global batch (one
    differentiable all-reduce over ``group``), averaged over the routers; 0 without a
    labelled token."""
    total = losses._all_reduce(values, group)
    count = total[:, 1].detach()
    per_router = total[:, 0] / count.clamp_min(1.0)
    return torch.where(count > 0, per_router, torch.zeros_like(per_router)).mean()


class DomainRouter(LayerGate):
    """A block router over the domain LoRAs: soft or top-1 in training, top-1 in eval mode;
    with the forward's ``task_index`` input it observes its cross-entropy (:func:`route_nll`)."""

    def __init__(self, rid: RouterId, in_features: int, num_experts: int, context: Any,
                 train_gates: str) -> None:  # fmt: skip
        super().__init__(rid, in_features, num_experts, context, block=True,
                         temperature_init=None, bias=True, row_norm=None)  # fmt: skip
        self.train_gates = train_gates
        self.route_id = RouterId(rid.layer, rid.targets, ROUTE_KIND)

    def observe(self, u: torch.Tensor, logits: torch.Tensor) -> None:
        ctx = self._ctx
        labels = ctx.batch_input(TASK_INDEX_INPUT, u)
        if labels is None or not (ctx.recording or torch.is_grad_enabled()):
            return
        # The forward's bound mask, read even outside recording: an activation recomputation
        # must repeat the forward's operations (observing is a no-op then).
        mask = ctx._token_mask
        if mask is not None and mask.shape != u.shape[:-1]:
            mask = None
        ctx.observe(self.route_id, route_nll(logits, labels, mask), None, self._slot)

    def select(self, probs: torch.Tensor) -> torch.Tensor:
        if self.training and self.train_gates == "soft":
            return probs
        return top1(probs)


@register_method
class MixtureOfLoRAs(LibraryMethod):
    name = "mixture_of_loras"
    preset = "mixture_of_loras"
    presets = {"mixture_of_loras": "Mixture-of-LoRAs"}  # noqa: RUF012
    order = 91
    options_class = MixtureOfLoRAsOptions
    library_experts = "trainable"
    optional_batch_inputs = (TASK_INDEX_INPUT,)
    components = ("lora A", "lora B", "token routers", "base model")

    def validate(self) -> None:
        super().validate()
        o = self.options
        self.require("options.route_weight", o.route_weight >= 0,
                     f"must be >= 0, got {o.route_weight}")  # fmt: skip

    def build_router(
        self, model: nn.Module, layer: int, targets: tuple[str, ...], in_features: int,
        num_experts: int,
    ) -> nn.Module:  # fmt: skip
        return DomainRouter(
            RouterId(layer, targets, GATE_KIND), self.hidden_size, num_experts,
            model.routing_context, self.options.train_gates,
        )  # fmt: skip

    def aux_losses(self, records: list[RoutingRecord], group: Any) -> dict[str, torch.Tensor]:
        """``route``: the routers' cross-entropy on the domain labels; none without the
        ``task_index`` input (evaluation, generation) or with ``route_weight=0``."""
        rows = [r.probs for r in records if r.kind == ROUTE_KIND]
        if not rows or self.options.route_weight <= 0:
            return {}
        return {ROUTE_KIND: route_loss(torch.stack(rows), group=group)}

    def aux_weight(self, kind: str) -> float:
        return self.options.route_weight

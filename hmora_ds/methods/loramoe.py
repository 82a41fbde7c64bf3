"""LoRAMoE: soft mixtures of LoRA experts on the FFN, with a localized balancing constraint.

Paper: Dou et al., "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via
MoE-Style Plugin" (ACL 2024). What this file decides, and where it comes from:

- sites: every FFN linear (gate, up, down) carries N LoRA experts and its own router
  (``routing.share_routers=false``), o = W₀x + (α/r) Σ_i G(x)_i B_i A_i x with
  G(x) = softmax(x W_g) (eqs. 3–4): dense soft routing, every expert weighted by its
  probability, a bias-free router as in the official code's ``lora_route``;
- experts: the first ``options.knowledge_experts`` experts of a site form the world-knowledge
  group, the rest the downstream-task group (the official code: the first and second half);
- the localized balancing constraint (eqs. 5–8): per site the importance Q (B, N), the sum of
  the gate values over each sample's real tokens; the coefficients I = 1 + δ where the expert's
  group matches the sample's ``knowledge`` flag and 1 − δ elsewhere; Z = I ∘ Q; L_lbc the
  squared coefficient of variation Var(Z) / (mean(Z)² + 1e-10) over all B·N entries (the
  official code; the paper's eq. 7 divides by the mean: ``options.lbc_form``), summed over the
  sites and weighted by β (``options.lbc_weight``); mean and variance are global over the
  data-parallel group (:func:`localized_balancing_loss`).

The per-sample flag reaches the routers as the optional batch input ``knowledge`` (B,), 1 for
a world-knowledge sample; the trainer builds it from the records (:mod:`hmora_ds.data.records`,
``knowledge_flags``). A forward without it (evaluation, generation) has no L_lbc, as in the
official code when ``task_types`` is not given. docs/methods.md ("LoRAMoE") lists every
difference from the paper and the official code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from hmora_ds.losses import _all_reduce
from hmora_ds.methods.base import Method, register_method
from hmora_ds.routing.context import RouterId, RoutingRecord
from hmora_ds.routing.gates import RouterGroup, RouterLinear

#: The batch input with each sequence's type: 1 = world knowledge, 0 = downstream task.
KNOWLEDGE_INPUT = "knowledge"  # the records' field of that name (data.records.KNOWLEDGE_FIELD)
#: The record kind of a site's weighted importance Z (B, N).
LBC_KIND = "lbc"
#: The official code's epsilon in the denominator of the squared coefficient of variation.
CV_EPS = 1e-10

#: Tasks of the offline mixture counted as world knowledge when a record has no ``knowledge``
#: field: the closed-book questions on facts whose prompt carries no passage (the paper's
#: world-knowledge data is closed-book QA). The others (completion, physical, social and
#: coreference reasoning, BoolQ's passage reading) are downstream tasks.
DEFAULT_KNOWLEDGE_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "commonsense_qa")


@dataclass
class LoRAMoEOptions:
    """LoRAMoE's settings (``options.<field>=…``).

    Attributes:
        knowledge_experts: experts 0 … knowledge_experts − 1 of each site form the
            world-knowledge group, the others the downstream-task group (paper: 3 of 6).
        delta: δ of the coefficient matrix, 1 ± δ (paper: 0.1).
        lbc_weight: β, the weight of L_lbc (paper: 0.1; 0 turns it off).
        lbc_form: ``cv_squared`` (the official code: Var(Z) / (mean(Z)² + 1e-10)) or
            ``var_over_mean`` (the paper's eq. 7: Var(Z) / mean(Z)).
        knowledge_tasks: the task names whose records count as world knowledge when a record
            has no ``knowledge`` field of its own (default: the offline mixture's closed-book
            fact questions); every other record without the field counts as a downstream task.
    """

    knowledge_experts: int = 3
    delta: float = 0.1
    lbc_weight: float = 0.1
    lbc_form: Literal["cv_squared", "var_over_mean"] = "cv_squared"
    knowledge_tasks: list[str] = field(default_factory=lambda: list(DEFAULT_KNOWLEDGE_TASKS))


def importance(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Q (B, N): each sample's gate values summed over its real tokens (eq. 5, transposed).

    Args:
        probs: (B, T, N) gate values.
        mask: (B, T), 1 = real token (None: every position counts, as in the official code).
    """
    p = probs.to(torch.promote_types(probs.dtype, torch.float32))
    m = torch.ones(p.shape[:-1], dtype=p.dtype, device=p.device) if mask is None else mask
    return torch.einsum("bte,bt->be", p, m.to(p.dtype))


def coefficients(
    knowledge: torch.Tensor, num_experts: int, knowledge_experts: int, delta: float
) -> torch.Tensor:
    """I (B, N) (eq. 6): 1 + δ where the expert's group is the sample's type, 1 − δ elsewhere.

    Args:
        knowledge: (B,) sample types, nonzero = world knowledge.
        num_experts: N.
        knowledge_experts: experts 0 … knowledge_experts − 1 are the world-knowledge group.
        delta: δ.
    """
    expert_knows = torch.arange(num_experts, device=knowledge.device) < knowledge_experts
    match = expert_knows.unsqueeze(0) == (knowledge.reshape(-1, 1) != 0)
    one = torch.ones((), dtype=torch.float32, device=knowledge.device)
    return torch.where(match, one + delta, one - delta)


def weighted_importance(
    probs: torch.Tensor, mask: torch.Tensor | None, knowledge: torch.Tensor,
    knowledge_experts: int, delta: float,
) -> torch.Tensor:  # fmt: skip
    """Z = I ∘ Q (B, N), fp32 at least."""
    q = importance(probs, mask)
    i = coefficients(knowledge.to(q.device), q.shape[-1], knowledge_experts, delta)
    return q * i.to(q.dtype)


def localized_balancing_loss(
    z: torch.Tensor, *, form: str = "cv_squared", group: Any = None
) -> torch.Tensor:
    """L_lbc of R sites at once (eq. 7): ``z`` (R, B, N) → (R,).

    Per site, over the B·N entries of Z of the global batch: mean μ and the unbiased variance
    σ² (``torch.var``'s, as the official code), then σ² / (μ² + 1e-10) (``cv_squared``) or
    σ² / μ (``var_over_mean``, 0 where μ = 0). 0 with at most one entry (the official code's
    ``cv_squared`` of a single value). Two differentiable all-reduces over ``group``: the sum
    and the count, then the centred sum of squares, so N ranks equal one process holding the
    concatenated batch and the variance has no cancellation.
    """
    if form not in ("cv_squared", "var_over_mean"):
        raise ValueError(f"lbc_form: must be cv_squared or var_over_mean, got {form!r}")
    r = z.shape[0]
    v = z.to(torch.promote_types(z.dtype, torch.float32)).reshape(r, -1)
    count = torch.full((1,), float(v.shape[1]), dtype=v.dtype, device=v.device)
    sums = _all_reduce(torch.cat([v.sum(-1), count]), group)
    n = sums[-1].detach()
    mean = sums[:r] / n.clamp_min(1.0)
    centred = _all_reduce((v - mean.unsqueeze(-1)).pow(2).sum(-1), group)
    var = centred / (n - 1.0).clamp_min(1.0)
    if form == "cv_squared":
        loss = var / (mean.pow(2) + CV_EPS)
    else:
        loss = torch.where(mean > 0, var / mean.clamp_min(torch.finfo(v.dtype).tiny),
                           torch.zeros_like(var))  # fmt: skip
    return torch.where(n > 1, loss, torch.zeros_like(loss))


class LoRAMoERouter(RouterGroup):
    """A soft token router without a bias (``softmax(x W_g)``) that, when the forward carries
    the ``knowledge`` input, observes its site's weighted importance Z (B, N) as ``lbc``.

    Z is computed whenever gradients are on too, not only while recording, so activation
    recomputation repeats the forward's operations (observing is a no-op then)."""

    def __init__(
        self, layer: int, targets: tuple[str, ...], in_features: int, num_experts: int,
        knowledge_experts: int, delta: float, dropout: float, context: Any,
    ) -> None:  # fmt: skip
        super().__init__(
            layer, targets, in_features, in_features, "token", 0.0, num_experts, "soft", 1,
            "sum", dropout, False, context,
        )  # fmt: skip
        self.token_router.linear = RouterLinear(in_features, num_experts, bias=False)
        self.knowledge_experts, self.delta = knowledge_experts, delta
        self.lbc_id = RouterId(layer, self.targets, LBC_KIND)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = super().forward(x)  # soft token routing: the router's softmax (B, T, N)
        ctx = self._ctx
        knowledge = ctx.batch_input(KNOWLEDGE_INPUT, x)
        if knowledge is not None and (ctx.recording or torch.is_grad_enabled()):
            # Padding out of Q. The forward's bound mask, read even outside recording: an
            # activation recomputation must save the same mask for the backward of Q.
            mask = ctx._token_mask
            if mask is not None and mask.shape != x.shape[:-1]:
                mask = None
            z = weighted_importance(gates, mask, knowledge, self.knowledge_experts, self.delta)
            ctx.observe(self.lbc_id, z, None, self._slot)
        return gates


@register_method
class LoRAMoE(Method):
    name = "loramoe"
    preset = "loramoe"
    presets = {"loramoe": "LoRAMoE"}  # noqa: RUF012
    order = 70
    options_class = LoRAMoEOptions
    optional_batch_inputs = (KNOWLEDGE_INPUT,)

    def validate(self) -> None:
        c, o = self.config, self.options
        self.require("routing.mode", c.routing.mode == "soft",
                     "must be soft (LoRAMoE weights every expert by its probability)")  # fmt: skip
        self.require("routing.task_encoder", c.routing.task_encoder == "none",
                     "must be none: LoRAMoE routes tokens only")  # fmt: skip
        self.require("adapter.hydra", not c.adapter.hydra, "must be false")
        self.require("loss.aux", c.loss.aux == "none",
                     "must be none: LoRAMoE balances with the localized constraint, weighted "
                     "by options.lbc_weight")  # fmt: skip
        e, k = c.adapter.num_experts, o.knowledge_experts
        self.require("options.knowledge_experts", not c.has_mixture or 1 <= k <= e - 1,
                     f"must lie in [1, adapter.num_experts - 1 = {e - 1}] (both groups need an "
                     f"expert), got {k}")  # fmt: skip
        self.require("options.delta", 0.0 <= o.delta <= 1.0, f"must lie in [0, 1], got {o.delta}")
        self.require("options.lbc_weight", o.lbc_weight >= 0,
                     f"must be >= 0, got {o.lbc_weight}")  # fmt: skip
        self.require("options.lbc_form", o.lbc_form in ("cv_squared", "var_over_mean"),
                     f"must be cv_squared or var_over_mean, got {o.lbc_form!r}")  # fmt: skip

    def build_router(
        self, model: nn.Module, layer: int, targets: tuple[str, ...], in_features: int,
        num_experts: int,
    ) -> nn.Module:  # fmt: skip
        o = self.options
        return LoRAMoERouter(
            layer, targets, in_features, num_experts, o.knowledge_experts, o.delta,
            self.config.routing.router_dropout, model.routing_context,
        )  # fmt: skip

    def aux_losses(self, records: list[RoutingRecord], group: Any) -> dict[str, torch.Tensor]:
        """``lbc``: Σ over the sites of L_lbc (the official code adds every linear's term);
        none without the ``knowledge`` input or with ``options.lbc_weight=0``."""
        out = super().aux_losses([r for r in records if r.kind != LBC_KIND], group)
        lbc = [r for r in records if r.kind == LBC_KIND]
        if lbc and self.options.lbc_weight > 0:
            by_shape: dict[tuple, list[torch.Tensor]] = {}
            for r in lbc:
                by_shape.setdefault(tuple(r.probs.shape), []).append(r.probs)
            total = None
            for zs in by_shape.values():
                values = localized_balancing_loss(
                    torch.stack(zs), form=self.options.lbc_form, group=group
                ).sum()
                total = values if total is None else total + values
            out[LBC_KIND] = total
        return out

    def aux_weight(self, kind: str) -> float:
        return self.options.lbc_weight if kind == LBC_KIND else self.config.loss.aux_weight

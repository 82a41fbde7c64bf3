"""AdaMoLE: LoRA experts activated by a learned, per-token threshold.

Paper: Liu & Luo, "AdaMoLE: Fine-Tuning Large Language Models with Adaptive Mixture of
Low-Rank Adaptation Experts" (COLM 2024, arXiv 2405.00361); official code ``zefang-liu/AdaMoLE``
(``src/adamole/layer.py``). Shapes: ``B`` batch, ``T`` tokens, ``D`` input width, ``E`` experts.

Every adapted linear has its own gate and threshold network, both reading the layer's input
``x`` (no dropout; the experts' dropout is on their input only):

    p = softmax(W_g x)                  (B, T, E)   gate, no bias
    τ = τ_max · σ(w_τ · x + b_τ)        (B, T, 1)   threshold network, τ_max = 1/E by default
    a_i = p_i − τ,  S = {i : a_i ≥ 0}   active experts: a variable number per token
    g_i = a_i · [i ∈ S] / Σ_{j∈S} a_j   the gates; a row whose sum is 0 gets all-zero gates

Because ``max_i p_i ≥ 1/E > τ`` whenever ``τ_max ≤ 1/E``, every token has at least one active
expert; a row with none (possible only with ``options.max_threshold > 1/E``, or when every
active ``a_i`` is exactly 0) gets all-zero gates — the adapter adds nothing to that token — as
the official code does (it divides by 1 where the sum is 0). The gates go to the sparse
dispatcher, which computes each token's active experts only.

Auxiliary loss (official ``AdaMoeLayer.get_layer_loss``, summed over every adapted linear and
weighted by ``aux_loss_coeff`` = 1e-3): ``E · Σ_i f_i · P_i`` with ``f_i`` the fraction of
tokens for which expert i is active (no gradient) and ``P_i`` the mean of ``a_i = p_i − τ``
over the tokens (the *adapted* gate value, negative where inactive), here over the global
batch's real tokens (:func:`adamole_balance_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from hmora_ds import losses
from hmora_ds.experts.dispatch import DispatchPlan
from hmora_ds.methods.base import Method, register_method
from hmora_ds.metrics import ACTIVE_KIND
from hmora_ds.routing.context import RouterId, RoutingRecord

#: The observation kind holding each token's threshold τ (B, T) for the auxiliary loss.
THRESHOLD_KIND = "threshold"


def adaptive_gates(probs: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """AdaMoLE's gates: ``(p − τ)·[p ≥ τ]`` renormalised to sum 1 over the active experts.

    Args:
        probs: (…, E) gate probabilities ``p``.
        threshold: (…, 1) per-token threshold ``τ``.

    Returns:
        (…, E) gates. An expert with ``p = τ`` exactly is active with weight 0. A row with no
        active expert (or whose active weights sum to 0) gets all-zero gates, as the official
        code (a zero sum is replaced by 1 before dividing): that token's adapter update is 0.
        Differentiable in both inputs (through ``p − τ`` and the sum).
    """
    adapted = probs - threshold
    kept = torch.where(adapted >= 0, adapted, torch.zeros_like(adapted))
    total = kept.sum(-1, keepdim=True)
    return kept / torch.where(total == 0, torch.ones_like(total), total)


def adamole_balance_loss(
    adapted: torch.Tensor, mask: torch.Tensor | None = None, *, group: Any = None
) -> torch.Tensor:
    """The official AdaMoLE load-balancing loss of R routers, ``E · Σ_i f_i · P_i`` → (R,).

    Args:
        adapted: (R, N…, E) the adapted gate values ``a = p − τ``; expert i is active where
            ``a_i ≥ 0``.
        mask: (N…) 1 = real token (None: all).
        group: data-parallel group: the sums and the count are all-reduced (differentiably),
            so N ranks give the loss and gradient of one process holding the whole batch.

    ``f_i`` = active tokens of expert i / tokens (not differentiable, as the official
    ``torch.ge(…).to(float)``), ``P_i`` = mean ``a_i`` over the tokens (differentiable in the
    gate and the threshold network). 0 without a valid token.
    """
    r, e = adapted.shape[0], adapted.shape[-1]
    a, m = losses._flatten(adapted, mask)  # (R, N, E), (N,)
    active = (a >= 0).to(a.dtype)
    sums = torch.cat(
        [
            torch.einsum("rne,n->re", active, m).reshape(-1),
            torch.einsum("rne,n->re", a, m).reshape(-1),
            m.sum().reshape(1),
        ]
    )
    sums = losses._all_reduce(sums, group)
    count = sums[-1].detach().clamp_min(1.0)
    frac = sums[: r * e].detach().view(r, e) / count
    mean_a = sums[r * e : 2 * r * e].view(r, e) / count
    return e * (frac * mean_a).sum(-1)


@dataclass
class AdaMoLEOptions:
    """``max_threshold``: τ_max of ``τ = τ_max · σ(w·x + b)``; None (default) = 1/E, as the
    official code (``AdaMoleConfig.max_threshold``)."""

    max_threshold: float | None = None


class AdaMoLERouter(nn.Module):
    """The gate and threshold network of one adapted linear (see the module docstring).

    Records ``p`` as the site's ``token`` router (the routing statistics and the auxiliary
    loss), observes ``τ`` (``threshold``, for the loss) and records the active experts
    ``[p ≥ τ]`` as the ``active`` kind (the mean active experts per token in the statistics).
    """

    top_k = None  # a variable number of experts per token
    sparse_gates = True
    mode = "threshold"

    def __init__(
        self, layer: int, targets: tuple[str, ...], in_features: int, num_experts: int,
        max_threshold: float, context: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        self.layer, self.targets, self.num_experts = layer, tuple(targets), num_experts
        self.max_threshold = max_threshold
        self.gate = nn.Linear(in_features, num_experts, bias=False)
        self.threshold = nn.Linear(in_features, 1)
        self.token_id = RouterId(layer, self.targets, "token")
        self.threshold_id = RouterId(layer, self.targets, THRESHOLD_KIND)
        self.active_id = RouterId(layer, self.targets, ACTIVE_KIND)
        self._ctx = context
        self._slot = context.slot()  # this router's records (see routing.context)
        self.shared = False

    def new_round(self, *_: object) -> None:
        """Nothing is cached between calls (one router per adapted linear)."""

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def dispatch(self, gates: torch.Tensor, num_tokens_per_row: int) -> DispatchPlan:
        """The routed pairs are the non-zero gates, however many per token."""
        return DispatchPlan.build(gates, None, num_tokens_per_row)

    def probs_and_threshold(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``p`` (B, T, E) and ``τ`` (B, T, 1), at least fp32, for input ``x`` (B, T, D)."""
        h = x.to(self.gate.weight.dtype)
        logits = self.gate(h)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        p = torch.softmax(logits, dim=-1, dtype=dtype)
        tau = self.max_threshold * torch.sigmoid(self.threshold(h).to(dtype))
        return p, tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._ctx
        p, tau = self.probs_and_threshold(x)
        if ctx.recording:
            mask = ctx.token_mask_for(x)
            ctx.record(self.token_id, p, mask, self._slot)
            ctx.observe(self.threshold_id, tau.squeeze(-1), mask, self._slot)
            ctx.record(self.active_id, (p >= tau).to(p.dtype), mask, self._slot)
        return adaptive_gates(p, tau)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, max_threshold={self.max_threshold:g}"


@register_method
class AdaMoLE(Method):
    name = "adamole"
    preset = "adamole"
    presets = {"adamole": "AdaMoLE"}  # noqa: RUF012
    order = 75
    options_class = AdaMoLEOptions
    components: ClassVar[tuple[str, ...]] = (
        "lora A", "lora B", "token routers", "threshold networks", "base model",
    )  # fmt: skip

    def validate(self) -> None:
        c, o = self.config, self.options
        e = c.adapter.num_experts
        self.require("adapter.compute", c.adapter.compute == "sparse",
                     "must be sparse: each token uses a variable number of experts, which the "
                     "sparse dispatcher computes (dense would run every expert)")  # fmt: skip
        self.require("routing.mode", c.routing.mode == "topk",
                     "must be topk: AdaMoLE's gates are sparse (a learned threshold, not a "
                     "soft mixture)")  # fmt: skip
        self.require("routing.top_k", c.routing.top_k == e,
                     f"must equal adapter.num_experts ({e}): the threshold activates up to E "
                     "experts per token")  # fmt: skip
        self.require("routing.task_encoder", c.routing.task_encoder == "none",
                     "must be none: AdaMoLE routes tokens only")  # fmt: skip
        self.require(
            "routing.share_routers",
            not c.routing.share_routers,
            "must be false: every adapted linear has its own gate and threshold",
        )
        self.require(
            "routing.router_dropout",
            c.routing.router_dropout == 0.0,
            "must be 0: the gate and threshold read the layer input without dropout",
        )
        self.require("adapter.hydra", not c.adapter.hydra, "must be false")
        self.require("loss.aux", c.loss.aux in ("blc", "none"),
                     "must be blc (AdaMoLE's load-balancing loss) or none")  # fmt: skip
        self.require("options.max_threshold",
                     o.max_threshold is None or 0.0 < o.max_threshold <= 1.0,
                     f"must lie in (0, 1] or be null (1/E), got {o.max_threshold}")  # fmt: skip

    def build_router(
        self, model: nn.Module, layer: int, targets: tuple[str, ...], in_features: int,
        num_experts: int,
    ) -> nn.Module:  # fmt: skip
        tau_max = self.options.max_threshold
        tau_max = 1.0 / num_experts if tau_max is None else tau_max
        return AdaMoLERouter(layer, targets, in_features, num_experts, tau_max,
                             model.routing_context)  # fmt: skip

    def aux_losses(self, records: list[RoutingRecord], group: Any) -> dict[str, torch.Tensor]:
        """``token``: :func:`adamole_balance_loss` of every router, summed over routers (the
        official ``get_aux_loss`` sums the layer losses), from each router's ``p`` and its
        observed ``τ``; routers of one shape and mask share one all-reduce."""
        if self.config.loss.aux == "none":
            return {}
        taus = {r.id.group: r.probs for r in records if r.kind == THRESHOLD_KIND}
        stacks: dict[tuple, list[torch.Tensor]] = {}
        masks: dict[tuple, torch.Tensor | None] = {}
        for rec in records:
            if rec.kind != "token":
                continue
            key = (tuple(rec.probs.shape), None if rec.mask is None else id(rec.mask))
            stacks.setdefault(key, []).append(rec.probs - taus[rec.id.group].unsqueeze(-1))
            masks[key] = rec.mask
        terms = [adamole_balance_loss(torch.stack(a), masks[k], group=group).sum()
                 for k, a in stacks.items()]  # fmt: skip
        return {"token": torch.stack(terms).sum()} if terms else {}

    @property
    def stats_top_k(self) -> int | None:
        """None: the load is the mean gate probability (the active experts are counted by
        the ``active`` records)."""
        return None

    def component_of(self, name: str) -> str:
        if name.startswith("routers."):
            return "threshold networks" if ".threshold." in name else "token routers"
        return super().component_of(name)

"""Routers and hierarchical hybrid routing (spec §2, §4).

Shapes: ``B`` batch, ``T`` tokens, ``D`` router input width, ``E`` experts.

A :class:`RouterGroup` serves one or more adapted linears of one decoder layer that read the
same input (q/k/v, gate/up when routers are shared). It owns that layer's token router, task
router and α, and computes the gates **once per call of the members' parent module** (the
attention or MLP block): a forward pre-hook on the parent opens a new round, the first member to
ask computes, the others get the same tensor, whichever member comes first. (Keying on the input
tensor's identity is not enough: ZeRO-3 hands every module call a fresh wrapper tensor.)
Activation-checkpoint recomputation re-runs the parent, so it opens a new round too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from hmora_ds.experts.dispatch import DispatchPlan
from hmora_ds.experts.dropout import InputDropout
from hmora_ds.routing.context import RouterId

if TYPE_CHECKING:
    from hmora_ds.routing.context import RoutingContext


def layer_alphas(num_layers: int, eps: float, mu: float) -> list[float]:
    """α(l) = σ(−ε + 2ε·l/(L−1) + μ) for l = 0 … L−1 (spec §4, paper eq. 8 / table 5).

    The denominator ``L−1`` makes α span exactly ``[σ(−ε+μ), σ(ε+μ)]``.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    denom = max(num_layers - 1, 1)
    return [_sigmoid(-eps + 2.0 * eps * layer / denom + mu) for layer in range(num_layers)]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def layer_modes(
    num_layers: int, eps: float, mu: float, beta_low: float, beta_high: float
) -> list[str]:
    """Per layer: ``token`` (α < β_low), ``task`` (α > β_high) or ``hybrid``."""
    modes = []
    for alpha in layer_alphas(num_layers, eps, mu):
        if alpha < beta_low:
            modes.append("token")
        elif alpha > beta_high:
            modes.append("task")
        else:
            modes.append("hybrid")
    return modes


def topk_gates(probs: torch.Tensor, k: int, renorm: str = "paper") -> torch.Tensor:
    """Keep the ``k`` largest entries of ``probs`` (…, E) and renormalise (eqs. 15–16).

    ``paper``: softmax over the kept probabilities with −inf elsewhere (eq. 15 literally).
    ``sum``: ``p_i / Σ_kept p``. Unselected experts get exactly 0 (and so zero gradient).
    """
    top_vals, top_idx = probs.topk(k, dim=-1)
    if renorm == "paper":
        kept = torch.softmax(top_vals, dim=-1)
    elif renorm == "sum":
        kept = top_vals / top_vals.sum(dim=-1, keepdim=True).clamp_min(
            torch.finfo(probs.dtype).tiny
        )
    else:
        raise ValueError(f"routing.topk_renorm: must be 'paper' or 'sum', got {renorm!r}")
    return torch.zeros_like(probs).scatter(-1, top_idx, kept)


class RouterLinear(nn.Linear):
    """A router's linear ``h``. Given the router's input dropout it computes ``h(dropout(x))``
    itself: dropout and the product as one autograd node (:meth:`InputDropout.project`) where
    it can, else through the dropout's recomputable scope. Either way it is called as a module,
    so hooks on it run (ZeRO-3 gathers its parameters in one)."""

    def forward(self, x: torch.Tensor, dropout: InputDropout | None = None) -> torch.Tensor:
        if dropout is None:
            return super().forward(x)
        if dropout.projects() and (
            x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type)
        ):
            return dropout.project(x, self.weight, self.bias)
        h, scope = dropout.recomputable(x)
        with scope:
            return super().forward(h.to(self.weight.dtype))


class Router(nn.Module):
    """``h(x) = Linear(dropout(x))`` → logits ∈ R^E (appendix A); returns ``softmax(h(x))`` in
    fp32 (fp64 for an fp64 model)."""

    def __init__(self, in_features: int, num_experts: int, dropout: float) -> None:
        super().__init__()
        # Its dropped input is kept for the backward as a boolean mask over the layer input,
        # which the layer keeps anyway (as the experts' dropout does), not as an fp32 copy.
        self.dropout = InputDropout(dropout)
        self.linear = RouterLinear(in_features, num_experts, bias=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """h(x) in the router's own dtype (fp32 routers on a bf16 base model read its bf16
        hidden states)."""
        linear = self.linear
        if isinstance(linear, RouterLinear):
            return linear(x, self.dropout)
        h, scope = self.dropout.recomputable(x)  # a plain nn.Linear put in its place
        with scope:
            return linear(h.to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        # At least fp32 (bf16 logits are rounded too coarsely for the auxiliary statistics);
        # fp64 stays fp64.
        return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


class RouterGroup(nn.Module):
    """Gates of one decoder layer for the adapted linears that share one input.

    Args:
        layer: decoder layer index.
        targets: the adapted linears it serves, e.g. ``("q", "k", "v")``.
        in_features: width of the dense layers' input (token router input).
        task_features: width of the task representation (task router input).
        layer_mode: ``token`` | ``task`` | ``hybrid`` for this layer.
        alpha: α(l) of this layer (used by ``hybrid`` only).
        num_experts, mode, top_k, topk_renorm, dropout, learn_alpha: see RoutingConfig.
        context: the routing context owned by the wrapper model.
    """

    def __init__(
        self,
        layer: int,
        targets: tuple[str, ...],
        in_features: int,
        task_features: int,
        layer_mode: str,
        alpha: float,
        num_experts: int,
        mode: str,
        top_k: int,
        topk_renorm: str,
        dropout: float,
        learn_alpha: bool,
        context: RoutingContext,
    ) -> None:
        super().__init__()
        assert layer_mode in ("token", "task", "hybrid"), layer_mode
        self.layer, self.targets = layer, tuple(targets)
        self.token_id = RouterId(layer, self.targets, "token")
        self.task_id = RouterId(layer, self.targets, "task")
        self.layer_mode = layer_mode
        self.mode = mode
        self.top_k = top_k
        self.topk_renorm = topk_renorm
        self.num_experts = num_experts
        self.token_router = (
            Router(in_features, num_experts, dropout) if layer_mode != "task" else None
        )
        self.task_router = (
            Router(task_features, num_experts, dropout) if layer_mode != "token" else None
        )
        # α(l) as a logit. σ saturates to exactly 0 or 1 in floating point far from 0, where the
        # logit is infinite: such an α is kept at 1e-7 from its bound (not reset to 0.5).
        a = min(max(alpha, 1e-7), 1.0 - 1e-7)
        logit = math.log(a) - math.log1p(-a)
        if layer_mode == "hybrid" and learn_alpha:
            # α = σ(a), a initialised so that α starts at α(l); no weight decay (see optim).
            # Shape (1,), not 0-D: DeepSpeed's start-up broadcast views every parameter as
            # bytes, which a 0-D tensor cannot do (load_adapter still reads a 0-D one).
            self.alpha_logit = nn.Parameter(torch.tensor([logit]))
        else:
            self.register_buffer("alpha_logit", torch.tensor(logit), persistent=False)
        # The context is shared by every group of the model; a plain attribute, not a module.
        self._ctx = context
        self._slot = context.slot()  # this router's records (see routing.context)
        self._memo: tuple[int | None, torch.Size, torch.Tensor] | None = None
        self._plan: tuple[torch.Tensor, DispatchPlan] | None = None
        self.shared = False  # set by the injector, which also registers new_round

    @property
    def name(self) -> str:
        """``layer03.q_k_v``: the group's part of its routers' ids."""
        return self.token_id.group

    @property
    def sparse_gates(self) -> bool:
        """Whether gates have structural zeros (top-k), so a sparse dispatch can skip them."""
        return self.mode == "topk"

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit)

    def new_round(self, *_: object) -> None:
        """Forget the last gates (a forward pre-hook of the members' parent module)."""
        self._memo = None
        self._plan = None

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Gates for input ``x`` (B, T, D) → (B, T, E) or (B, 1, E) for task-only layers.

        Computed once per round (see the module docstring); later members reuse it.
        """
        if not self.shared:
            return self(x)
        memo = self._memo
        # Compiled, the parent's pre-hook (new_round) runs inside the same graph, so the memo
        # is always this call's; reading the forward counter there would recompile per step.
        if (
            memo is not None
            and memo[1] == x.shape
            and (torch.compiler.is_compiling() or memo[0] == self._ctx.forward_id)
        ):
            return memo[2]
        gates = self(x)
        forward_id = None if torch.compiler.is_compiling() else self._ctx.forward_id
        self._memo = (forward_id, x.shape, gates)
        return gates

    def dispatch(self, gates: torch.Tensor, num_tokens_per_row: int) -> DispatchPlan:
        """The sparse path's token buckets for top-k ``gates``; shared members reuse one plan."""
        if not self.shared:
            return DispatchPlan.build(gates, self.top_k, num_tokens_per_row)
        memo = self._plan
        if memo is not None and memo[0] is gates:
            return memo[1]
        plan = DispatchPlan.build(gates, self.top_k, num_tokens_per_row)
        self._plan = (gates, plan)
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._ctx
        p_token = p_task = None
        if self.token_router is not None:
            p_token = self.token_router(x)  # (B, T, E), fp32
            ctx.record(self.token_id, p_token, ctx.token_mask_for(x), self._slot)
        if self.task_router is not None:
            task_repr = ctx.task_repr_for(x)  # (B, D_task)
            p_task = self.task_router(task_repr)  # (B, E)
            ctx.record(self.task_id, p_task, None, self._slot)
            p_task = p_task.unsqueeze(-2)  # (B, 1, E): one decision per sequence
        if p_token is None:
            g = p_task
        elif p_task is None:
            g = p_token
        else:
            a = self.alpha
            g = a * p_task + (1.0 - a) * p_token
        if self.mode == "topk":
            g = topk_gates(g, self.top_k, self.topk_renorm)
        return g

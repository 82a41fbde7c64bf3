"""Auxiliary routing losses as pure functions of router probabilities (spec §5).

Shapes: ``N…`` routing decisions (tokens (B, T) for a token router, sequences (B,) for a task
router), ``E`` experts. ``probs`` has shape (N…, E) with rows summing to 1 (the router's own
softmax, before hybrid mixing and top-k); ``mask`` has shape (N…), 1 = valid decision.

Global batch: with ``group`` set, the masked sums and counts are all-reduced over that process
group with a *differentiable* all-reduce, so each rank's value and gradient equal those of one
process holding the concatenated batch. Everything is computed in fp32 (fp64 for fp64
probabilities). ``H`` is the natural-log entropy with 0·log 0 = 0; ``Ĥ = H / log E``.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ p log p over the last dim, with 0·log 0 = 0 (natural log).

    ``xlogy(p, p)`` has the right value but a NaN gradient at p = 0 (its backward divides
    p by p), and a saturated router softmax does reach an exact 0 (measured on SmolLM2's
    ``down_proj`` routers, logits ~100 apart): one such entry made every gradient NaN.
    Clamping only inside the log keeps the value (0 · log tiny = 0) and gives the finite
    gradient −(log p + 1) for p > 0 and −log(tiny) at p = 0.
    """
    tiny = torch.finfo(probs.dtype).tiny
    return -(probs * torch.log(probs.clamp_min(tiny))).sum(dim=-1)


def _flatten(probs: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked ``probs`` (R, N…, E) and their shared mask (N…) → fp32 (R, N, E) and (N,)."""
    r, e = probs.shape[0], probs.shape[-1]
    if mask is not None and mask.shape != probs.shape[1:-1]:
        raise ValueError(
            f"mask: shape {tuple(mask.shape)} must equal probs.shape[:-1] "
            f"{tuple(probs.shape[1:-1])}"
        )
    p = probs.to(torch.promote_types(probs.dtype, torch.float32)).reshape(r, -1, e)
    if mask is None:
        return p, torch.ones(p.shape[1], device=p.device, dtype=p.dtype)
    return p, mask.reshape(-1).to(p.dtype)


def _all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    if group is None:
        return t
    # The functional all-reduce is differentiable (its backward all-reduces the gradient);
    # an in-place dist.all_reduce on a tensor that needs grad gives wrong gradients.
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_reduce(t, "sum", group)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor | None = None, *, group: Any = None
) -> torch.Tensor:
    """Mean of ``values`` (N…) over the valid entries (``mask`` (N…), 1 = valid) of the
    (global) batch, differentiable; 0 without a valid entry. fp32 at least."""
    v = values.to(torch.promote_types(values.dtype, torch.float32)).reshape(-1)
    m = torch.ones_like(v) if mask is None else mask.reshape(-1).to(v.dtype)
    if mask is not None and mask.shape != values.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} must equal {tuple(values.shape)}")
    sums = _all_reduce(torch.stack([v @ m, m.sum()]), group)
    return sums[0] / sums[1].detach().clamp_min(1.0)


def routing_moments(
    probs: torch.Tensor, mask: torch.Tensor | None = None, *, group: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M = mean p, mean H(p) and the decision count over the (global) batch.

    Returns:
        ``(M (E,), mean_entropy (), count ())``, differentiable in ``probs``; with no valid
        decision M is 0 and the mean entropy 0.
    """
    mean_p, mean_h, count = stacked_routing_moments(probs.unsqueeze(0), mask, group=group)
    return mean_p[0], mean_h[0], count


def stacked_routing_moments(
    probs: torch.Tensor, mask: torch.Tensor | None = None, *, group: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`routing_moments` of R routers at once: ``probs`` (R, N…, E), one shared mask.

    One fused computation and ONE all-reduce for all R routers (a model has one token and one
    task stack per forward: a few kernels instead of a few per router, which is what keeps the
    step from being bound by kernel launches).

    Returns:
        ``(M (R, E), mean_entropy (R,), count ())``.
    """
    r, e = probs.shape[0], probs.shape[-1]
    p, m = _flatten(probs, mask)
    sums = torch.cat(
        [torch.einsum("rne,n->re", p, m).reshape(-1), entropy(p) @ m, m.sum().reshape(1)]
    )
    sums = _all_reduce(sums, group)
    count = sums[-1].detach()
    denom = count.clamp_min(1.0)
    return sums[: r * e].view(r, e) / denom, sums[r * e : r * e + r] / denom, count


def _log_experts(e: int) -> float:
    if e < 2:
        raise ValueError(f"probs: routing needs at least 2 experts, got {e}")
    return math.log(e)


def cgjs_divergence(
    probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma_b: float = 1.0,
    gamma_c: float = 0.4,
    group: Any = None,
) -> torch.Tensor:
    """CGJS(G) = min(H(M), γ_b log E) − max(mean_i H(p^(i)), γ_c log E) (eq. 11), in nats."""
    log_e = _log_experts(probs.shape[-1])
    mean_p, mean_h, _ = routing_moments(probs, mask, group=group)
    return torch.clamp(entropy(mean_p), max=gamma_b * log_e) - torch.clamp(
        mean_h, min=gamma_c * log_e
    )


def cgjs_loss(
    probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma_b: float = 1.0,
    gamma_c: float = 0.4,
    group: Any = None,
) -> torch.Tensor:
    """L_aux = max((γ_b − γ_c) log E − CGJS(G), 0) / log E for one router (eq. 12).

    Equivalently ``(γ_b − min(Ĥ(M), γ_b)) + (max(mean Ĥ(p), γ_c) − γ_c)``: zero exactly when
    routing is balanced to γ_b and certain to γ_c. Returns an fp32 scalar.
    """
    return stacked_cgjs_loss(
        probs.unsqueeze(0), mask, gamma_b=gamma_b, gamma_c=gamma_c, group=group
    )[0]


def stacked_cgjs_loss(
    probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma_b: float = 1.0,
    gamma_c: float = 0.4,
    group: Any = None,
) -> torch.Tensor:
    """:func:`cgjs_loss` of R routers sharing one mask, ``probs`` (R, N…, E) → (R,)."""
    if not 0.0 <= gamma_c <= gamma_b <= 1.0:
        raise ValueError(f"cgjs_loss: need 0 <= gamma_c <= gamma_b <= 1, got {gamma_c}, {gamma_b}")
    log_e = _log_experts(probs.shape[-1])
    mean_p, mean_h, count = stacked_routing_moments(probs, mask, group=group)
    balance = entropy(mean_p) / log_e
    certainty = mean_h / log_e
    loss = (gamma_b - torch.clamp(balance, max=gamma_b)) + (
        torch.clamp(certainty, min=gamma_c) - gamma_c
    )
    return torch.where(count > 0, loss, torch.zeros_like(loss))


def load_balance_loss(
    probs: torch.Tensor, k: int, mask: torch.Tensor | None = None, *, group: Any = None
) -> torch.Tensor:
    """L_blc = E · Σ_i F_i · P_i (eqs. 17–19) for one router.

    ``F_i`` is the fraction of valid decisions whose top-k contains expert i, divided by k
    (not differentiable); ``P_i`` the mean probability of expert i. Returns an fp32 scalar.
    """
    return stacked_load_balance_loss(probs.unsqueeze(0), k, mask, group=group)[0]


def stacked_load_balance_loss(
    probs: torch.Tensor, k: int, mask: torch.Tensor | None = None, *, group: Any = None
) -> torch.Tensor:
    """:func:`load_balance_loss` of R routers sharing one mask, ``probs`` (R, N…, E) → (R,)."""
    r, e = probs.shape[0], probs.shape[-1]
    if not 1 <= k <= e:
        raise ValueError(f"load_balance_loss: k must lie in [1, {e}], got {k}")
    p, m = _flatten(probs, mask)
    chosen = torch.zeros_like(p).scatter(-1, p.topk(k, dim=-1).indices, 1.0)
    sums = torch.cat(
        [
            torch.einsum("rne,n->re", chosen, m).reshape(-1),
            torch.einsum("rne,n->re", p, m).reshape(-1),
            m.sum().reshape(1),
        ]
    )
    sums = _all_reduce(sums, group)
    count = sums[-1].detach().clamp_min(1.0)
    frac = sums[: r * e].detach().view(r, e) / (k * count)
    mean_p = sums[r * e : 2 * r * e].view(r, e) / count
    return e * (frac * mean_p).sum(-1)


def total_loss(lm_loss: Any, aux_loss: Any, aux_weight: float = 1.0) -> Any:
    """L = L_LM + λ · L_aux: the training objective, formed here and nowhere else (spec §5).

    Used by the model's forward (mean LM loss), by the trainer's step (the LM *sum* scaled to
    the global per-token mean, so the gradient equals one process holding the whole batch) and
    for the logged ``loss`` (floats read back from the device): all three must agree, so any
    change to the objective is made once. Works on tensors (differentiable) and on floats.

    Args:
        lm_loss: the language-modelling term (scalar tensor or float).
        aux_loss: the auxiliary term: the model's ``aux_weighted`` = Σ_k λ_k · L_aux,k (each
            method weighting its own kinds; then ``aux_weight`` stays 1), or an unweighted
            Σ of routing losses with its λ in ``aux_weight``.
        aux_weight: λ multiplying ``aux_loss``.
    """
    return lm_loss + aux_weight * aux_loss

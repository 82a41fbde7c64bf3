"""MoELoRA: top-k LoRA experts with a contrastive loss that makes the experts' outputs distinct.

Paper: Luo et al., "MoELoRA: Contrastive Learning Guided Mixture of Experts on
Parameter-Efficient Fine-Tuning for Large Language Models" (2024, arXiv 2402.12851). No official
code is public; what this file decides, and where it comes from:

- sites: a routed bank of E LoRA experts on each of ``adapter.targets`` (paper: LLaMA's q and
  v projections, E = 8), a linear token router per site, Softmax(TopK(W x)) with k = 2: the
  kept probabilities renormalised to sum 1 (``routing.topk_renorm=sum``);
- losses: L = L_LM + λ_b·L_balance + λ_c·L_cl; L_balance the Switch-style ``E·Σ F_i P_i``
  (``loss.aux=blc``, λ_b = ``loss.aux_weight``) and L_cl the contrastive loss of section 3 as
  reconstructed in docs/methods.md ("MoELoRA"): a supervised InfoNCE over expert outputs whose
  positives are outputs of the *same* expert (on other tokens) and whose negatives are outputs
  of *other* experts (on the same and other tokens) (:func:`contrastive_loss`);
- what L_cl sees: at every ``options.cl_every``-th layer, every routed site; per sequence
  ``options.cl_tokens`` real tokens taken at evenly spaced ranks among its real tokens
  (:func:`sample_positions`, deterministic: one process and two ranks pick the same tokens);
  for each, the un-gated output ``s·(h A_i) B_i`` of each of its k routed experts, computed by
  the block's own dispatcher (dense, sparse or expert-parallel alike);
- global batch: the sampled outputs are all-gathered over the data-parallel group (a
  differentiable gather), so every rank's L_cl and gradient equal one process holding the
  concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hmora_ds.methods.base import Method, register_method
from hmora_ds.routing.context import RouterId, RoutingRecord
from hmora_ds.routing.gates import RouterGroup

#: The record kind of the sampled expert outputs (and the aux-loss kind of L_cl).
CL_KIND = "cl"


@dataclass
class MoELoRAOptions:
    """MoELoRA's settings (``options.<field>=…``).

    Attributes:
        cl_weight: λ_c, the weight of the contrastive loss (0 turns it off).
        cl_temperature: τ of the InfoNCE (cosine similarities divided by τ).
        cl_tokens: real tokens sampled per sequence and site (evenly spaced among the
            sequence's real tokens; all of them when it has fewer).
        cl_every: L_cl is taken at layers 0, cl_every, 2·cl_every, … (1 = every layer).
    """

    cl_weight: float = 0.01
    cl_temperature: float = 0.07
    cl_tokens: int = 4
    cl_every: int = 1


def sample_positions(mask: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` positions per row of ``mask`` (B, T), at evenly spaced ranks among its real tokens.

    Slot j of a row with n real tokens takes the real token of rank ``⌊(2j+1)·n / 2m⌋`` when
    n ≥ m (the middle of the j-th of m equal strata), else rank j (every real token once). It
    depends only on the row's real tokens: padding (left or right, any length) and the other
    rows do not change it, so one process and each data-parallel rank pick the same tokens.

    Returns:
        ``(positions (B, m) long, valid (B, m) bool)``; an invalid slot (j ≥ n) points at 0.
    """
    mask = mask.bool()
    t = mask.shape[-1]
    n = mask.sum(-1, keepdim=True)  # (B, 1)
    j = torch.arange(m, device=mask.device).unsqueeze(0)  # (1, m)
    rank = torch.where(n >= m, torch.div((2 * j + 1) * n, 2 * m, rounding_mode="floor"), j)
    valid = j < n
    # Real tokens' positions first, in order (keys are distinct, so the sort is exact).
    ar = torch.arange(t, device=mask.device)
    order = torch.where(mask, ar, ar + t).argsort(-1)
    pos = order.gather(-1, rank.clamp(max=t - 1))
    return torch.where(valid, pos, torch.zeros_like(pos)), valid


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-size row blocks over ``group``, rank order; backward sums the
    gradient over the ranks (every rank's loss reads every row) and keeps this rank's rows:
    the convention of :func:`hmora_ds.losses.masked_mean`'s differentiable all-reduce."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(parts, rows.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.n = group, rank, rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def _max_rows(n: int, device: torch.device, group: Any) -> int:
    import torch.distributed as dist

    t = torch.tensor([n], device=device, dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def gather_rows(
    outputs: torch.Tensor, experts: torch.Tensor, group: Any, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows of ``outputs`` (n, O) and ``experts`` (n,), padded to ``rows`` (the
    ranks' largest n; all-reduced when None) with expert −1, concatenated in rank order."""
    import torch.distributed as dist

    n = outputs.shape[0]
    rows = _max_rows(n, outputs.device, group) if rows is None else rows
    if rows > n:
        outputs = torch.cat([outputs, outputs.new_zeros(rows - n, outputs.shape[1])])
        experts = torch.cat([experts, experts.new_full((rows - n,), -1)])
    labels = [torch.empty_like(experts) for _ in range(dist.get_world_size(group))]
    dist.all_gather(labels, experts.contiguous(), group=group)
    return _GatherRows.apply(outputs, group), torch.cat(labels)


def contrastive_loss(
    outputs: torch.Tensor, experts: torch.Tensor, *, temperature: float, group: Any = None,
    rows: int | None = None, eps: float = 1e-8,
) -> torch.Tensor:  # fmt: skip
    """L_cl: supervised InfoNCE over expert outputs, positives = the same expert's outputs.

    With u_a = z_a / max(‖z_a‖, ε), s_ac = ⟨u_a, u_c⟩ / τ, C(a) the valid rows c ≠ a and
    P(a) = {p ∈ C(a): expert_p = expert_a}:

        ℓ_a = −(1/|P(a)|) Σ_{p∈P(a)} log( exp(s_ap) / Σ_{c∈C(a)} exp(s_ac) )
        L_cl = mean of ℓ_a over the anchors a with |P(a)| ≥ 1 (0 without one)

    Lowering it raises the similarity of one expert's outputs (pull) and lowers that of
    different experts' outputs (push), including two experts' outputs on the same token.

    Args:
        outputs: (n, O) expert outputs (any leading dims flattened with ``experts``).
        experts: (n,) the expert of each row; −1 = padding (never an anchor, positive or
            negative).
        temperature: τ > 0.
        group: data-parallel process group: rows of every rank are gathered first, so the
            loss is the one of a single process holding all rows.
        rows: with ``group``, the ranks' largest n (all-reduced when None).

    Returns:
        fp32 scalar (fp64 for fp64 outputs). Cost: one (N × N) similarity matrix, N the rows
        of all ranks: O(N² · O) time, O(N²) memory.
    """
    z = outputs.reshape(-1, outputs.shape[-1])
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    e = experts.reshape(-1).to(torch.long)
    if e.shape[0] != z.shape[0]:
        raise ValueError(f"experts: {e.shape[0]} rows, outputs {z.shape[0]}")
    if group is not None:
        z, e = gather_rows(z, e, group, rows)
    valid = e >= 0
    # ‖z‖ through a clamped square: a zero output (B = 0 at init) has a zero, finite gradient.
    u = z / z.pow(2).sum(-1, keepdim=True).clamp_min(eps * eps).sqrt()
    sim = (u @ u.t()) / temperature
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    cand = valid.unsqueeze(0) & valid.unsqueeze(1) & ~eye
    pos = cand & (e.unsqueeze(0) == e.unsqueeze(1))
    n_pos = pos.sum(-1)
    anchor = n_pos > 0
    # Rows that are no anchor get a constant finite row (no NaN through logsumexp of −inf).
    masked = sim.masked_fill(~cand, float("-inf")).masked_fill(~anchor.unsqueeze(1), 0.0)
    log_den = torch.logsumexp(masked, dim=-1)
    pos_mean = (sim * pos.to(sim.dtype)).sum(-1) / n_pos.clamp_min(1).to(sim.dtype)
    per_anchor = torch.where(anchor, log_den - pos_mean, torch.zeros_like(log_den))
    return per_anchor.sum() / anchor.sum().clamp_min(1).to(sim.dtype)


class ContrastiveRouter(RouterGroup):
    """A top-k token router that, on a contrastive site, shows the method its experts' outputs.

    :meth:`observe_update` samples ``cl_tokens`` real tokens per sequence
    (:func:`sample_positions`) and observes, for each, the un-gated outputs of its k routed
    experts as a ``cl`` record: ``values`` (B·m·k, O) and, in place of a mask, each row's
    expert (−1 for a padding slot).
    """

    def __init__(
        self, layer: int, targets: tuple[str, ...], in_features: int, num_experts: int,
        top_k: int, topk_renorm: str, dropout: float, context: Any, cl_tokens: int,
        contrastive: bool,
    ) -> None:  # fmt: skip
        super().__init__(
            layer, targets, in_features, in_features, "token", 0.0, num_experts, "topk", top_k,
            topk_renorm, dropout, False, context,
        )  # fmt: skip
        self.cl_tokens, self.contrastive = cl_tokens, contrastive
        self.cl_id = RouterId(layer, self.targets, CL_KIND)
        self._sample: tuple[int | None, torch.Tensor, torch.Tensor] | None = None

    def _positions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sampled (positions, valid) of this forward: drawn when recording, the same ones
        in the activation recomputation of that forward (it must repeat the forward's
        operations, index tensors included), None otherwise (generation)."""
        ctx = self._ctx
        if ctx.recording:
            mask = ctx.token_mask_for(x)
            if mask is None:
                mask = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
            pos, valid = sample_positions(mask, self.cl_tokens)
            # Compiled, the forward counter is not read (dynamo would recompile per step); the
            # sample is then trusted to be this forward's, as the recompute follows it.
            compiling = torch.compiler.is_compiling()
            self._sample = (None if compiling else ctx.forward_id, pos, valid)
            return pos, valid
        sample = self._sample
        if (
            torch.is_grad_enabled()
            and sample is not None
            and (torch.compiler.is_compiling() or sample[0] == ctx.forward_id)
        ):
            return sample[1], sample[2]
        return None

    def observe_update(self, x: torch.Tensor, gates: torch.Tensor, update: Any) -> None:
        if not self.contrastive or gates.shape[-2] != x.shape[-2]:
            return
        sample = self._positions(x)
        if sample is None:
            return
        pos, valid = sample
        b, m = pos.shape
        top = gates.topk(self.top_k, dim=-1).indices  # (B, T, k): the routed experts
        outs = []
        for j in range(self.top_k):
            one = F.one_hot(top[..., j], self.num_experts).to(gates.dtype)  # unit gate
            y = update(one).reshape(b, x.shape[-2], -1)  # (B, T, O): s·(h A_i) B_i
            outs.append(y.gather(1, pos.unsqueeze(-1).expand(b, m, y.shape[-1])))
        values = torch.stack(outs, dim=2)  # (B, m, k, O)
        experts = top.gather(1, pos.unsqueeze(-1).expand(b, m, self.top_k))  # (B, m, k)
        experts = torch.where(valid.unsqueeze(-1), experts, torch.full_like(experts, -1))
        self._ctx.observe(
            self.cl_id, values.reshape(b * m * self.top_k, -1), experts.reshape(-1), self._slot
        )


@register_method
class MoELoRA(Method):
    name = "moelora"
    preset = "moelora"
    presets = {"moelora": "MoELoRA"}  # noqa: RUF012
    order = 70
    options_class = MoELoRAOptions

    def validate(self) -> None:
        c, o = self.config, self.options
        self.require("routing.mode", c.routing.mode == "topk",
                     "must be topk (MoELoRA routes each token to its top-k experts)")  # fmt: skip
        self.require("routing.task_encoder", c.routing.task_encoder == "none",
                     "must be none: MoELoRA routes tokens only")  # fmt: skip
        self.require("routing.topk_renorm", c.routing.topk_renorm == "sum",
                     "must be sum (Softmax(TopK(W x)): the kept probabilities renormalised to "
                     "sum 1)")  # fmt: skip
        self.require("adapter.hydra", not c.adapter.hydra, "must be false")
        self.require("loss.aux", c.loss.aux in ("blc", "none"), "must be blc (or none)")
        self.require("options.cl_weight", o.cl_weight >= 0, f"must be >= 0, got {o.cl_weight}")
        self.require("options.cl_temperature", o.cl_temperature > 0,
                     f"must be > 0, got {o.cl_temperature}")  # fmt: skip
        self.require("options.cl_tokens", o.cl_tokens >= 1, f"must be >= 1, got {o.cl_tokens}")
        self.require("options.cl_every", o.cl_every >= 1, f"must be >= 1, got {o.cl_every}")

    def build_router(
        self, model: nn.Module, layer: int, targets: tuple[str, ...], in_features: int,
        num_experts: int,
    ) -> nn.Module:  # fmt: skip
        r, o = self.config.routing, self.options
        return ContrastiveRouter(
            layer, targets, in_features, num_experts, r.top_k, r.topk_renorm, r.router_dropout,
            model.routing_context, o.cl_tokens, self.contrastive_site(layer),
        )  # fmt: skip

    def contrastive_site(self, layer: int) -> bool:
        """Whether L_cl is taken at this layer's routed sites (every ``cl_every``-th layer,
        from layer 0)."""
        o = self.options
        return o.cl_weight > 0 and layer % o.cl_every == 0

    def aux_losses(self, records: list[RoutingRecord], group: Any) -> dict[str, torch.Tensor]:
        """``token``: L_balance of every router (summed); ``cl``: L_cl, the mean over the
        contrastive sites of each site's InfoNCE over the global batch's sampled outputs."""
        out = super().aux_losses([r for r in records if r.kind == "token"], group)
        cl = [r for r in records if r.kind == CL_KIND]
        if cl:
            # Every site samples B·m·k rows: one all-reduce finds the ranks' largest count.
            rows = None if group is None else _max_rows(cl[0].mask.shape[0],
                                                        cl[0].probs.device, group)  # fmt: skip
            tau = self.options.cl_temperature
            losses = [contrastive_loss(r.probs, r.mask, temperature=tau, group=group, rows=rows)
                      for r in cl]  # fmt: skip
            out[CL_KIND] = torch.stack(losses).mean()
        return out

    def aux_weight(self, kind: str) -> float:
        return self.options.cl_weight if kind == CL_KIND else self.config.loss.aux_weight

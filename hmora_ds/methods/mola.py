"""MoLA: LoRA-expert mixtures with a different number of experts per layer.

Paper: Gao et al., "Higher Layers Need More LoRA Experts" (2024; "MoLA: MoE LoRA with
Layer-wise Expert Allocation", NAACL 2025 Findings). Official code: ``src/mola_lora_hacked.py``
(the adapted linear ``Linear_MoE``) and ``src/mola_modeling_llama_hacked.py`` (the balance loss).
What this file decides, and where it comes from:

- sites: every target of ``adapter.targets`` (paper: q, k, v, o, gate, up, down); layer j
  carries N_j LoRA experts at each of its sites, N_j from ``options.experts``: a pattern whose
  entries cover contiguous, equal blocks of layers (:func:`layer_expert_counts`; the paper's
  2-4-6-8 over LLaMA-2's 32 layers is 2 experts in layers 0–7, …, 8 in layers 24–31). A
  count of 1 is a plain LoRA at that layer (no router: the mixture of one expert);
- routers: one per adapted linear (``routing.share_routers=false``), ``softmax(W_r x)`` with a
  bias-free W_r (the official code's ``nn.Linear(in, E, bias=False)``; ``options.router_bias``
  adds the library's bias), no router dropout in the presets (the code has none);
- gates: the top-k of the probabilities renormalised to sum 1, ``p_i / Σ_kept p`` (the paper's
  eq. for y = Σ_i TopK(Softmax(W_r x), K)_i / Σ TopK(…) · E_i(x); the code divides by the sum
  too), i.e. ``routing.topk_renorm=sum``; k = 2 in every layer;
- loss: optional (``loss.aux=blc``, off by default like the code's ``obalance``), with the
  code's coefficient 0.001: per layer E_j · Σ_i F_i P_i over the decisions of *all* the
  layer's routers pooled (the code concatenates the layer's router logits), summed over layers
  (``options.balance_scope=layer``); ``site`` is the library's per-router L_blc summed over
  routers (:meth:`Method.aux_losses`).

docs/methods.md ("MoLA") lists where this follows the paper, where the code, and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from hmora_ds.losses import stacked_load_balance_loss
from hmora_ds.methods.base import Method, register_method
from hmora_ds.routing.context import RoutingRecord
from hmora_ds.routing.gates import RouterLinear

logger = logging.getLogger(__name__)


@dataclass
class MoLAOptions:
    """MoLA's settings (``options.<field>=…``).

    Attributes:
        experts: expert counts per block of layers, as a list (``[2, 4, 6, 8]``) or a
            comma-separated string (``"2,4,6,8"``); P entries over L layers give each entry
            L / P consecutive layers (first entry = lowest layers); L entries are per layer.
        blocks: what to do when P does not divide L: ``equal`` refuses (one line naming the
            fix); ``spread`` gives layer l the entry ``floor(l · P / L)`` (blocks differing by
            at most one layer; equal blocks whenever P divides L).
        balance_scope: the load-balancing loss (``loss.aux=blc``): ``layer`` pools the
            decisions of every router of a layer (the official code), ``site`` sums one loss
            per router.
        router_bias: give the routers a bias (the official code's have none).
    """

    experts: list[int] | str = field(default_factory=lambda: [2, 4, 6, 8])
    blocks: Literal["equal", "spread"] = "equal"
    balance_scope: Literal["layer", "site"] = "layer"
    router_bias: bool = False


def parse_counts(experts: list[int] | str) -> list[int]:
    """``options.experts`` as a list of integers (ValueError naming the option otherwise)."""
    items = experts.split(",") if isinstance(experts, str) else list(experts)
    try:
        counts = [int(str(c).strip()) for c in items]
    except ValueError:
        counts = []
    if not counts or any(str(c).strip() != str(n) for c, n in zip(items, counts, strict=True)):
        raise ValueError(
            f"options.experts: must be expert counts such as [2, 4, 6, 8] or '2,4,6,8', "
            f"got {experts!r}"
        )
    return counts


def layer_expert_counts(
    pattern: list[int] | str, num_layers: int, blocks: str = "equal"
) -> list[int]:
    """The expert count of each of ``num_layers`` layers from a block pattern.

    Args:
        pattern: P counts (list or ``"2,4,6,8"``); entry i covers the i-th of P contiguous
            blocks of layers, lowest first. P == ``num_layers``: one count per layer, as is.
        num_layers: L, the decoder layers of the base model.
        blocks: ``equal`` (P must divide L) or ``spread`` (layer l gets entry floor(l·P/L)).

    Returns:
        L counts, e.g. ``[2]*8 + [4]*8 + [6]*8 + [8]*8`` for ``[2, 4, 6, 8]`` over 32 layers.

    Raises:
        ValueError: P does not divide L with ``blocks=equal`` (one line naming
            ``options.experts`` and the fix), or a malformed pattern.
    """
    counts = parse_counts(pattern)
    p = len(counts)
    if p == num_layers:
        return counts
    if blocks == "spread":
        return [counts[layer * p // num_layers] for layer in range(num_layers)]
    if num_layers % p:
        divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
        raise ValueError(
            f"options.experts: {p} blocks do not divide the model's {num_layers} layers; give "
            f"a pattern of {divisors} entries, or set options.blocks=spread for blocks that "
            f"differ by at most one layer"
        )
    size = num_layers // p
    return [c for c in counts for _ in range(size)]


def layer_balance_loss(
    records: list[RoutingRecord], top_k: int, *, group: Any = None
) -> torch.Tensor | None:
    """Σ_layers E_j · Σ_i F_i P_i with each layer's routers pooled (the official code's loss).

    The token decisions of all routers of a layer are one population: F_i the share of
    top-k slots given to expert i, P_i the mean probability, both over every router's valid
    tokens of the (global) batch. Layers with the same E are stacked (one all-reduce each).

    Args:
        records: token-router records (probs (B, T, E_j), mask (B, T) or None).
        top_k: the k of every routed layer.
        group: the data-parallel process group (None: this process's batch only).

    Returns:
        An fp32 scalar, or None without records.
    """
    layers: dict[int, list[RoutingRecord]] = {}
    for rec in records:
        layers.setdefault(rec.id.layer, []).append(rec)
    stacks: dict[tuple, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
    for recs in layers.values():
        probs = torch.cat([r.probs for r in recs], dim=0)  # (S·B, T, E): sites as more rows
        mask = torch.cat([torch.ones(r.probs.shape[:-1], device=r.probs.device)
                          if r.mask is None else r.mask for r in recs], dim=0)  # fmt: skip
        # Layers stack when their sites read the same masks (one forward: always).
        key = (tuple(probs.shape), tuple(id(r.mask) for r in recs))
        stacks.setdefault(key, []).append((probs, mask))
    total = None
    for items in stacks.values():
        probs = torch.stack([p for p, _ in items])
        values = stacked_load_balance_loss(probs, top_k, items[0][1], group=group)
        total = values.sum() if total is None else total + values.sum()
    return total


@register_method
class MoLA(Method):
    name = "mola"
    preset = "mola"
    presets = {  # noqa: RUF012
        "mola": "MoLA-▽ (2-4-6-8)",
        "mola_triangle": "MoLA-△ (8-6-4-2)",
        "mola_square": "MoLA-□ (5-5-5-5)",
        "mola_diamond": "MoLA-◇ (3-5-5-3)",
    }
    order = 40
    options_class = MoLAOptions

    def validate(self) -> None:
        c, o = self.config, self.options
        try:
            counts = parse_counts(o.experts)
        except ValueError as err:
            field_, _, msg = str(err).partition(": ")
            self.require(field_, False, msg)
            return
        self.require(
            "options.experts",
            min(counts) >= 1,
            f"each count must be >= 1 (1 = plain LoRA at that layer), got {counts}",
        )
        if max(counts) < 2:
            msg = "needs a count >= 2 somewhere; use method=lora for plain LoRA everywhere"
            self.require("options.experts", False, msg)
            return
        top, k = max(counts), c.routing.top_k
        self.require(
            "adapter.num_experts",
            c.adapter.num_experts == top,
            f"must equal the largest count of options.experts ({top}) (got "
            f"{c.adapter.num_experts}); set adapter.num_experts={top}",
        )
        low = min(n for n in counts if n >= 2)  # the smallest routed count (1 = no router)
        if c.routing.mode == "topk":
            self.require(
                "routing.top_k",
                k <= low,
                f"({k}) exceeds the smallest routed count of options.experts ({low}); use "
                f"top_k <= {low}",
            )
        self.require("routing.task_encoder", c.routing.task_encoder == "none",
                     "must be none: MoLA routes tokens only")  # fmt: skip
        self.require("routing.topk_renorm", c.routing.topk_renorm == "sum",
                     "must be sum (the kept probabilities divided by their sum, as the paper "
                     "and the official code)")  # fmt: skip
        self.require("adapter.hydra", not c.adapter.hydra, "must be false")
        msg = "must be empty: a count of 1 in options.experts makes a layer plain LoRA"
        self.require("adapter.single_lora_layers", not c.adapter.single_lora_layers, msg)
        self.require("loss.aux", c.loss.aux in ("none", "blc"),
                     "must be none or blc (the load-balancing loss)")  # fmt: skip

    def validate_for_model(self, hidden_size: int, num_layers: int) -> None:
        o = self.options
        self.counts = layer_expert_counts(o.experts, num_layers, o.blocks)
        if num_layers % len(parse_counts(o.experts)):  # blocks=spread on a depth P does not divide
            logger.info("MoLA: options.experts %s spread over %d layers: %s", o.experts,
                        num_layers, self.counts)  # fmt: skip

    def experts_at(self, layer: int, target: str) -> int | None:
        if target not in self.config.adapter.targets:
            return None
        return self.counts[layer]

    def build_router(
        self, model: nn.Module, layer: int, targets: tuple[str, ...], in_features: int,
        num_experts: int,
    ) -> nn.Module:  # fmt: skip
        group = self.router_group(model, layer, targets, in_features, num_experts)
        if not self.options.router_bias:  # the official code's router: Linear(in, E, bias=False)
            group.token_router.linear = RouterLinear(in_features, num_experts, bias=False)
        return group

    def aux_losses(self, records: list[RoutingRecord], group: Any) -> dict[str, torch.Tensor]:
        """L_blc by layer (the official code's pooling) or by router (``balance_scope``)."""
        if self.config.loss.aux == "none" or self.options.balance_scope == "site":
            return super().aux_losses(records, group)
        token = [r for r in records if r.kind == "token"]
        loss = layer_balance_loss(token, self.config.routing.top_k, group=group)
        return {} if loss is None else {"token": loss}

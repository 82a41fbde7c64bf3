"""HiMoLE: hierarchical mixture of LoRA experts, sentence- then token-level routing.

Paper: Jiang et al., "HiMoLE: Towards OOD-Robust LoRA via Hierarchical Mixture of Experts"
(NeurIPS 2025). What this file decides, and where it comes from:

- sites: N knowledge-competition groups (KCGs) of M knowledge-collaboration experts (KCEs),
  i.e. a routed bank of N·M LoRA experts (eq. 1) on every target of ``adapter.targets`` (the
  paper: gate, up and down, table 7); expert j belongs to group j // M;
- routers, per router group (``routing.share_routers``: one for gate + up, which read the FFN
  input, one for down): a sentence router G_sen = W_sen · h_sen over the N groups (eq. 2), h_sen
  the mean of the site's own input h_token over the sequence's prompt tokens
  (``options.sentence_pool``; the paper's whole-sequence mean as an option), and a token router
  G_tok = W_tok · h_token over the N·M experts (eq. 3); both linear (with a bias), both logits;
- gates: G_hie = KeepTopK(softmax(broadcast(G_sen) ⊙ G_tok)) (eq. 4), each group's score
  multiplying its M experts' token scores, the kept k renormalised to sum 1
  (:func:`hierarchical_gates`);
- losses: L = L_LM + α·L_balance + β·L_div (eq. 8): L_balance the Switch-style
  N·M · Σ F_i P_i over softmax(broadcast(G_sen) ⊙ G_tok) (appendix C, ``loss.aux=blc``,
  α = ``loss.aux_weight``), L_div the mean pairwise cosine of the N groups' outputs
  e_n = Σ_{m∈n} G_hie,m · E_m h (eqs. 6–7) at the FFN output (``down``) of every
  ``options.div_every``-th layer (section 3.3: "every ten layers"; β = ``options.div_weight``);
  both statistics over the global batch of the data-parallel ranks;
- two-stage training (section 3.3, algorithm 1): :meth:`HiMoLE.stage1_steps`, the stage-1
  routing (:meth:`HierarchicalRouter.stage1_probs`), :meth:`HiMoLE.start_training` and
  :meth:`HiMoLE.lr_scale`; the clustering before the model is built is the trainer's
  (:mod:`hmora_ds.train.stages`; ``options.stage1_*``,
  ``cluster_*``, ``sentence_encoder``; see docs/methods.md).

docs/methods.md ("HiMoLE") lists the paper's ambiguities and how each is resolved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from hmora_ds.losses import masked_mean
from hmora_ds.methods.base import CLUSTER_INPUT, Method, RoutingBatch, register_method
from hmora_ds.routing.context import RouterId, RoutingRecord
from hmora_ds.routing.gates import Router, RouterGroup, topk_gates

#: The site whose per-group outputs L_div compares: the FFN's output projection.
DIV_TARGET = "down"


@dataclass
class HiMoLEOptions:
    """HiMoLE's settings (``options.<field>=…``).

    Attributes:
        groups: N, the knowledge-competition groups (``adapter.num_experts`` must be N·M). With
            ``cluster_candidates`` stage 1 replaces it by the N the clustering chooses.
        experts_per_group: M, the knowledge-collaboration experts of a group (paper: 4).
        sentence_pool: the tokens h_sen averages: ``prompt`` (default: the tokens of
            ``routing.task_input``, never the targets, so generation routes as training did) or
            ``sequence`` (every real token, the paper's eq. 2 read literally; targets included in
            training, the prompt only in generation).
        div_weight: β, the weight of the diversity loss (paper: 0.01; 0 turns it off).
        div_every: L_div is taken at layers 0, div_every, 2·div_every, … (paper: every ten
            layers; 1 = every layer).
        stage1_fraction: the share of ``train.max_steps`` spent in stage 1 (each group trained
            on its own cluster); 0 = one-stage training (the rebuttal's ablation).
        stage2_lr_scale: stage 2's learning rate as a multiple of ``train.lr`` (paper: 3e-4 in
            stage 1, 3e-5 in stage 2, i.e. 0.1).
        cluster_candidates: the N tried by K-means in stage 1, the one with the best silhouette
            kept (each N·M at most ``max_experts``); empty = N is ``groups``.
        max_experts: the cap on N·M when N is chosen (paper: at most 16 experts).
        sentence_encoder: what embeds the training prompts for the clustering: ``base`` (the
            frozen base model's mean-pooled last hidden state) or a sentence-transformers path.
        cluster_seed: the K-means seed.
    """

    groups: int = 4
    experts_per_group: int = 4
    sentence_pool: Literal["prompt", "sequence"] = "prompt"
    div_weight: float = 0.01
    div_every: int = 10
    stage1_fraction: float = 0.5
    stage2_lr_scale: float = 0.1
    cluster_candidates: list[int] = field(default_factory=list)
    max_experts: int = 16
    sentence_encoder: str = "base"
    cluster_seed: int = 0


def hierarchical_probs(
    sentence_logits: torch.Tensor, token_logits: torch.Tensor, *, experts_per_group: int
) -> torch.Tensor:
    """softmax(broadcast(G_sen) ⊙ G_tok) over the N·M experts (eq. 4 before KeepTopK).

    Args:
        sentence_logits: (B, N) sentence-router scores of the groups.
        token_logits: (B, T, N·M) token-router scores; expert j is in group j // M.

    Returns:
        (B, T, N·M) probabilities, fp32 at least (fp64 stays fp64).
    """
    b, n = sentence_logits.shape
    if token_logits.shape[0] != b or token_logits.shape[-1] != n * experts_per_group:
        raise ValueError(
            f"token_logits: shape {tuple(token_logits.shape)} must be (B={b}, T, "
            f"N·M={n}·{experts_per_group})"
        )
    dtype = torch.promote_types(torch.promote_types(sentence_logits.dtype, token_logits.dtype),
                                torch.float32)  # fmt: skip
    per_expert = sentence_logits.to(dtype).repeat_interleave(experts_per_group, dim=-1)
    return torch.softmax(per_expert.unsqueeze(1) * token_logits.to(dtype), dim=-1)


def hierarchical_gates(
    sentence_logits: torch.Tensor, token_logits: torch.Tensor, *, experts_per_group: int,
    top_k: int,
) -> torch.Tensor:  # fmt: skip
    """G_hie = KeepTopK(softmax(broadcast(G_sen) ⊙ G_tok)) (eq. 4), kept entries summing to 1.

    Args:
        sentence_logits: (B, N).
        token_logits: (B, T, N·M), expert j in group j // M.
        experts_per_group: M.
        top_k: experts kept per token.

    Returns:
        (B, T, N·M) gates: exactly ``top_k`` non-zero entries per token, summing to 1.
    """
    probs = hierarchical_probs(sentence_logits, token_logits, experts_per_group=experts_per_group)
    return topk_gates(probs, top_k, "sum")


def group_cosines(group_outputs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per token, the mean over pairs n < n' of cos(e_n, e_n') (eq. 7), e / max(‖e‖, ε).

    Args:
        group_outputs: (N, B, T, D), N ≥ 2.

    Returns:
        (B, T), fp32 at least. A group with a zero output (none of its experts kept for the
        token) has cosine 0 with every other group, with a zero (finite) gradient.
    """
    n = group_outputs.shape[0]
    if n < 2:
        raise ValueError(f"group_outputs: the diversity loss needs N >= 2 groups, got {n}")
    e = group_outputs.to(torch.promote_types(group_outputs.dtype, torch.float32))
    # ‖e‖ through a clamped square: its gradient at e = 0 is 0, not the NaN of norm()'s.
    norm = e.pow(2).sum(-1, keepdim=True).clamp_min(eps * eps).sqrt()
    u = e / norm
    total = u.sum(0)
    # Σ_{n ≠ n'} ⟨u_n, u_n'⟩ = ‖Σ_n u_n‖² − Σ_n ‖u_n‖²: every ordered pair, i.e. twice the pairs.
    ordered = total.pow(2).sum(-1) - u.pow(2).sum(-1).sum(0)
    return ordered / (n * (n - 1))


def diversity_loss(
    group_outputs: torch.Tensor, mask: torch.Tensor | None = None, *, group: Any = None
) -> torch.Tensor:
    """L_div (eq. 7): the mean over valid tokens of the mean pairwise cosine of the N groups.

    Args:
        group_outputs: (N, B, T, D), e_n per token.
        mask: (B, T), 1 = real token (None: all).
        group: data-parallel process group over which the token mean is global.
    """
    return masked_mean(group_cosines(group_outputs), mask, group=group)


class HierarchicalRouter(RouterGroup):
    """A sentence router over N groups and a token router over N·M experts (eqs. 2–4).

    Reuses :class:`~hmora_ds.routing.gates.RouterGroup`'s once-per-round gates and sparse
    plan (shared by gate and up). h_sen is the site input ``x`` averaged with the pooling
    weights bound for the forward (:meth:`HiMoLE.routing_inputs`); in a decoding step (the
    KV cache holds the prompt) it is the one computed in the prompt's forward.
    Records its softmax(G_sen ⊙ G_tok) as the ``token`` router of the group and, on a
    diversity site, the per-token pairwise cosine of the group outputs as ``div``.
    """

    def __init__(
        self, layer: int, targets: tuple[str, ...], in_features: int, groups: int,
        experts_per_group: int, top_k: int, dropout: float, context: Any, diversity: bool,
    ) -> None:  # fmt: skip
        super().__init__(
            layer, targets, in_features, in_features, "token", 0.0, groups * experts_per_group,
            "topk", top_k, "sum", dropout, False, context,
        )  # fmt: skip
        self.groups, self.experts_per_group = groups, experts_per_group
        self.sentence_router = Router(in_features, groups, dropout)
        self.diversity = diversity
        self.div_id = RouterId(layer, self.targets, "div")
        self._sentence: torch.Tensor | None = None

    def sentence_repr(self, x: torch.Tensor) -> torch.Tensor:
        """h_sen (B, D): ``x`` (B, T, D) pooled with the bound weights, or the prompt's."""
        ctx = self._ctx
        if ctx.cached_tokens > 0:  # decoding: x holds only the new tokens
            h = self._sentence
            if h is None:
                raise RuntimeError(
                    f"HiMoLE router {self.name}: a decoding step without the prompt's sentence "
                    "representation; generate through the wrapper model (its forward/generate)"
                )
            # The prompt's rows, each repeated for beams or answer options (a KV cache
            # repeated per option when scoring by log-likelihood), as the task representation.
            return ctx.expand_rows(h, x, f"HiMoLE router {self.name}'s sentence rows").to(x.dtype)
        weights = ctx.task_repr_for(x)  # (B, T) pooling weights, rows summing to 1 (or 0)
        if weights.shape[-1] != x.shape[-2]:
            raise RuntimeError(
                f"HiMoLE router {self.name}: pooling weights for {weights.shape[-1]} tokens, "
                f"input of {x.shape[-2]}"
            )
        h = torch.einsum("bt,btd->bd", weights.to(x.dtype), x)
        self._sentence = h.detach()
        return h

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G_sen (B, N), G_tok (B, T, N·M)): the two routers' raw scores (eqs. 2–3)."""
        sen = self.sentence_router.logits(self.sentence_repr(x))
        tok = self.token_router.logits(x)
        return sen, tok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cluster = self._ctx.batch_input(CLUSTER_INPUT, x)
        if cluster is not None:
            probs = self.stage1_probs(x, cluster)
        else:
            sen, tok = self.logits(x)
            probs = hierarchical_probs(sen, tok, experts_per_group=self.experts_per_group)
        self._ctx.record(self.token_id, probs, self._ctx.token_mask_for(x), self._slot)
        return topk_gates(probs, self.top_k, "sum")

    def stage1_probs(self, x: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
        """Stage 1 (algorithm 1): the sentence gate replaced by the sequence's cluster. The
        token router's softmax over the M experts of group ``cluster[b]`` only, as (B, T, N·M)
        with exact zeros on every other group's experts (their logits are -inf), so top-k
        keeps experts of that group alone and no other expert or token-router row receives a
        gradient from the sequence. The sentence router is not run (it trains in stage 2)."""
        tok = self.token_router.logits(x)
        owner = torch.arange(self.num_experts, device=tok.device) // self.experts_per_group
        mine = owner == cluster.to(tok.device).long().view(-1, 1, 1)  # (B, 1, N·M)
        dtype = torch.promote_types(tok.dtype, torch.float32)
        return torch.softmax(tok.to(dtype).masked_fill(~mine, float("-inf")), dim=-1)

    def group_masks(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(N, N·M): row n is 1 on group n's experts."""
        owner = torch.arange(self.num_experts, device=device) // self.experts_per_group
        return (owner == torch.arange(self.groups, device=device).unsqueeze(1)).to(dtype)

    def observe_update(self, x: torch.Tensor, gates: torch.Tensor, update: Any) -> None:
        """On a diversity site: e_n = update(gates on group n only) for every group (eq. 6),
        their per-token pairwise cosine observed for L_div. Computed whenever gradients are
        on too (activation recomputation must repeat the forward's operations)."""
        ctx = self._ctx
        if not self.diversity or not (ctx.recording or torch.is_grad_enabled()):
            return
        masks = self.group_masks(gates.dtype, gates.device)
        outs = torch.stack(
            [update(gates * m).reshape(*x.shape[:-1], -1) for m in masks]
        )  # (N, B, T, O)
        ctx.observe(self.div_id, group_cosines(outs), ctx.token_mask_for(x), self._slot)


@register_method
class HiMoLE(Method):
    name = "himole"
    preset = "himole"
    presets = {"himole": "HiMoLE", "himole_one_stage": "HiMoLE one stage"}  # noqa: RUF012
    order = 60
    options_class = HiMoLEOptions
    optional_batch_inputs = (CLUSTER_INPUT,)
    components: ClassVar[tuple[str, ...]] = (
        "lora A", "lora B", "token routers", "sentence routers", "base model",
    )  # fmt: skip

    def validate(self) -> None:
        c, o = self.config, self.options
        self.require("routing.mode", c.routing.mode == "topk", "must be topk (KeepTop-k, eq. 4)")
        self.require("routing.task_encoder", c.routing.task_encoder == "none",
                     "must be none: HiMoLE's sentence router reads the site's own hidden "
                     "states")  # fmt: skip
        self.require("routing.topk_renorm", c.routing.topk_renorm == "sum",
                     "must be sum (the kept gates are renormalised to sum 1)")  # fmt: skip
        self.require("adapter.hydra", not c.adapter.hydra, "must be false")
        self.require("loss.aux", c.loss.aux in ("blc", "none"),
                     "must be blc (the Switch-style L_balance, appendix C) or none")  # fmt: skip
        self.require("options.groups", o.groups >= 1, f"must be >= 1, got {o.groups}")
        self.require("options.experts_per_group", o.experts_per_group >= 1,
                     f"must be >= 1, got {o.experts_per_group}")  # fmt: skip
        n_m = o.groups * o.experts_per_group
        self.require("adapter.num_experts", c.adapter.num_experts == n_m,
                     f"must equal options.groups × options.experts_per_group = {n_m} "
                     f"(got {c.adapter.num_experts}); set adapter.num_experts={n_m}")  # fmt: skip
        self.require("options.div_weight", o.div_weight >= 0, f"must be >= 0, got {o.div_weight}")
        self.require("options.div_every", o.div_every >= 1, f"must be >= 1, got {o.div_every}")
        div_on = o.div_weight > 0 and c.has_mixture
        self.require("options.div_weight", not div_on or o.groups >= 2,
                     "needs options.groups >= 2 (L_div compares groups); set it to 0")  # fmt: skip
        self.require("options.div_weight",
                     not div_on or DIV_TARGET in c.adapter.mixture_targets,
                     "needs 'down' among the routed adapter.targets (L_div compares the groups' "
                     "FFN outputs); add it or set options.div_weight=0")  # fmt: skip
        self.require("options.stage1_fraction", 0.0 <= o.stage1_fraction < 1.0,
                     f"must lie in [0, 1), got {o.stage1_fraction}")  # fmt: skip
        self.require("options.stage2_lr_scale", o.stage2_lr_scale > 0,
                     f"must be > 0, got {o.stage2_lr_scale}")  # fmt: skip
        cands = o.cluster_candidates
        self.require("options.cluster_candidates",
                     all(n >= 2 and n * o.experts_per_group <= o.max_experts for n in cands)
                     and len(set(cands)) == len(cands),
                     f"each N must be >= 2 with N × options.experts_per_group <= "
                     f"options.max_experts ({o.max_experts}), each once; got {cands}")  # fmt: skip
        self.require("options.sentence_encoder", bool(o.sentence_encoder),
                     "must be 'base' or a sentence-transformers model path")  # fmt: skip
        self.require("routing.top_k",
                     o.stage1_fraction == 0 or c.routing.top_k <= o.experts_per_group,
                     f"must be <= options.experts_per_group ({o.experts_per_group}): stage 1 "
                     "routes each sequence among its group's experts only; lower it or set "
                     "options.stage1_fraction=0")  # fmt: skip

    # ------------------------------------------------------------------ two stages
    def stage1_steps(self, max_steps: int) -> int:
        """floor(stage1_fraction × max_steps): the first steps train each group on its
        cluster (section 3.3, algorithm 1)."""
        return math.floor(self.options.stage1_fraction * max_steps + 1e-9)

    def lr_scale(self, step: int, max_steps: int) -> float:
        """1 in stage 1, ``stage2_lr_scale`` from the first step of stage 2 on (paper: 3e-4
        then 3e-5)."""
        return 1.0 if step < self.stage1_steps(max_steps) else self.options.stage2_lr_scale

    def start_training(self, model: nn.Module) -> None:
        """With a stage 1: every group's M experts made copies of the group's first expert
        (its A rows and B columns; B is zero at initialisation), so that the experts of a
        group start from one initialisation and only the token router tells them apart."""
        if self.options.stage1_fraction == 0:
            return
        m = self.options.experts_per_group
        for module in model.adapted_modules().values():
            if not isinstance(getattr(module, "router", None), HierarchicalRouter):
                continue
            e = module.router.num_experts
            rank = module.lora_A.shape[0] // e
            with torch.no_grad():
                a = module.lora_A.view(e // m, m, rank, -1)
                a.copy_(a[:, :1].expand_as(a).clone())
                b = module.lora_B.view(module.lora_B.shape[0], e // m, m, rank)
                b.copy_(b[:, :, :1].expand_as(b).clone())

    def build_router(
        self, model: nn.Module, layer: int, targets: tuple[str, ...], in_features: int,
        num_experts: int,
    ) -> nn.Module:  # fmt: skip
        o = self.options
        assert num_experts == o.groups * o.experts_per_group, (num_experts, o.groups)
        return HierarchicalRouter(
            layer, targets, in_features, o.groups, o.experts_per_group,
            self.config.routing.top_k, self.config.routing.router_dropout,
            model.routing_context, diversity=self.diversity_site(layer, targets),
        )  # fmt: skip

    def diversity_site(self, layer: int, targets: tuple[str, ...]) -> bool:
        """Whether L_div is taken at this router group (the down projection of every
        ``div_every``-th layer, from layer 0)."""
        o = self.options
        return o.div_weight > 0 and DIV_TARGET in targets and layer % o.div_every == 0

    def routing_inputs(self, model: nn.Module, batch: RoutingBatch) -> torch.Tensor:
        """The (B, T) weights averaging a site's input into h_sen: 1/count on the pooled tokens
        (``options.sentence_pool``), 0 elsewhere."""
        pool = batch.prompt_mask if self.options.sentence_pool == "prompt" else batch.attention_mask
        dtype = torch.promote_types(batch.embeds.dtype, torch.float32)
        m = (pool.bool() & batch.attention_mask.bool()).to(dtype)
        return m / m.sum(-1, keepdim=True).clamp_min(1.0)

    def aux_losses(self, records: list[RoutingRecord], group: Any) -> dict[str, torch.Tensor]:
        """``token``: L_balance over the hierarchical softmax of every router (summed, as for
        the other methods); ``div``: L_div, the mean over the diversity sites and the global
        batch's real tokens of the per-token pairwise cosine."""
        out = super().aux_losses([r for r in records if r.kind == "token"], group)
        div = [r for r in records if r.kind == "div"]
        if div:
            values = torch.stack([r.probs for r in div]).mean(0)
            out["div"] = masked_mean(values, div[0].mask, group=group)
        return out

    def aux_weight(self, kind: str) -> float:
        return self.options.div_weight if kind == "div" else self.config.loss.aux_weight

    def component_of(self, name: str) -> str:
        if ".sentence_router." in name:
            return "sentence routers"
        return super().component_of(name)

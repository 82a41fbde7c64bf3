"""The HMoRA wrapper model: injection into a Hugging Face Qwen2 / LLaMA causal LM (spec §1–5).

Shapes: ``B`` batch, ``T`` tokens, ``D`` hidden size, ``V`` vocabulary.

Injection follows match → create → replace → freeze: for every decoder layer (found through the
model's own structure, checked against ``config.num_hidden_layers``) the target ``nn.Linear``
modules are wrapped by :class:`~hmora_ds.lora.MoRALinear`, which keeps and calls the original
module. Routers live in :attr:`HMoRAModel.routers`, one :class:`RouterGroup` per layer and input.

:meth:`HMoRAModel.forward` computes the task representation from its own inputs (prompt tokens
only), binds it in the routing context for every router, runs the base model, and returns the LM
loss on target tokens, the auxiliary loss and per-router statistics. Nothing is set on modules
from outside: the training loop calls ``forward`` then backward, and that is all.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hmora_ds.config import SHARED_GROUPS, TARGETS, HMoRAConfig
from hmora_ds.lora import MoRALinear
from hmora_ds.losses import stacked_cgjs_loss, stacked_load_balance_loss, total_loss
from hmora_ds.metrics import RouterStatsAccumulator
from hmora_ds.routing import RouterGroup, RoutingContext, TaskEncoder, layer_alphas, layer_modes

logger = logging.getLogger(__name__)

#: Per-architecture module paths of the seven targets inside one decoder layer.
ARCH_TARGETS: dict[str, dict[str, str]] = {
    arch: {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    for arch in ("qwen2", "llama")
}

#: Shape keys of the base config recorded with every adapter (a mismatch refuses loading).
FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


@dataclass
class HMoRAOutput:
    """What :meth:`HMoRAModel.forward` returns.

    Attributes:
        loss: ``lm_loss + λ · aux_loss`` (None without labels).
        lm_loss: mean cross-entropy over target tokens (label smoothing applied).
        lm_loss_sum: the summed cross-entropy (for normalising by a global token count).
        aux_loss: Σ over routers of L_aux (or L_blc), unweighted; 0 without routers.
        aux_by_kind: the aux loss split by router kind (``token``, ``task``), detached.
        logits: (B, T, V).
        num_target_tokens: number of target tokens in ``labels``.
        router_stats: router name → ``balance``, ``certainty``, ``load`` (detached).
        routing_records: this forward's router probabilities (for accumulating statistics).
        past_key_values: the KV cache when ``use_cache``.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    lm_loss_sum: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    aux_by_kind: dict[str, torch.Tensor] = field(default_factory=dict)
    num_target_tokens: torch.Tensor | None = None
    router_stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    routing_records: list = field(default_factory=list)
    past_key_values: Any = None


def base_fingerprint(base_model: nn.Module, base_parameters: int | None = None) -> dict[str, Any]:
    """Shape keys of a base model's config plus its parameter count (adapter compatibility)."""
    cfg = base_model.config
    fp = {k: getattr(cfg, k, None) for k in FINGERPRINT_KEYS}
    fp["base_parameters"] = (
        count_parameters(base_model) if base_parameters is None else base_parameters
    )
    return fp


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Qwen2 / LLaMA causal LM, checked against its config."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    n = model.config.num_hidden_layers
    if not isinstance(layers, nn.ModuleList) or len(layers) != n:
        raise ValueError(
            f"base model: could not find its {n} decoder layers through get_decoder().layers; "
            "only Qwen2 / LLaMA causal LMs are supported"
        )
    return layers


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modify: bool = False):
    """Gather ZeRO-3 partitioned parameters (a no-op for ordinary tensors).

    With ``modify`` rank 0's in-place changes are scattered back to every partition.
    """
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield
    else:
        yield


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count, shared (tied) tensors once; ZeRO-3 partitioned sizes via ``ds_numel``."""
    total = 0
    for p in module.parameters():  # parameters() already yields each tensor once
        if trainable_only and not p.requires_grad:
            continue
        total += int(getattr(p, "ds_numel", p.numel()))
    return total


class HMoRAModel(nn.Module):
    """HMoRA around a frozen Hugging Face ``Qwen2ForCausalLM`` / ``LlamaForCausalLM``.

    Args:
        base_model: the causal LM (real weights, ZeRO-3 partitioned, or on ``meta``).
        config: the method configuration (validated again against the model's shape).
        tokenizer: used to find the ``?`` token whose embedding initialises ``e_task``.
        task_token_id: the token id to initialise ``e_task`` from (instead of ``tokenizer``).
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: HMoRAConfig,
        *,
        tokenizer: Any = None,
        task_token_id: int | None = None,
    ) -> None:
        super().__init__()
        hf_cfg = base_model.config
        if hf_cfg.model_type not in ARCH_TARGETS:
            raise ValueError(
                f"base model: model_type {hf_cfg.model_type!r} is not supported; "
                f"use one of {sorted(ARCH_TARGETS)}"
            )
        num_layers = hf_cfg.num_hidden_layers
        config.validate_for_model(hf_cfg.hidden_size, num_layers)
        self.config = config
        self.base_model = base_model
        self.base_parameter_count = count_parameters(base_model)
        self.routing_context = RoutingContext()
        self.routers = nn.ModuleDict()
        self.task_encoder: TaskEncoder | None = None
        self._warned_prompt_mask = False
        self.task_token_id = task_token_id  # the builder fills it in from the tokenizer

        if not config.full_finetune:
            base_model.requires_grad_(False)
        r = config.routing
        if r.task_encoder == "none":
            self.layer_modes = ["token"] * num_layers
        else:
            self.layer_modes = layer_modes(num_layers, r.eps, r.mu, r.beta_low, r.beta_high)
        self.layer_alphas = layer_alphas(num_layers, r.eps, r.mu)
        if not config.full_finetune:
            self._inject(decoder_layers(base_model))
        if config.has_mixture and any(m != "token" for m in self.layer_modes):
            self.task_encoder = self._build_task_encoder(tokenizer, task_token_id)
        if logger.isEnabledFor(logging.INFO):
            from hmora_ds.params import parameter_report

            rep = parameter_report(self)
            logger.info(
                "trainable parameters: %s (TP %.2f%% of %s)",
                f"{rep.trainable:,}",
                rep.tp_percent,
                f"{rep.base:,}",
            )

    # ------------------------------------------------------------------ construction
    def _router_groups(self) -> list[tuple[str, ...]]:
        mixture = self.config.adapter.mixture_targets
        if not self.config.routing.share_routers:
            return [(t,) for t in mixture]
        groups = []
        for shared in SHARED_GROUPS:
            members = tuple(t for t in shared if t in mixture)
            if members:
                groups.append(members)
        grouped = {t for g in groups for t in g}
        groups += [(t,) for t in mixture if t not in grouped]
        return sorted(groups, key=lambda g: TARGETS.index(g[0]))

    def _inject(self, layers: nn.ModuleList) -> None:
        a, r = self.config.adapter, self.config.routing
        paths = ARCH_TARGETS[self.base_model.config.model_type]
        hidden = self.base_model.config.hidden_size
        for idx, layer in enumerate(layers):
            router_of: dict[str, RouterGroup] = {}
            for group in self._router_groups():
                first = layer.get_submodule(paths[group[0]])
                key = f"layer{idx:02d}_{'_'.join(group)}"
                router = RouterGroup(
                    name=f"layer{idx:02d}.{'_'.join(group)}",
                    in_features=first.in_features,
                    task_features=hidden,
                    layer_mode=self.layer_modes[idx],
                    alpha=self.layer_alphas[idx],
                    num_experts=a.num_experts,
                    mode=r.mode,
                    top_k=r.top_k,
                    topk_renorm=r.topk_renorm,
                    dropout=r.router_dropout,
                    learn_alpha=r.learn_alpha,
                    context=self.routing_context,
                ).to(first.weight.device)
                self.routers[key] = router
                router_of.update({t: router for t in group})
                if len(group) > 1:  # shared: one computation per call of the common parent
                    parent = layer.get_submodule(paths[group[0]].rpartition(".")[0])
                    parent.register_forward_pre_hook(router.new_round)
                    router.shared = True
            for target in TARGETS:
                if target not in a.targets:
                    continue
                parent_path, _, child = paths[target].rpartition(".")
                parent = layer.get_submodule(parent_path)
                base = getattr(parent, child)
                if not isinstance(base, nn.Linear):
                    raise ValueError(
                        f"base model: layer {idx} {paths[target]} is {type(base).__name__}, "
                        "expected nn.Linear (is an adapter already injected?)"
                    )
                router = router_of.get(target)
                setattr(
                    parent,
                    child,
                    MoRALinear(
                        base,
                        rank=a.rank,
                        alpha=a.alpha,
                        rslora=a.rslora,
                        dropout=a.dropout,
                        num_experts=a.num_experts if router is not None else 1,
                        hydra=a.hydra,
                        router=router,
                        compute=a.compute,
                    ),
                )

    def _build_task_encoder(self, tokenizer: Any, task_token_id: int | None) -> TaskEncoder:
        r = self.config.routing
        embedding = self.base_model.get_input_embeddings()
        weight = embedding.weight
        on_meta = weight.device.type == "meta"
        init = None
        scale = 1.0
        if r.task_encoder == "transformer" and not on_meta:
            if task_token_id is None:
                if tokenizer is None:
                    raise ValueError(
                        "task_token_id: the transformer task encoder initialises e_task from the "
                        "embedding of '?'; pass tokenizer= or task_token_id="
                    )
                ids = tokenizer.encode("?", add_special_tokens=False)
                if len(ids) != 1:
                    raise ValueError(f"tokenizer: '?' is not a single token ({ids})")
                task_token_id = ids[0]
            with gathered([weight]), torch.no_grad():
                init = weight[task_token_id].detach().float().clone()
                scale = weight.float().pow(2).mean().sqrt().item()
        self.task_token_id = task_token_id
        hidden = self.base_model.config.hidden_size
        return TaskEncoder(
            hidden,
            kind=r.task_encoder,
            num_layers=r.encoder_layers,
            num_heads=r.encoder_heads,
            ffn_mult=r.encoder_ffn_mult,
            dropout=r.encoder_dropout,
            init_task_embedding=init,
            position_scale=scale,
        ).to(weight.device)

    # ------------------------------------------------------------------ helpers
    def save_adapter(self, directory: Any) -> Any:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (see adapter_io)."""
        from hmora_ds.adapter_io import save_adapter

        return save_adapter(self, directory)

    def adapted_modules(self) -> dict[str, MoRALinear]:
        """Name → adapted linear, in module order."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, MoRALinear)}

    def gradient_checkpointing_enable(self) -> None:
        """Non-reentrant activation checkpointing of every decoder layer."""
        self.base_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )

    def shape_fingerprint(self) -> dict[str, Any]:
        return base_fingerprint(self.base_model, self.base_parameter_count)

    def _task_representation(
        self, embeds: torch.Tensor, prompt_mask: torch.Tensor
    ) -> torch.Tensor | None:
        if self.task_encoder is None:
            return None
        return self.task_encoder(embeds, prompt_mask)

    def task_representation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """H_task (B, D) of a batch, from its prompt tokens only (None without task routing)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pmask = self._resolve_prompt_mask(prompt_mask, attention_mask, None)
        embeds = self.base_model.get_input_embeddings()(input_ids)
        return self._task_representation(embeds, pmask)

    def _resolve_prompt_mask(
        self,
        prompt_mask: torch.Tensor | None,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> torch.Tensor:
        if prompt_mask is not None:
            if prompt_mask.shape != attention_mask.shape:
                raise ValueError(
                    f"prompt_mask: shape {tuple(prompt_mask.shape)} must equal input_ids' "
                    f"{tuple(attention_mask.shape)}"
                )
            return prompt_mask.bool() & attention_mask.bool()
        if labels is None:
            return attention_mask.bool()
        if not self._warned_prompt_mask:
            logger.warning(
                "forward: no prompt_mask given; the task encoder uses the unlabelled tokens "
                "(labels == -100). Pass the collator's prompt_mask to be exact."
            )
            self._warned_prompt_mask = True
        return attention_mask.bool() & (labels == -100)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        return_router_stats: bool = True,
        aux_group: Any = None,
        **model_kwargs: Any,
    ) -> HMoRAOutput:
        """Run the model on a batch.

        Args:
            input_ids: (B, T) token ids, left or right padded.
            attention_mask: (B, T) 1 on real tokens (default: all ones).
            labels: (B, T) target ids, -100 elsewhere; the LM loss covers these tokens only.
            prompt_mask: (B, T) 1 on prompt tokens: the only input of the task encoder.
            position_ids: (B, T); default: counted from ``attention_mask`` (padding-safe).
            past_key_values / use_cache: KV cache; with a non-empty cache the task
                representation bound by the previous (prompt) forward is kept.
            return_router_stats: compute per-router statistics (detached).
            aux_group: process group over which routing statistics are global (None = local).

        Returns:
            :class:`HMoRAOutput`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.base_model.get_input_embeddings()(input_ids)
        decoding = past_key_values is not None and past_key_values.get_seq_length() > 0
        if position_ids is None and not decoding:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        ctx = self.routing_context
        if decoding:
            scope = ctx.forward_scope(ctx.task_repr, None, record=False, expand_batch=True)
        else:
            pmask = self._resolve_prompt_mask(prompt_mask, attention_mask, labels)
            task_repr = self._task_representation(embeds, pmask)
            scope = ctx.forward_scope(task_repr, attention_mask.bool(), record=True)
        with scope as records:
            out = self.base_model(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **model_kwargs,
            )
        result = HMoRAOutput(
            logits=out.logits, past_key_values=out.past_key_values, routing_records=records
        )
        result.aux_loss, result.aux_by_kind = self._aux_loss(records, aux_group)
        if return_router_stats and records:
            acc = RouterStatsAccumulator(self.stats_top_k)
            acc.add(records)
            result.router_stats = acc.finalize(aux_group)
        if labels is not None:
            lm_sum, n_target = self.lm_loss_sum(out.logits, labels)
            result.lm_loss_sum, result.num_target_tokens = lm_sum, n_target
            result.lm_loss = lm_sum / n_target.clamp_min(1)
            result.loss = total_loss(result.lm_loss, result.aux_loss, self.config.loss.aux_weight)
        return result

    @property
    def stats_top_k(self) -> int | None:
        """The k of expert-load shares (None with soft routing: load = mean probability)."""
        r = self.config.routing
        return r.top_k if r.mode == "topk" else None

    def lm_loss_sum(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over target tokens, with label smoothing.

        Returns:
            (summed loss in fp32, number of target tokens).
        """
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        n = (shift_labels != -100).sum()
        total = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            label_smoothing=self.config.loss.label_smoothing,
            reduction="sum",
        )
        return total, n

    def _aux_loss(self, records: list, group: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Σ over token and task routers of the configured auxiliary loss (fp32 scalar).

        Returns:
            (total, detached totals per router kind).
        """
        lc = self.config.loss
        device = next(self.parameters()).device
        total = torch.zeros((), device=device)
        by_kind: dict[str, torch.Tensor] = {}
        if lc.aux == "none":
            return total, by_kind
        # Routers of one kind share the batch's shape and mask: their losses are computed as
        # one stack, with one all-reduce per stack (see losses.stacked_routing_moments).
        stacks: dict[tuple, list] = {}
        for rec in records:
            key = (rec.kind, tuple(rec.probs.shape), None if rec.mask is None else id(rec.mask))
            stacks.setdefault(key, []).append(rec)
        for (kind, _, _), recs in stacks.items():
            probs, mask = torch.stack([r.probs for r in recs]), recs[0].mask
            if lc.aux == "cgjs":
                values = stacked_cgjs_loss(
                    probs, mask, gamma_b=lc.gamma_b, gamma_c=lc.gamma_c, group=group
                )
            else:
                values = stacked_load_balance_loss(
                    probs, self.config.routing.top_k, mask, group=group
                )
            value = values.sum()
            total = total + value
            by_kind[kind] = by_kind.get(kind, 0.0) + value.detach()
        return total, by_kind

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Hugging Face ``generate`` with task routing taken from the prompt.

        Works with the KV cache, left padding, batch > 1, sampling and beam search: the task
        representation is computed once from the prompt and bound for every decoding step
        (beams and return sequences repeat each prompt, which the context expands).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pmask = self._resolve_prompt_mask(prompt_mask, attention_mask, None)
        embeds = self.base_model.get_input_embeddings()(input_ids)
        task_repr = self._task_representation(embeds, pmask)
        with self.routing_context.forward_scope(task_repr, None, record=False, expand_batch=True):
            return self.base_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
            )

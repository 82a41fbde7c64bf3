"""The wrapper model: a method's adapters injected into a Hugging Face Qwen2 / LLaMA causal LM.

Shapes: ``B`` batch, ``T`` tokens, ``D`` hidden size, ``V`` vocabulary.

Injection follows match → create → replace → freeze: for every decoder layer (found through the
model's own structure, checked against ``config.num_hidden_layers``) the method
(:mod:`hmora_ds.methods`) says how many experts sit at each target and which targets share a
router; the target ``nn.Linear`` modules are wrapped by an expert bank
(:class:`~hmora_ds.experts.MoRALinear`), which keeps and calls the original module. Routers live
in :attr:`HMoRAModel.routers`, one group per layer and shared input.

:meth:`HMoRAModel.forward` asks the method for its per-batch routing input (HMoRA: the task
representation of the raw instruction's or the prompt's tokens, per ``routing.task_input``),
binds it in the routing context for every router, runs the base model, and returns the LM loss
on target tokens, the method's auxiliary losses and per-router statistics. Nothing is set on
modules from outside: the training loop calls ``forward`` then backward, and that is all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hmora_ds.base_model import (
    ARCH_TARGETS,
    base_fingerprint,
    count_parameters,
    decoder_layers,
    gathered,
)
from hmora_ds.config import TARGETS, HMoRAConfig
from hmora_ds.experts import MoRALinear
from hmora_ds.lm_head import chunked_lm_loss_sum
from hmora_ds.losses import total_loss
from hmora_ds.methods import Method, RoutingBatch, build_method, get_method
from hmora_ds.metrics import RouterStatsAccumulator
from hmora_ds.routing import RouterId, RoutingContext, RoutingRecord, TaskEncoder

logger = logging.getLogger(__name__)


@dataclass
class HMoRAOutput:
    """What :meth:`HMoRAModel.forward` returns.

    Attributes:
        loss: the objective ``lm_loss + Σ_k λ_k · L_aux,k`` (None without labels).
        lm_loss: mean cross-entropy over target tokens (label smoothing applied).
        lm_loss_sum: the summed cross-entropy (for normalising by a global token count).
        aux_loss: Σ of the method's auxiliary losses, unweighted; 0 without routers.
        aux_weighted: Σ_k λ_k · L_aux,k, the auxiliary part of the objective.
        aux_step_weighted: the part of ``aux_weighted`` whose kinds are taken over the whole
            optimizer step (``step_kinds``); 0 when none was computed in this forward.
        step_kinds: the kinds of ``aux_by_kind`` computed over the optimizer step (the
            step's other micro-batches included through ``step_batches``).
        aux_by_kind: the aux losses by kind (HMoRA: ``token``, ``task``), detached.
        logits: (B, T, V); None from a training forward whose loss was computed in chunks
            without them (``ce_chunk_tokens``).
        num_target_tokens: number of target tokens in ``labels``.
        router_stats: router name → ``balance``, ``certainty``, ``load`` (detached).
        routing_records: this forward's router probabilities (for accumulating statistics).
        past_key_values: the KV cache when ``use_cache``.
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    lm_loss_sum: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    aux_weighted: torch.Tensor | None = None
    aux_step_weighted: torch.Tensor | None = None
    aux_by_kind: dict[str, torch.Tensor] = field(default_factory=dict)
    step_kinds: tuple[str, ...] = ()
    num_target_tokens: torch.Tensor | None = None
    router_stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    routing_records: list = field(default_factory=list)
    past_key_values: Any = None


def merge_sequence_records(
    records: list[RoutingRecord], extra: list[RoutingRecord]
) -> list[RoutingRecord]:
    """``records`` with each per-sequence router's probabilities extended by its ``extra``
    rows (same router id, concatenated along the sequence dim), so its statistics cover both
    batches. Records without extra rows are kept as they are."""
    more: dict[RouterId, list[torch.Tensor]] = {}
    for rec in extra:
        more.setdefault(rec.id, []).append(rec.probs)
    out = []
    for rec in records:
        rows = more.get(rec.id)
        if rows is None or rec.mask is not None:
            out.append(rec)
        else:
            out.append(RoutingRecord(rec.id, torch.cat([rec.probs, *rows]), None))
    return out


def cache_length(past_key_values: Any) -> int:
    """Tokens held by a KV cache (a ``Cache`` object or the legacy tuple), 0 for none."""
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    return int(past_key_values[0][0].shape[-2]) if len(past_key_values) else 0


def lm_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over target tokens (labels ``-100`` are ignored).

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
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return total, n


class HMoRAModel(nn.Module):
    """HMoRA around a frozen Hugging Face ``Qwen2ForCausalLM`` / ``LlamaForCausalLM``.

    Args:
        base_model: the causal LM (real weights, ZeRO-3 partitioned, or on ``meta``).
        config: the method configuration (validated again against the model's shape).
        tokenizer: used to find the ``?`` token whose embedding initialises ``e_task``.
        task_token_id: the token id to initialise ``e_task`` from (instead of ``tokenizer``).
        library_sites: for a method that composes a LoRA library
            (:attr:`~hmora_ds.methods.Method.library_experts`), each library LoRA's tensors by
            module path, loaded as the experts, with the config the library completed
            (:func:`hmora_ds.composition.build_model` reads both; ``[]`` on the meta device).
        from_adapter: a library method's model whose every adapter tensor is loaded next
            (:func:`~hmora_ds.adapter_io.load_adapter`): its config records the library's
            tasks, and no library is needed.
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: HMoRAConfig,
        *,
        tokenizer: Any = None,
        task_token_id: int | None = None,
        library_sites: list[dict[str, Any]] | None = None,
        from_adapter: bool = False,
    ) -> None:
        super().__init__()
        hf_cfg = base_model.config
        if hf_cfg.model_type not in ARCH_TARGETS:
            raise ValueError(
                f"base model: model_type {hf_cfg.model_type!r} is not supported; "
                f"use one of {sorted(ARCH_TARGETS)}"
            )
        num_layers = hf_cfg.num_hidden_layers
        if get_method(config.method).library_experts is not None:
            if library_sites is None and not from_adapter:
                raise ValueError(
                    f"method {config.method} composes the LoRAs of a library: build its model "
                    "with hmora_ds.composition.build_model(base, config), which reads "
                    "method.options.library, or load a saved adapter"
                )
            if not config.options.get("tasks"):
                raise ValueError(
                    f"options.tasks: empty in a {config.method} config; the library's tasks "
                    "are recorded by hmora_ds.composition.build_model and in every adapter"
                )
        self.method: Method = build_method(config)
        self.method.bind(hf_cfg.hidden_size, num_layers)
        self.config = config
        self.base_model = base_model
        self.base_parameter_count = count_parameters(base_model)
        self.routing_context = RoutingContext()
        self.routers = nn.ModuleDict()
        self.task_encoder: TaskEncoder | None = None
        #: Training forwards compute the LM loss in chunks of this many tokens without the
        #: full logits (:mod:`hmora_ds.lm_head`; ``train.ce_chunk_tokens``, set by the
        #: trainer); 0: from the logits, which the output then carries.
        self.ce_chunk_tokens = 0
        self._warned_prompt_mask = False
        self._warned_instruction_mask = False
        self.task_token_id = task_token_id  # a method may fill it in from the tokenizer

        if not self.method.trains_base:
            base_model.requires_grad_(False)
            self._inject(decoder_layers(base_model))
        base_model.register_forward_pre_hook(self._note_cache, with_kwargs=True)
        self.method.build_modules(self, tokenizer, task_token_id)
        if library_sites:
            self._load_library_experts(library_sites)
        trainable = count_parameters(self, trainable_only=True)
        logger.info(
            "trainable parameters: %s (TP %.2f%% of %s)",
            f"{trainable:,}",
            100.0 * trainable / self.base_parameter_count,
            f"{self.base_parameter_count:,}",
        )

    # ------------------------------------------------------------------ construction
    def _inject(self, layers: nn.ModuleList) -> None:
        a, method = self.config.adapter, self.method
        paths = ARCH_TARGETS[self.base_model.config.model_type]
        for idx, layer in enumerate(layers):
            router_of: dict[str, nn.Module] = {}
            for group in method.router_groups(idx):
                first = layer.get_submodule(paths[group[0]])
                router = method.build_router(
                    self, idx, group, first.in_features, method.experts_at(idx, group[0])
                ).to(first.weight.device)
                self.routers[f"layer{idx:02d}_{'_'.join(group)}"] = router
                router_of.update({t: router for t in group})
                if len(group) > 1:  # shared: one computation per call of the common parent
                    parent = layer.get_submodule(paths[group[0]].rpartition(".")[0])
                    parent.register_forward_pre_hook(router.new_round)
                    router.shared = True
            for target in TARGETS:
                experts = method.experts_at(idx, target)
                if experts is None:
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
                        num_experts=experts if router is not None else 1,
                        hydra=a.hydra,
                        router=router,
                        compute=a.compute,
                    ),
                )

    @torch.no_grad()
    def _load_library_experts(self, sites: list[dict[str, Any]]) -> None:
        """Expert i of every bank = the i-th library LoRA at that linear: rows ``i·R:(i+1)·R``
        of ``lora_A`` its A, columns ``i·R:(i+1)·R`` of ``lora_B`` its B."""
        for name, bank in self.adapted_modules().items():
            missing = [i for i, s in enumerate(sites) if name not in s]
            if missing:
                task = self.config.options["tasks"][missing[0]]
                raise ValueError(
                    f"library {self.config.options.get('library')}: the LoRA of task {task!r} "
                    f"has no tensors for {name}; rebuild that task"
                )
            a = torch.cat([s[name].A for s in sites])
            b = torch.cat([s[name].B for s in sites], dim=1)
            for tensor, value in ((bank.lora_A, a), (bank.lora_B, b)):
                with gathered([tensor], modify=True):
                    tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))

    def _note_cache(self, _module: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        """Before every base-model call (the wrapper's forward and each step of Hugging Face
        ``generate``): tell the routing context how many tokens the KV cache already holds."""
        self.routing_context.cached_tokens = cache_length(kwargs.get("past_key_values"))

    # ------------------------------------------------------------------ helpers
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
        self,
        embeds: torch.Tensor,
        prompt_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """The method's routing input for this batch (HMoRA: H_task of the tokens in
        ``prompt_mask``: pass :meth:`_task_mask`'s choice, which follows ``routing.task_input``)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(prompt_mask)
        batch = RoutingBatch(embeds, attention_mask.bool(), prompt_mask, extras or {})
        return self.method.routing_inputs(self, batch)

    def _batch_extras(self, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Pop the batch inputs the method routes on (:attr:`Method.batch_inputs`) from
        ``kwargs``; a missing one is an error naming it."""
        missing = [k for k in self.method.batch_inputs if k not in kwargs]
        if missing:
            raise ValueError(
                f"forward: method {self.method.name} routes on batch input(s) {missing}; "
                "pass them as keyword arguments (the collator's batch keys of that name)"
            )
        extras = {k: kwargs.pop(k) for k in self.method.batch_inputs}
        # Optional ones only when given (None counts as not given).
        for k in self.method.optional_batch_inputs:
            value = kwargs.pop(k, None)
            if value is not None:
                extras[k] = value
        return extras

    def task_representation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        **batch_inputs: torch.Tensor,
    ) -> torch.Tensor | None:
        """The method's routing input of a batch (HMoRA: H_task (B, D) from its instruction or
        prompt tokens per ``routing.task_input``; None without task routing). ``batch_inputs``:
        the method's extra batch tensors."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pmask = self._task_mask(
            {
                "attention_mask": attention_mask,
                "prompt_mask": prompt_mask,
                "instruction_mask": instruction_mask,
            }
        )
        extras = self._batch_extras(dict(batch_inputs))
        embeds = self.base_model.get_input_embeddings()(input_ids)
        return self._task_representation(embeds, pmask, attention_mask, extras)

    def _task_mask(self, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """(B, T) bool: the tokens the task encoder reads, from a batch dict (the collator's
        keys ``attention_mask``, ``labels``, ``prompt_mask``, ``instruction_mask``; missing or
        None = not given).

        ``routing.task_input="instruction"``: the raw instruction's tokens
        (``instruction_mask``, kept inside the prompt); without one, the prompt tokens with a
        one-time warning. ``"prompt"``: the prompt tokens (``prompt_mask``; without one, the
        unlabelled tokens, see :meth:`_resolve_prompt_mask`)."""
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(batch["input_ids"])
        pmask = self._resolve_prompt_mask(
            batch.get("prompt_mask"), attention_mask, batch.get("labels")
        )
        if self.config.routing.task_input == "prompt":
            return pmask
        imask = batch.get("instruction_mask")
        if imask is None:
            if self.task_encoder is not None and not self._warned_instruction_mask:
                logger.warning(
                    "forward: routing.task_input='instruction' but no instruction_mask given; "
                    "the task encoder reads the whole prompt. Pass the collator's "
                    "instruction_mask (or set routing.task_input=prompt)."
                )
                self._warned_instruction_mask = True
            return pmask
        if imask.shape != attention_mask.shape:
            raise ValueError(
                f"instruction_mask: shape {tuple(imask.shape)} must equal input_ids' "
                f"{tuple(attention_mask.shape)}"
            )
        return imask.bool() & pmask

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
        instruction_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        return_router_stats: bool = True,
        aux_group: Any = None,
        step_batches: list[dict[str, torch.Tensor]] | None = None,
        step_aux: bool = True,
        **model_kwargs: Any,
    ) -> HMoRAOutput:
        """Run the model on a batch.

        Args:
            input_ids: (B, T) token ids, left or right padded.
            attention_mask: (B, T) 1 on real tokens (default: all ones).
            labels: (B, T) target ids, -100 elsewhere; the LM loss covers these tokens only.
            prompt_mask: (B, T) 1 on prompt tokens: the task encoder never reads other tokens.
            instruction_mask: (B, T) 1 on the raw instruction's tokens inside the prompt (the
                collator's): the task encoder's input with ``routing.task_input=instruction``.
            position_ids: (B, T); default: counted from ``attention_mask`` (padding-safe).
            past_key_values / use_cache: KV cache; with a non-empty cache the task
                representation bound by the previous (prompt) forward is kept.
            return_router_stats: compute per-router statistics (detached).
            aux_group: process group over which routing statistics are global (None = local).
            step_batches: the optimizer step's *other* micro-batches on this rank (dicts with
                ``input_ids``, ``attention_mask``, ``prompt_mask`` and the method's batch
                inputs; host or device): the auxiliary losses of the method's step kinds
                (:attr:`~hmora_ds.methods.Method.step_aux_kinds`, HMoRA's task routers) then
                cover this batch and those, differentiably (the trainer passes them to the
                step's first micro-step).
            step_aux: compute the step kinds' losses in this forward (the trainer turns it
                off for the step's later micro-steps, whose sequences the first one covered).

        Returns:
            :class:`HMoRAOutput`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extras = self._batch_extras(model_kwargs)
        embeds = self.base_model.get_input_embeddings()(input_ids)
        decoding = cache_length(past_key_values) > 0
        if position_ids is None and not decoding:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        ctx = self.routing_context
        if decoding:
            scope = ctx.forward_scope(
                ctx.task_repr, None, record=False, expand_batch=True, inputs=ctx.inputs
            )
        else:
            pmask = self._task_mask(
                {
                    "attention_mask": attention_mask,
                    "labels": labels,
                    "prompt_mask": prompt_mask,
                    "instruction_mask": instruction_mask,
                }
            )
            task_repr = self._task_representation(embeds, pmask, attention_mask, extras)
            scope = ctx.forward_scope(task_repr, attention_mask.bool(), record=True, inputs=extras)
        chunked = self._chunked_loss(labels, use_cache)
        with scope as records:
            runner = self.base_model
            if chunked:  # the decoder alone: no logits (its call skips the pre-hook below)
                runner = self.base_model.get_decoder()
                self._note_cache(runner, (), {"past_key_values": past_key_values})
            out = runner(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **model_kwargs,
            )
        result = HMoRAOutput(
            logits=None if chunked else out.logits,
            past_key_values=out.past_key_values,
            routing_records=records,
        )
        step_kinds = self.method.step_aux_kinds
        aux_records = records
        if not step_aux:
            aux_records = [r for r in records if r.kind not in step_kinds]
        elif step_batches and any(r.kind in step_kinds for r in records):
            # Only a forward whose routers record a step kind re-encodes the other prompts
            # (a method without task routers pays nothing for step_batches).
            extra = self.method.step_records(self, self._step_routing_batch(step_batches))
            aux_records = merge_sequence_records(records, extra)
        terms = self.method.aux_losses(aux_records + ctx.observations, aux_group)
        result.aux_by_kind = {k: v.detach() for k, v in terms.items()}
        result.step_kinds = tuple(k for k in terms if k in step_kinds)
        result.aux_loss = self._sum(terms.values())
        result.aux_weighted = self._sum(self.method.aux_weight(k) * v for k, v in terms.items())
        result.aux_step_weighted = self._sum(
            self.method.aux_weight(k) * terms[k] for k in result.step_kinds
        )
        if return_router_stats and records:
            acc = RouterStatsAccumulator(self.stats_top_k)
            acc.add(records)
            result.router_stats = acc.finalize(aux_group)
        if labels is not None:
            if chunked:
                lm_sum, n_target = chunked_lm_loss_sum(
                    out.last_hidden_state,
                    self.base_model.get_output_embeddings().weight,
                    labels,
                    self.ce_chunk_tokens,
                    self.config.loss.label_smoothing,
                )
            else:
                lm_sum, n_target = self.lm_loss_sum(out.logits, labels)
            result.lm_loss_sum, result.num_target_tokens = lm_sum, n_target
            result.lm_loss = lm_sum / n_target.clamp_min(1)
            result.loss = total_loss(result.lm_loss, result.aux_weighted)
        return result

    def _chunked_loss(self, labels: torch.Tensor | None, use_cache: bool) -> bool:
        """Whether this forward computes its LM loss in chunks (no logits): a training forward
        with labels and ``ce_chunk_tokens`` set, on a base whose head is a plain bias-free
        linear, not partitioned by ZeRO-3 (there DeepSpeed's module hooks gather and release
        the head's weight, tied to the embedding's, around the module's own call: the loss
        comes from the logits)."""
        if not (self.ce_chunk_tokens and labels is not None and self.training) or use_cache:
            return False
        if not torch.is_grad_enabled():
            return False
        head = self.base_model.get_output_embeddings()
        if not isinstance(head, nn.Linear) or head.bias is not None:
            return False
        if getattr(self.base_model.config, "final_logit_softcapping", None):
            return False
        return not hasattr(head.weight, "ds_id")

    def _step_routing_batch(self, batches: list[dict[str, torch.Tensor]]) -> RoutingBatch:
        """The prompts of several micro-batches as one :class:`RoutingBatch`: rows
        concatenated, each cut after the last column any of its rows reads (the task encoder
        reads prompt tokens only) and right-padded to the widest (padding is masked out of the
        task encoder's mask, :meth:`_task_mask`, and the task encoder is padding-invariant).

        The trainer passes host tensors, so finding the cut needs no device sync."""
        device = self.base_model.get_input_embeddings().weight.device
        cut = []
        for b in batches:
            attn = b.get("attention_mask", torch.ones_like(b["input_ids"]))
            read = self._task_mask({**b, "attention_mask": attn})
            cols = read.any(dim=0).nonzero()
            width = int(cols.max()) + 1 if cols.numel() else 1
            cut.append((b["input_ids"][:, :width], attn[:, :width], read[:, :width]))
        width = max(ids.shape[1] for ids, _, _ in cut)

        def padded(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t.long(), (0, width - t.shape[1])).to(device, non_blocking=True)

        ids = torch.cat([padded(i) for i, _, _ in cut])
        attn = torch.cat([padded(a) for _, a, _ in cut]).bool()
        pmask = torch.cat([padded(m) for _, _, m in cut]).bool()
        names = list(self.method.batch_inputs) + [
            k
            for k in self.method.optional_batch_inputs
            if all(b.get(k) is not None for b in batches)
        ]
        extras = {k: torch.cat([b[k] for b in batches]).to(device) for k in names}
        embeds = self.base_model.get_input_embeddings()(ids)
        return RoutingBatch(embeds, attn, pmask, extras)

    @property
    def stats_top_k(self) -> int | None:
        """The k of expert-load shares (None with soft routing: load = mean probability)."""
        return self.method.stats_top_k

    def _sum(self, values) -> torch.Tensor:
        """Σ of loss terms as an fp32 scalar on the model's device (0 without terms)."""
        total = None
        for v in values:
            total = v if total is None else total + v
        if total is None:
            return torch.zeros((), device=next(self.parameters()).device)
        return total

    def lm_loss_sum(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over target tokens, with the config's label
        smoothing (:func:`lm_loss_sum`)."""
        return lm_loss_sum(logits, labels, self.config.loss.label_smoothing)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Hugging Face ``generate`` with task routing taken from the prompt.

        Works with the KV cache, left padding, batch > 1, sampling and beam search: the task
        representation is computed once from the prompt and bound for every decoding step
        (beams and return sequences repeat each prompt, which the context expands).
        ``instruction_mask``: as in :meth:`forward` (the collator's, for a prompt encoded by
        :meth:`~hmora_ds.data.collate.ChatEncoder.encode_generation_prompt`).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pmask = self._task_mask(
            {
                "attention_mask": attention_mask,
                "prompt_mask": prompt_mask,
                "instruction_mask": instruction_mask,
            }
        )
        extras = self._batch_extras(generate_kwargs)
        embeds = self.base_model.get_input_embeddings()(input_ids)
        task_repr = self._task_representation(embeds, pmask, attention_mask, extras)
        with self.routing_context.forward_scope(
            task_repr, None, record=False, expand_batch=True, inputs=extras
        ):
            return self.base_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
            )

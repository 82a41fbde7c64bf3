"""HMoRA: hierarchical hybrid routing of LoRA experts (the flagship; spec §1–5).

Paper: "HMoRA: Making LLMs More Effective with Hierarchical Mixture of LoRA Experts" (ICLR 2025).
What this file decides, and where it comes from:

- sites: every target of ``adapter.targets``; a routed bank of ``adapter.num_experts`` experts
  (eqs. 3–5) except ``adapter.single_lora_layers`` (one plain LoRA, appendix C); Hydra LoRA's
  shared A with ``adapter.hydra`` (appendix C);
- routers: per decoder layer a token router (eq. 6) and a task router over the task
  representation (eq. 7), mixed by α(l) = σ(−ε + 2ε·l/(L−1) + μ) (eq. 8); layers with
  α < β_low route by token only, α > β_high by task only (section 3.2); one router per shared
  input with ``routing.share_routers`` (appendix C); top-k with the paper's renormalisation
  (eqs. 15–16) or soft routing (eq. 14);
- routing input: the task encoder over the raw instruction's tokens (``routing.task_input``;
  the official code's input, the paper's T_in) or the whole prompt, never the targets; e_task
  without a position by default (``routing.task_slot_position``; section 3.3, spec §3);
- auxiliary loss: CGJS (eqs. 10–12) on every token and task router, or L_blc (eqs. 17–19) on
  the token routers (the official code's choice; ``loss.blc_task_routers`` adds the task
  routers). A task router's statistics cover every sequence of the optimizer step (the paper's
  batch of 12, which the official loop re-encodes once per step: ``loss.task_stats``), a token
  router's one micro-batch (:meth:`Method.step_records` in ``methods/base.py``).
The spec (``shared/spec/method.md``) resolves the paper's ambiguities; the routing context
(:mod:`hmora_ds.routing.context`) binds the task representation for every router.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from hmora_ds.base_model import gathered
from hmora_ds.methods.base import Method, RoutingBatch, register_method
from hmora_ds.routing.gates import layer_alphas, layer_modes
from hmora_ds.routing.task_encoder import TaskEncoder


@register_method
class HMoRA(Method):
    name = "hmora"
    preset = "hmora"
    presets = {"hmora_lw": "HMoRA w LW", "hmora": "HMoRA w/o LW"}  # noqa: RUF012
    order = 50
    components: ClassVar[tuple[str, ...]] = (
        "lora A", "lora B", "token routers", "task routers", "alpha", "task encoder", "e_task",
        "base model",
    )  # fmt: skip

    def modes(self, num_layers: int) -> list[str]:
        """Per layer: ``token``, ``hybrid`` or ``task`` routing (section 3.2)."""
        r = self.config.routing
        if r.task_encoder == "none":
            return ["token"] * num_layers
        return layer_modes(num_layers, r.eps, r.mu, r.beta_low, r.beta_high)

    @property
    def task_encoder_kind(self) -> str | None:
        """The task encoder the model builds (after :meth:`bind`), or None without one."""
        if not self.has_mixture or all(m == "token" for m in self.modes(self.num_layers)):
            return None
        return self.config.routing.task_encoder

    def validate_for_model(self, hidden_size: int, num_layers: int) -> None:
        if not self.has_mixture:
            return
        r = self.config.routing
        self.require(
            "routing.encoder_heads",
            r.task_encoder != "transformer" or hidden_size % r.encoder_heads == 0,
            f"({r.encoder_heads}) must divide the model's hidden size ({hidden_size})",
        )
        if r.task_encoder == "none":
            modes = layer_modes(num_layers, r.eps, r.mu, r.beta_low, r.beta_high)
            task_only = [i for i, m in enumerate(modes) if m == "task"]
            self.require(
                "routing.task_encoder",
                not task_only,
                f"'none' leaves layers {task_only} (α > beta_high={r.beta_high}) without any "
                "router; set routing.beta_high=1.0 or choose a task encoder",
            )

    def build_router(
        self, model: nn.Module, layer: int, targets: tuple[str, ...], in_features: int,
        num_experts: int,
    ) -> nn.Module:  # fmt: skip
        r = self.config.routing
        num_layers = model.base_model.config.num_hidden_layers
        return self.router_group(
            model, layer, targets, in_features, num_experts,
            layer_mode=self.modes(num_layers)[layer],
            alpha=layer_alphas(num_layers, r.eps, r.mu)[layer],
            learn_alpha=r.learn_alpha,
        )  # fmt: skip

    def build_modules(self, model: nn.Module, tokenizer: Any, task_token_id: int | None) -> None:
        """The task encoder, when some layer routes by task (section 3.3)."""
        if self.task_encoder_kind is None:
            model.task_encoder = None
            return
        weight = model.base_model.get_input_embeddings().weight
        if self.config.routing.task_encoder == "transformer" and weight.device.type != "meta":
            task_token_id = resolve_task_token_id(tokenizer, task_token_id)
        model.task_token_id = task_token_id
        model.task_encoder = build_task_encoder(
            self.config.routing, model.base_model.config.hidden_size, weight, task_token_id
        )

    def routing_inputs(self, model: nn.Module, batch: RoutingBatch) -> torch.Tensor | None:
        """H_task (B, D) from the task encoder's input tokens (``batch.prompt_mask``; None
        without task routing)."""
        if model.task_encoder is None:
            return None
        return model.task_encoder(batch.embeds, batch.prompt_mask)

    def component_of(self, name: str) -> str:
        if ".task_router." in name:
            return "task routers"
        if name.endswith("alpha_logit"):
            return "alpha"
        if name == "task_encoder.task_embedding":
            return "e_task"
        if name.startswith("task_encoder."):
            return "task encoder"
        return super().component_of(name)


def resolve_task_token_id(tokenizer: Any, task_token_id: int | None) -> int:
    """The token whose embedding initialises e_task: ``task_token_id``, else ``?``'s."""
    if task_token_id is not None:
        return task_token_id
    if tokenizer is None:
        raise ValueError(
            "task_token_id: the transformer task encoder initialises e_task from the "
            "embedding of '?'; pass tokenizer= or task_token_id="
        )
    ids = tokenizer.encode("?", add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"tokenizer: '?' is not a single token ({ids})")
    return ids[0]


def build_task_encoder(
    routing: Any, hidden_size: int, weight: torch.Tensor, task_token_id: int | None
) -> TaskEncoder:
    """The task encoder of ``routing`` (a :class:`~hmora_ds.config.RoutingConfig`) over the
    embedding table ``weight`` (V, D): e_task = the embedding of ``task_token_id``, positions
    scaled to the table's RMS (left zero / 1 on the ``meta`` device). Draws its random
    initialisation from the global torch RNG."""
    init, scale = None, 1.0
    if routing.task_encoder == "transformer" and weight.device.type != "meta":
        with gathered([weight]), torch.no_grad():
            init = weight[task_token_id].detach().float().clone()
            scale = weight.float().pow(2).mean().sqrt().item()
    return TaskEncoder(
        hidden_size,
        kind=routing.task_encoder,
        num_layers=routing.encoder_layers,
        num_heads=routing.encoder_heads,
        ffn_mult=routing.encoder_ffn_mult,
        dropout=routing.encoder_dropout,
        init_task_embedding=init,
        position_scale=scale,
        slot_position=routing.task_slot_position,
    ).to(weight.device)

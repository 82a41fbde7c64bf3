"""MixLoRA: top-k LoRA experts on the FFN layers, plain LoRA on attention, load balancing.

Paper: Li et al., "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based
Mixture of Experts" (2024), as the HMoRA paper's baseline (appendix E.2): per FFN linear a
token router, top-2 of 8 experts (gates renormalised over the kept experts), the Switch-style
load-balancing loss ``E · Σ_i F_i P_i`` (HMoRA eqs. 17–19) with weight 0.01; the attention
layers carry one plain LoRA each (``adapter.single_lora_layers``).
"""

from __future__ import annotations

from hmora_ds.methods.base import Method, register_method


@register_method
class MixLoRA(Method):
    name = "mixlora"
    preset = "mixlora"
    presets = {"mixlora": "MixLoRA"}  # noqa: RUF012
    order = 30

    def validate(self) -> None:
        c = self.config
        self.require("routing.mode", c.routing.mode == "topk", "must be topk (MixLoRA is sparse)")
        self.require("routing.task_encoder", c.routing.task_encoder == "none",
                     "must be none: MixLoRA routes tokens only")  # fmt: skip
        self.require("adapter.hydra", not c.adapter.hydra, "must be false")
        self.require("loss.aux", c.loss.aux in ("blc", "none"), "must be blc (or none)")

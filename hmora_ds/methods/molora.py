"""MoLoRA: a soft mixture of LoRA experts per FFN layer, routed per token.

Paper: Zadouri et al., "Pushing Mixture of Experts to the Limit: Extremely Parameter Efficient
MoE for Instruction Tuning" (ICLR 2024), the HMoRA paper's MoLoRA baseline (appendix E.2):
a token router ``softmax(W x)`` per adapted linear (eq. 14), every expert weighted by its
probability, no auxiliary loss. Top-k (``routing.mode=topk``) and a load-balancing loss
(``loss.aux=blc``) are available as options; task routing is not part of the method.
"""

from __future__ import annotations

from hmora_ds.methods.base import Method, register_method


@register_method
class MoLoRA(Method):
    name = "molora"
    preset = "molora"
    presets = {"molora": "MoLoRA"}  # noqa: RUF012
    order = 20

    def validate(self) -> None:
        c = self.config
        self.require("routing.task_encoder", c.routing.task_encoder == "none",
                     "must be none: MoLoRA routes tokens only; use method=hmora for task "
                     "routing")  # fmt: skip
        self.require("adapter.hydra", not c.adapter.hydra,
                     "must be false; use method=hydralora for a shared A")  # fmt: skip
        self.require("loss.aux", c.loss.aux in ("none", "blc"), "must be none or blc")

"""HydraLoRA: one shared A, E heads B_i, mixed by a token router.

Paper: Tian et al., "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning"
(NeurIPS 2024), as the HMoRA paper's baseline (appendix E.2): on every adapted linear the
input is projected once by the shared ``A`` (R rows), each head ``B_i`` reads it, and a token
router's soft probabilities weight the heads; no auxiliary loss.
"""

from __future__ import annotations

from hmora_ds.methods.base import Method, register_method


@register_method
class HydraLoRA(Method):
    name = "hydralora"
    preset = "hydralora"
    presets = {"hydralora": "HydraLoRA"}  # noqa: RUF012
    order = 40

    def validate(self) -> None:
        c = self.config
        self.require("adapter.hydra", c.adapter.hydra, "must be true (a shared A is the method)")
        self.require("routing.task_encoder", c.routing.task_encoder == "none",
                     "must be none: HydraLoRA routes tokens only")  # fmt: skip

"""LoRA: one plain low-rank adapter per target layer, no experts, no router.

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022); the
initialisation (A Kaiming-uniform, B = 0) and scaling α/r (α/√r with ``adapter.rslora``) follow
PEFT's ``LoraLayer``. The HMoRA paper's baselines (table 3) are r = 8 and r = 64 on all seven
dense layers: presets ``lora_r8`` and ``lora_r64``.
"""

from __future__ import annotations

from hmora_ds.methods.base import Method, register_method


@register_method
class LoRA(Method):
    name = "lora"
    preset = "lora_r8"
    presets = {"lora_r8": "LoRA r = 8", "lora_r64": "LoRA r = 64"}  # noqa: RUF012
    order = 10
    components = ("lora A", "lora B", "base model")

    def validate(self) -> None:
        a = self.config.adapter
        self.require("adapter.num_experts", a.num_experts == 1,
                     f"must be 1: one plain LoRA per layer (got {a.num_experts}); "
                     "use method=molora or method=hmora for experts")  # fmt: skip
        self.require("loss.aux", self.config.loss.aux == "none",
                     "must be none: plain LoRA has no router")  # fmt: skip

    @property
    def has_mixture(self) -> bool:
        return False

    def experts_at(self, layer: int, target: str) -> int | None:
        return 1 if target in self.config.adapter.targets else None

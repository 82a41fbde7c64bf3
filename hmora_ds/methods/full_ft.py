"""Full fine-tuning: every base parameter trains; no adapters, no routers (HMoRA appendix E.2)."""

from __future__ import annotations

from hmora_ds.methods.base import Method, register_method


@register_method
class FullFineTune(Method):
    name = "full_ft"
    preset = "full_ft"
    presets = {"full_ft": "Full FT"}  # noqa: RUF012
    order = 0
    components = ("base model",)

    def validate(self) -> None:
        self.require("full_finetune", self.config.full_finetune, "must be true")

    @property
    def has_mixture(self) -> bool:
        return False

    def experts_at(self, layer: int, target: str) -> int | None:
        return None

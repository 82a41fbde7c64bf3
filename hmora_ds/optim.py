"""Optimizer parameter groups: LoRA+ (B at η_B·lr) and no weight decay where it does not belong.

LoRA+ (Hayou et al., 2024; HMoRA appendix C) trains the ``B`` matrices with learning rate
``η_B · lr``. Biases, norms, ``e_task`` and a learnable α get no weight decay.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hmora_ds.methods import adapter_parameters


def _no_decay(param: nn.Parameter) -> bool:
    # Biases, norm scales, e_task (all 1-D) and α (0-D): exactly the tensors with ndim < 2.
    return param.ndim < 2


def lora_plus_param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, eta_b: float | None = None
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim.AdamW`` (or a DeepSpeed client optimizer).

    Args:
        model: an :class:`~hmora_ds.model.HMoRAModel` (or any module; ``lora_B`` names the Bs).
        lr: base learning rate.
        weight_decay: applied to matrices other than norms and ``e_task``.
        eta_b: LoRA+ ratio; default: the model config's ``adapter.eta_b`` (1 = plain LoRA).

    Returns:
        Non-empty groups, each with ``name``, ``params``, ``lr`` and ``weight_decay``.
    """
    if eta_b is None:
        cfg = getattr(model, "config", None)
        eta_b = getattr(getattr(cfg, "adapter", None), "eta_b", 1.0)
    groups: dict[str, dict[str, Any]] = {
        "decay": {"name": "decay", "params": [], "lr": lr, "weight_decay": weight_decay},
        "lora_B": {"name": "lora_B", "params": [], "lr": lr * eta_b, "weight_decay": weight_decay},
        "no_decay": {"name": "no_decay", "params": [], "lr": lr, "weight_decay": 0.0},
    }
    for name, param in adapter_parameters(model).items():
        if name.endswith("lora_B"):
            key = "lora_B"
        elif _no_decay(param):
            key = "no_decay"
        else:
            key = "decay"
        groups[key]["params"].append(param)
    return [g for g in groups.values() if g["params"]]

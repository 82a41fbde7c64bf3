"""Optimizer parameter groups: LoRA+ (B at η_B·lr), the routing lr multiplier, and no weight
decay where it does not belong.

LoRA+ (Hayou et al., 2024; HMoRA appendix C) trains the ``B`` matrices with learning rate
``η_B · lr``. ``train.router_lr_mult`` trains the routers (token and task routers, a learnable
α) at ``router_lr_mult · lr``; the method names which parameters those are
(:meth:`~hmora_ds.methods.base.Method.component_of`). The task encoder and ``e_task`` keep the
plain lr: at 20 × lr, Adam moved each encoder weight by up to ten times its initial size within
40 steps, the FFN's weight norms doubled and every prompt's H_task turned into one direction
(mean cosine 1.000), so the task routers had nothing left to tell tasks apart by. Biases, norms,
``e_task`` and a learnable α get no weight decay.

Every group carries its own peak ``lr``; the schedule (a ``LambdaLR``,
:mod:`hmora_ds.train.schedule`) multiplies each group's initial lr by the same factor, so the
ratios between groups hold through warm-up and decay.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hmora_ds.methods import adapter_parameters

#: The components (as the methods name them) whose lr ``router_lr_mult`` scales: the routers'
#: linear maps and α, not the task encoder (see the module docstring).
ROUTING_COMPONENTS = frozenset({"token routers", "task routers", "sentence routers", "alpha"})


def _no_decay(param: nn.Parameter) -> bool:
    # Biases, norm scales, e_task (all 1-D) and α (0-D): exactly the tensors with ndim < 2.
    return param.ndim < 2


def lora_plus_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    eta_b: float | None = None,
    router_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim.AdamW`` (or a DeepSpeed client optimizer).

    Args:
        model: an :class:`~hmora_ds.model.HMoRAModel` (or any module; ``lora_B`` names the Bs).
        lr: base learning rate.
        weight_decay: applied to matrices other than norms and ``e_task``.
        eta_b: LoRA+ ratio; default: the model config's ``adapter.eta_b`` (1 = plain LoRA).
        router_lr_mult: lr multiplier of the routing parameters (:data:`ROUTING_COMPONENTS`
            of the model's method). At 1 they stay in the plain groups, so the group layout
            (and checkpoints' optimizer states) are those of a run without it.

    Returns:
        Non-empty groups, each with ``name``, ``params``, ``lr`` and ``weight_decay``.

    Raises:
        ValueError: ``router_lr_mult`` is not positive, or is not 1 for a model without a
            method to name its routing parameters.
    """
    if not router_lr_mult > 0:
        raise ValueError(f"train.router_lr_mult: must be > 0, got {router_lr_mult}")
    if eta_b is None:
        cfg = getattr(model, "config", None)
        eta_b = getattr(getattr(cfg, "adapter", None), "eta_b", 1.0)
    method = getattr(model, "method", None)
    scale_routing = router_lr_mult != 1.0
    if scale_routing and method is None:
        raise ValueError(
            "train.router_lr_mult: this model has no method to name its routing parameters; "
            "use an HMoRAModel or leave it at 1"
        )
    router_lr = lr * router_lr_mult
    groups: dict[str, dict[str, Any]] = {
        name: {"name": name, "params": [], "lr": group_lr, "weight_decay": decay}
        for name, group_lr, decay in (
            ("decay", lr, weight_decay),
            ("lora_B", lr * eta_b, weight_decay),
            ("no_decay", lr, 0.0),
            ("router_decay", router_lr, weight_decay),
            ("router_no_decay", router_lr, 0.0),
        )
    }
    for name, param in adapter_parameters(model).items():
        routing = scale_routing and method.component_of(name) in ROUTING_COMPONENTS
        if name.endswith("lora_B"):
            key = "lora_B"
        elif _no_decay(param):
            key = "router_no_decay" if routing else "no_decay"
        else:
            key = "router_decay" if routing else "decay"
        groups[key]["params"].append(param)
    return [g for g in groups.values() if g["params"]]

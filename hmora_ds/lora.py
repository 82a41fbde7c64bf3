"""The MoRA block: a frozen dense layer plus a routed mixture of LoRA experts (spec §1, eqs. 3–5).

Shapes: ``N…`` leading dims (B, T), ``I`` in_features, ``O`` out_features, ``E`` experts,
``R`` rank.

    Z = base(X) + s · Σ_i g_i · (dropout(X) A_i) B_i

All experts are one computation, whatever E: ``H = dropout(X) · [A_1 … A_E]`` (width E·R), scale
each R-wide slice by its gate, then ``H · [B_1; …; B_E]``: two GEMMs, dropout once. Expert ``i``
owns rows ``i·R:(i+1)·R`` of ``lora_A`` and columns ``i·R:(i+1)·R`` of ``lora_B``.
Hydra LoRA shares one A (``lora_A`` has R rows). A single LoRA is the E = 1 case with no router.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hmora_ds.routing.gates import RouterGroup


class MoRALinear(nn.Module):
    """An adapted ``nn.Linear``: the original module is kept and called, never copied.

    Args:
        base: the frozen original linear (under ZeRO-3 its weight is a partitioned parameter,
            so sizes come from ``in_features`` / ``out_features``).
        rank: LoRA rank R.
        alpha: ``lora_alpha``; scaling ``alpha / R`` (``alpha / sqrt(R)`` with ``rslora``).
        dropout: dropout on the experts' input.
        num_experts: E (1 with ``router=None`` = plain LoRA).
        hydra: share one ``A`` across the experts.
        router: the router group of this layer's input, or None for a single LoRA.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        rslora: bool = False,
        dropout: float = 0.0,
        num_experts: int = 1,
        hydra: bool = False,
        router: RouterGroup | None = None,
    ) -> None:
        super().__init__()
        if router is None and num_experts != 1:
            raise ValueError("MoRALinear: a mixture of experts (num_experts > 1) needs a router")
        self.base_layer = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.num_experts = num_experts
        self.hydra = hydra and num_experts > 1
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        a_rows = rank if (self.hydra or num_experts == 1) else num_experts * rank
        # Adapters are fp32 whatever the base dtype (bf16 autocast computes in bf16).
        self.lora_A = nn.Parameter(torch.empty(a_rows, self.in_features, device=device))
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, num_experts * rank, device=device)
        )
        # Routers are owned by the wrapper model (one group can serve q, k and v); keep a
        # reference outside the module tree so their parameters are registered once.
        self._router = (router,)
        self.reset_parameters()

    @property
    def router(self) -> RouterGroup | None:
        return self._router[0]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (for code that inspects ``module.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def reset_parameters(self) -> None:
        """A: Kaiming-uniform per expert like PEFT (bound 1/sqrt(I)); B = 0 so Z = base(X)."""
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.lora_A.dtype)
        h = F.linear(h, self.lora_A)  # (N…, E·R) or (N…, R) for hydra / single LoRA
        router = self.router
        if router is not None:
            gates = router.gates(x)  # (B, T, E) or (B, 1, E), fp32
            r, e = self.rank, self.num_experts
            if self.hydra:
                h = h.unsqueeze(-2) * gates.unsqueeze(-1)  # (N…, E, R)
            else:
                h = h.unflatten(-1, (e, r)) * gates.unsqueeze(-1)
            h = h.flatten(-2)
        delta = F.linear(h, self.lora_B) * self.scaling
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        kind = "lora" if self.router is None else ("hydra" if self.hydra else "mora")
        return (
            f"{kind}, in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"experts={self.num_experts}, scaling={self.scaling:g}"
        )

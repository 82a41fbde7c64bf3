"""A per-expert-loop MoRA block, written the way peer mixture-of-LoRA frameworks do it.

Kept in the benchmark only, as the comparison point for :mod:`hmora_ds.lora` (and in the tests,
to check the three computations agree). Per expert: select the tokens routed to it
(``nonzero``), apply that expert's own dropout and LoRA, weight by the gate and ``index_add``
the result back. Soft routing runs every expert on every token. It shares the parameters of a
:class:`~hmora_ds.lora.MoRALinear`, so outputs and gradients are directly comparable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from hmora_ds.lora import MoRALinear


def loop_forward(block: MoRALinear, x: torch.Tensor) -> torch.Tensor:
    out = block.base_layer(x)
    router = block.router
    if router is None:  # a single LoRA is not a mixture: nothing to loop over
        h = F.linear(F.linear(block.dropout(x), block.lora_A), block.lora_B) * block.scaling
        return out + h.to(out.dtype)
    gates = router.gates(x)  # (B, T, E) or (B, 1, E)
    e, r = block.num_experts, block.rank
    flat_x = x.reshape(-1, x.shape[-1])
    flat_g = gates.expand(*x.shape[:-1], e).reshape(-1, e)
    result = torch.zeros(flat_x.shape[0], block.out_features, device=x.device, dtype=out.dtype)
    for i in range(e):
        a = block.lora_A if block.hydra else block.lora_A[i * r : (i + 1) * r]
        b = block.lora_B[:, i * r : (i + 1) * r]
        if router.mode == "topk":
            rows = torch.nonzero(flat_g[:, i] > 0).squeeze(-1)  # a host sync per expert
            if rows.numel() == 0:
                continue
            xi, gi = flat_x[rows], flat_g[rows, i : i + 1]
        else:
            rows, xi, gi = None, flat_x, flat_g[:, i : i + 1]
        yi = F.linear(F.linear(block.dropout(xi), a), b) * block.scaling * gi
        if rows is None:
            result = result + yi.to(result.dtype)
        else:
            result = result.index_add(0, rows, yi.to(result.dtype))
    return out + result.view(out.shape)


def per_expert_dropout_forward(block: MoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Dense experts, but with an independent dropout mask per expert (the input copied E
    times), as implementations that wrap one LoRA module per expert do."""
    router = block.router
    if router is None or (router.mode == "topk" and block.sparse):
        return _ORIGINAL_FORWARD(block, x)
    out = block.base_layer(x)
    e, r = block.num_experts, block.rank
    xe = block.dropout(x.unsqueeze(-2).expand(*x.shape[:-1], e, x.shape[-1]))  # (…, E, I)
    a = block.lora_A.view(-1, r, block.in_features)  # (E, R, I) or (1, R, I) for hydra
    h = torch.einsum("...ei,eri->...er", xe, a.expand(e, r, block.in_features))
    h = (h * router.gates(x).unsqueeze(-1)).flatten(-2)
    return out + (F.linear(h, block.lora_B) * block.scaling).to(out.dtype)


_ORIGINAL_FORWARD = MoRALinear.forward


@contextlib.contextmanager
def _forward_as(forward) -> Iterator[None]:
    """Within the block, every :class:`MoRALinear` computes with ``forward``."""
    MoRALinear.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        MoRALinear.forward = _ORIGINAL_FORWARD  # type: ignore[method-assign]


def per_expert_dropout() -> contextlib.AbstractContextManager:
    """Within the block, mixture blocks draw one dropout mask per expert."""
    return _forward_as(per_expert_dropout_forward)


def per_expert_loop() -> contextlib.AbstractContextManager:
    """Within the block, every :class:`MoRALinear` computes with :func:`loop_forward`."""
    return _forward_as(loop_forward)

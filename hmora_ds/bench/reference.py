"""Reference computations of a MoRA block for the benchmark, as peer frameworks compute them.

- the per-expert loop: :class:`~hmora_ds.experts.LoopDispatcher` (select each expert's tokens,
  apply its own dropout and LoRA, weight by the gate, ``index_add`` back);
- dense experts with an independent dropout mask per expert (the input copied E times), as
  implementations that wrap one LoRA module per expert do: :class:`PerExpertDropout`.

Both are dispatchers set on the model's own blocks for the duration of a ``with`` block
(:func:`~hmora_ds.experts.use_dispatcher`); they share the blocks' parameters, so outputs and
gradients are directly comparable with the dense and sparse paths.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from hmora_ds.experts import Dispatcher, LoopDispatcher, SparseDispatcher, use_dispatcher


class PerExpertDropout(Dispatcher):
    """Dense experts, one dropout mask per expert (sparse blocks stay sparse)."""

    name = "dropout per expert"

    def delta(self, block, h: torch.Tensor, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        if block.sparse:
            return SparseDispatcher().delta(block, h, x, gates)
        e, r = block.num_experts, block.rank
        xe = block.dropout(x.unsqueeze(-2).expand(*x.shape[:-1], e, x.shape[-1])).to(h.dtype)
        a = block.lora_A.view(-1, r, block.in_features)  # (E, R, I) or (1, R, I) for hydra
        hid = torch.einsum("...ei,eri->...er", xe, a.expand(e, r, block.in_features))
        hid = (hid * gates.unsqueeze(-1)).flatten(-2)
        return F.linear(hid, block.lora_B) * block.scaling


def per_expert_dropout(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within the block, the mixture blocks of ``model`` draw one dropout mask per expert."""
    return use_dispatcher(model, PerExpertDropout())


def per_expert_loop(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within the block, the mixture blocks of ``model`` compute with a loop over experts."""
    return use_dispatcher(model, LoopDispatcher())

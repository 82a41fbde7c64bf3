"""Dropout on an expert bank's input that keeps a 1-byte mask and no dropped copy.

``Z = base(X) + s · Σ_i g_i · (dropout(X) A_i) B_i`` needs ``dropout(X)`` in the backward (for
the gradient of ``A``), and ordinary dropout on CPU also keeps its mask as an fp32 tensor the
size of ``X``. Each adapted linear draws its own mask, so q, k and v (which read the same ``X``)
kept three fp32 masks and three dropped copies: 6 × the size of ``X``, for 7 adapted linears per
layer the largest share of an adapter's activations. Here each linear keeps its mask as booleans
(¼ of an fp32 copy) and the dropped input is rebuilt from ``X`` and the mask when the backward
needs it; ``X`` itself is kept once for every linear that reads it. The values are ordinary
dropout's (a Bernoulli(1 − p) mask per linear and call, scaled by 1 / (1 − p)); on CUDA the mask
comes from the same fused kernel as ``nn.Dropout``'s, on CPU from ``rand > p`` (as fast as
``nn.Dropout``'s Bernoulli draw there, measured).

Written here because no library keeps the dropped input recomputable outside ``torch.compile``
(compiled, this module is an ordinary dropout: inductor already decides what to keep).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


class _Dropout(torch.autograd.Function):
    """``(x · mask / (1 − p), mask)`` with a boolean mask, kept for the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float):  # type: ignore[override]
        if x.is_cuda:
            h, mask = torch.native_dropout(x, p, True)
        else:
            mask = torch.rand_like(x, dtype=torch.float32) > p
            h = (x * mask).mul_(1.0 / (1.0 - p))
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(mask)
        return h, mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _mask: Any):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return (grad * mask).mul_(ctx.scale), None


class InputDropout(nn.Dropout):
    """``nn.Dropout`` whose :meth:`recomputable` form keeps a boolean mask, no dropped copy.

    Called as a module it is plain ``nn.Dropout`` (the benchmark's per-expert reference).
    """

    def recomputable(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, contextlib.AbstractContextManager]:
        """``(dropout(x), scope)``: run the operations that read the dropped tensor inside
        ``scope``; whatever of it they keep for the backward is kept as ``x`` and the mask,
        and rebuilt when the backward needs it."""
        if not (self.training and self.p > 0) or torch.compiler.is_compiling():
            return super().forward(x), contextlib.nullcontext()
        h, mask = _Dropout.apply(x, self.p)
        if not h.is_contiguous():
            return h, contextlib.nullcontext()
        scale, storage, inp = 1.0 / (1.0 - self.p), h.untyped_storage().data_ptr(), x.detach()
        version = x._version
        # Saved-tensor hooks do not nest (the innermost wins): pass everything else to the
        # enclosing ones. Under activation checkpointing (whose hooks drop what the layer saves
        # and recompute it) the dropped tensor is left to the checkpoint; an observer that only
        # counts saved bytes (``observes_saved_tensors``) is shown what is kept instead: x.
        # Another recomputable dropout's scope around this one (a router called inside its
        # experts' scope) is looked through: what decides is the hooks around it, which each
        # scope records on its pack function.
        outer = _enclosing_hooks()
        base = outer if outer is None else getattr(outer[0], _SCOPE, outer)
        observer = base is not None and getattr(base[0], OBSERVER, False)
        recompute = base is None or observer

        def pack(t: torch.Tensor) -> Any:
            # h itself or a view of it (a linear saves its 2-D reshape): kept as the mask.
            mine = t.untyped_storage().data_ptr() == storage and t.dtype == h.dtype
            if mine and recompute:
                if observer:
                    outer[0](inp)
                return (_Recompute, t.size(), t.stride(), t.storage_offset())
            return t if outer is None else outer[0](t)

        setattr(pack, _SCOPE, base)

        def unpack(saved: Any) -> torch.Tensor:
            if not (isinstance(saved, tuple) and saved and saved[0] is _Recompute):
                return saved if outer is None else outer[1](saved)
            _, size, stride, offset = saved
            if inp._version != version:
                raise RuntimeError(
                    "InputDropout: the adapted linear's input was modified in place after "
                    "the forward; its dropout cannot be recomputed"
                )
            full = (inp * mask).mul_(scale).contiguous()
            return full.as_strided(size, stride, offset)

        return h, torch.autograd.graph.saved_tensors_hooks(pack, unpack)


#: An outer ``saved_tensors_hooks`` pack function with this attribute set only observes (it
#: returns its argument): it is shown the tensors actually kept (the benchmark's memory count).
OBSERVER = "observes_saved_tensors"
#: Set on a recomputable dropout's own pack function: the hooks that decide for that scope
#: (the first enclosing ones that are not such a scope), or None.
_SCOPE = "_input_dropout_enclosing_hooks"


def _enclosing_hooks() -> tuple[Any, Any] | None:
    """The saved-tensor hooks active around this call (PyTorch keeps them on a stack)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return None if top is None else top(False)


class _Recompute:
    """Marks a saved tensor rebuilt from the input and the mask (see ``recomputable``)."""

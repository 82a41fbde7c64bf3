"""Dropout on an expert bank's input that keeps neither its mask nor the dropped copy.

``Z = base(X) + s · Σ_i g_i · (dropout(X) A_i) B_i`` needs ``dropout(X)`` in the backward (for
the gradient of ``A``) and plain dropout keeps its mask too (on CPU an fp32 tensor the size of
``X``). Each adapted linear draws its own mask, so q, k and v (which read the same ``X``) kept
three masks and three dropped copies: 6 × the size of ``X``, for 7 adapted linears per layer the
largest share of an adapter's activations. Here the mask comes from a seed drawn per call
(from torch's global generator, on the host: no device sync), and the backward regenerates it
from that seed: what is kept is ``X`` itself (one tensor for q, k and v together) and an integer.
The values are those of ordinary dropout (an independent Bernoulli(1 − p) mask per call, scaled
by 1 / (1 − p)), the masks differ from ``nn.Dropout``'s only in which random numbers they use.

Costs: the mask is drawn three times (forward, and in the backward for the input gradient and
for ``A``'s gradient) instead of once. Written here because no library keeps dropout
recomputable outside ``torch.compile`` (where inductor already regenerates masks in the backward:
compiled, this module is an ordinary dropout).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

_SEED_RANGE = 2**62


def _mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    return torch.empty_like(like).bernoulli_(1.0 - p, generator=gen).div_(1.0 - p)


class _SeededDropout(torch.autograd.Function):
    """``x · mask(seed)``; the backward draws the same mask again (nothing is saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:  # type: ignore[override]
        ctx.p, ctx.seed = p, seed
        return x * _mask(x, p, seed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        return grad * _mask(grad, ctx.p, ctx.seed), None, None


class InputDropout(nn.Dropout):
    """``nn.Dropout`` whose :meth:`recomputable` form keeps no mask and no dropped copy.

    Called as a module it is plain ``nn.Dropout`` (the benchmark's per-expert reference).
    """

    def recomputable(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, contextlib.AbstractContextManager]:
        """``(dropout(x), scope)``: run the operations that read the dropped tensor inside
        ``scope``; whatever of it they keep for the backward is kept as ``(x, seed)`` and
        rebuilt when the backward needs it."""
        if not (self.training and self.p > 0) or torch.compiler.is_compiling():
            return super().forward(x), contextlib.nullcontext()
        seed = int(torch.randint(_SEED_RANGE, (1,)).item())  # the host's generator: no sync
        h = _SeededDropout.apply(x, self.p, seed)
        if not h.is_contiguous():
            return h, contextlib.nullcontext()
        p, storage, inp = self.p, h.untyped_storage().data_ptr(), x.detach()
        version = x._version
        # Saved-tensor hooks do not nest (the innermost wins): pass everything else to the
        # enclosing ones. Under activation checkpointing (whose hooks drop what the layer saves
        # and recompute it) the dropped tensor is left to the checkpoint; an observer that only
        # counts saved bytes (``observes_saved_tensors``) is shown what is kept instead: x.
        outer = _enclosing_hooks()
        observer = outer is not None and getattr(outer[0], OBSERVER, False)

        def pack(t: torch.Tensor) -> Any:
            # h itself or a view of it (a linear saves its 2-D reshape): kept as the seed.
            mine = t.untyped_storage().data_ptr() == storage and t.dtype == h.dtype
            if mine and (outer is None or observer):
                if observer:
                    outer[0](inp)
                return (_Recompute, seed, t.size(), t.stride(), t.storage_offset())
            return t if outer is None else outer[0](t)

        def unpack(saved: Any) -> torch.Tensor:
            if not (isinstance(saved, tuple) and saved and saved[0] is _Recompute):
                return saved if outer is None else outer[1](saved)
            _, s, size, stride, offset = saved
            if inp._version != version:
                raise RuntimeError(
                    "InputDropout: the adapted linear's input was modified in place after "
                    "the forward; its dropout cannot be recomputed"
                )
            full = (inp * _mask(inp, p, s)).contiguous()
            return full.as_strided(size, stride, offset)

        return h, torch.autograd.graph.saved_tensors_hooks(pack, unpack)


#: An outer ``saved_tensors_hooks`` pack function with this attribute set only observes (it
#: returns its argument): it is shown the tensors actually kept (the benchmark's memory count).
OBSERVER = "observes_saved_tensors"


def _enclosing_hooks() -> tuple[Any, Any] | None:
    """The saved-tensor hooks active around this call (PyTorch keeps them on a stack)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return None if top is None else top(False)


class _Recompute:
    """Marks a saved tensor kept as ``(input, seed)`` (see :meth:`InputDropout.recomputable`)."""

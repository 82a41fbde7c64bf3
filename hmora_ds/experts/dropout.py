"""Dropout on an expert bank's input that keeps a 1-byte mask and no dropped copy.

``Z = base(X) + s · Σ_i g_i · (dropout(X) A_i) B_i`` needs ``dropout(X)`` in the backward (for
the gradient of ``A``), and ordinary dropout on CPU also keeps its mask as an fp32 tensor the
size of ``X``. Each adapted linear draws its own mask, so q, k and v (which read the same ``X``)
kept three fp32 masks and three dropped copies: 6 × the size of ``X``, for 7 adapted linears per
layer the largest share of an adapter's activations. Here each linear keeps its mask in one byte
per element (¼ of an fp32 copy) and the dropped input is rebuilt from ``X`` and the mask when the
backward needs it; ``X`` itself is kept once for every linear that reads it. The values are ordinary
dropout's (a Bernoulli(1 − p) mask per linear and call, scaled by 1 / (1 − p)); on CUDA the mask
comes from the same fused kernel as ``nn.Dropout``'s, on CPU from four 16-bit draws per 64-bit
random number of a generator seeded from torch's (:func:`_cpu_keep_mask`; ``p`` rounded to a
multiple of 2⁻¹⁶).

Written here because no library keeps the dropped input recomputable outside ``torch.compile``
(compiled, this module is an ordinary dropout: inductor already decides what to keep).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn


class _Dropout(torch.autograd.Function):
    """``(dropout(x), mask)`` with a 1-byte keep-mask, kept for the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float):  # type: ignore[override]
        scale = 1.0 / (1.0 - p)
        h, mask = _draw(x, p, scale)
        ctx.scale = scale
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(mask)
        return h, mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _mask: Any):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return _apply(grad, mask, ctx.scale), None


class _DropoutLinear(torch.autograd.Function):
    """``alpha · dropout(x) · Wᵀ (+ b)`` as one node that keeps ``x``, the 1-byte mask and ``W``
    for the backward, never the dropped copy (which the gradient of ``W`` rebuilds).

    The same saved tensors as :meth:`InputDropout.recomputable` around ``F.linear``, without its
    per-call saved-tensor hooks and closures: on a GPU, where an eager step is bound by the host
    issuing kernels, those were the adapters' largest host cost. Dropout's ``1 / (1 − p)`` and
    the caller's ``alpha`` (a LoRA's scaling) are one factor of the matrix products (``addmm``'s
    ``alpha``), never a pass of their own over a tensor: forward and backward each multiply by
    the mask once and otherwise only run GEMMs. Under autocast the products run in the autocast
    dtype, as ``F.linear`` does; the backward computes in the gradient's dtype and returns each
    gradient in its input's dtype (what autocast's casts do for ``F.linear``).
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, p: float, alpha: float):  # type: ignore[override]
        if x.device.type == "cpu":
            mask = _cpu_keep_mask(x, p)
            kept, factor = x * mask, alpha / (1.0 - p)
        else:  # one fused kernel (nn.Dropout's); its output is already scaled by 1 / (1 - p)
            kept, mask = torch.native_dropout(x, p, True)
            factor = alpha
        ctx.factor = alpha / (1.0 - p)  # of the backward's x ⊙ mask
        ctx.save_for_backward(x, mask, weight)
        ctx.has_bias = bias is not None
        out = scaled_mm(kept.reshape(-1, x.shape[-1]), weight.t(), factor, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        x, mask, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if mask.device.type == "cpu" and all(ctx.needs_input_grad[:2]):
            # On the CPU a product with the 1-byte mask first casts it to a full temporary
            # (CPU kernels do not cast inside the loop): cast once for both products here.
            # (CUDA kernels cast in the loop; a cast there would be one more kernel.)
            mask = mask.to(grad.dtype)
        if ctx.needs_input_grad[0]:
            gx = scaled_mm(g2, weight.to(grad.dtype), ctx.factor)
            if gx.dtype == x.dtype:
                # masked in place (gx is this node's own product), and returned in x's shape
                # as a tensor of its own, not a view of gx: autograd then adds x's other
                # gradients into it in place too (it cannot accumulate into a view)
                grad_x = torch.ops.aten._unsafe_view(gx.mul_(mask.view(gx.shape)), x.shape)
            else:
                grad_x = (gx.view(x.shape) * mask).to(x.dtype)
        if ctx.needs_input_grad[1]:
            kept = (x * mask).to(grad.dtype).reshape(-1, x.shape[-1])
            grad_w = scaled_mm(g2.t(), kept, ctx.factor).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def scaled_mm(
    a: torch.Tensor, b: torch.Tensor, alpha: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``alpha · a · b (+ bias)`` as one kernel. Without a bias, ``addmm`` with ``beta = 0``
    ignores its input, which must still be a tensor of the product's dtype and device (one
    cached zero each)."""
    if bias is not None:
        return torch.addmm(bias, a, b, alpha=alpha)
    device = a.device
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else a.dtype
    zero = _ZEROS.get((device, dtype))
    if zero is None:
        zero = _ZEROS[(device, dtype)] = torch.zeros((), device=device, dtype=dtype)
    return torch.addmm(zero, a, b, beta=0, alpha=alpha)


_ZEROS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _draw(x: torch.Tensor, p: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dropout(x), keep-mask)``."""
    if x.device.type == "cpu":
        mask = _cpu_keep_mask(x, p)
        return _apply(x, mask, scale), mask
    return torch.native_dropout(x, p, True)  # one fused kernel (nn.Dropout's)


#: The CPU mask's resolution: each element's draw is a uniform 16-bit integer.
_LEVELS = 1 << 16


def _cpu_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A ``uint8`` mask of ``x``'s shape, 1 where kept, 0 (dropped) with probability
    ``round(p · 2**16) / 2**16`` (within 7.7e-6 of ``p``).

    Written by hand for speed, where the mask is the largest cost a small adapter adds to the
    step. Each element's draw is a uniform 16-bit integer, four to each 64-bit number (torch's
    ``rand`` and ``nn.Dropout``'s Bernoulli spend a whole draw per element), from numpy's SFC64
    generator seeded by one 64-bit draw of torch's default generator: so ``torch.manual_seed``
    and a restored torch RNG state (activation checkpointing) give the same mask, and the bits
    come 2 × faster than from torch's Mersenne Twister (``random_``) and are compared 5 × faster
    (numpy's vectorised ``int16`` comparison): the mask takes about a third of the time of the
    same draw in torch (measured on the benchmark's 1024 × 1536 input). ``uint8`` rather than
    ``bool``: in the step, multiplying by it is faster than by a ``bool`` mask and than
    ``torch.where`` (measured; in isolation, with cold caches, ``where`` looks faster).
    """
    n = x.numel()
    seed = torch.empty((), dtype=torch.int64).random_(-(1 << 63), None).item()
    words = np.random.SFC64(seed & _U64).random_raw((n + 3) // 4)
    dropped_below = -(_LEVELS // 2) + round(p * _LEVELS)
    keep = words.view(np.int16)[:n] >= dropped_below
    return torch.from_numpy(keep).view(torch.uint8).view(x.shape)


_U64 = (1 << 64) - 1


def _apply(t: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``t`` dropped by the keep-mask ``mask`` and scaled."""
    return (t * mask).mul_(scale)


class Dropout(nn.Dropout):
    """``nn.Dropout`` that keeps a 1-byte mask for the backward and draws it faster on the CPU.

    On the CPU ``nn.Dropout`` keeps an fp32 mask and spends one random draw per element; this
    one keeps one byte per element and draws four elements per 64-bit number
    (:func:`_cpu_keep_mask`). On other devices it is ``native_dropout``, as ``nn.Dropout`` is.
    Same values in distribution (a Bernoulli(1 − p) mask, scaled by 1 / (1 − p)); not the same
    draws as ``nn.Dropout``'s.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _drops(self):
            return super().forward(x)
        return drop(x, self.p)


def drop(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of :class:`Dropout` (a 1-byte mask kept for the backward) as a
    function, for ``0 < p < 1``."""
    return _Dropout.apply(x, p)[0]


def _drops(module: nn.Dropout) -> bool:
    """Whether ``module`` drops anything here with this file's own node: training with
    0 < p < 1, outside ``torch.compile`` (compiled, it is ordinary dropout and inductor decides
    what to keep)."""
    return module.training and 0 < module.p < 1 and not torch.compiler.is_compiling()


class InputDropout(nn.Dropout):
    """``nn.Dropout`` whose :meth:`recomputable` form keeps a 1-byte mask, no dropped copy.

    Called as a module it is plain ``nn.Dropout`` (the benchmark's per-expert reference).
    """

    def projects(self) -> bool:
        """Whether :meth:`project` applies: training with 0 < p < 1, outside ``torch.compile``."""
        return _drops(self)

    def project(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        alpha: float = 1.0,
    ) -> torch.Tensor:
        """``alpha · dropout(x) · weightᵀ + bias`` keeping what :meth:`recomputable` keeps
        around ``F.linear`` (``x`` and the mask), as one autograd node (:class:`_DropoutLinear`),
        with ``alpha`` folded into the products. Only while :meth:`projects`."""
        return _DropoutLinear.apply(x, weight, bias, self.p, alpha)

    def recomputable(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, contextlib.AbstractContextManager]:
        """``(dropout(x), scope)``: run the operations that read the dropped tensor inside
        ``scope``; whatever of it they keep for the backward is kept as ``x`` and the mask,
        and rebuilt when the backward needs it."""
        if not _drops(self):
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
                    # shown what is kept instead: x, and the mask (the dropout node keeps it
                    # too, unless x needs no gradient: then only this scope does)
                    outer[0](inp)
                    outer[0](mask)
                return (_Recompute, mask, t.size(), t.stride(), t.storage_offset())
            return t if outer is None else outer[0](t)

        setattr(pack, _SCOPE, base)

        def unpack(saved: Any) -> torch.Tensor:
            # this scope's own marker (an enclosing scope's, saved by an operation run inside
            # this one, goes to that scope's unpack)
            if not (isinstance(saved, tuple) and saved and saved[0] is _Recompute) or (
                saved[1] is not mask
            ):
                return saved if outer is None else outer[1](saved)
            _, _, size, stride, offset = saved
            if inp._version != version:
                raise RuntimeError(
                    "InputDropout: the adapted linear's input was modified in place after "
                    "the forward; its dropout cannot be recomputed"
                )
            full = _apply(inp, mask, scale).contiguous()
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

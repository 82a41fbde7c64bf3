"""Dispatchers: how an expert bank computes ``Σ_i g_i · (x A_i) B_i`` for its routed tokens.

Shapes: ``N`` tokens (B·T), ``k`` experts per token, ``E`` experts, ``M`` routed (token, expert)
pairs (``N·k`` with top-k; any number with a variable count per token), ``I`` / ``O`` in / out
features, ``R`` rank.

One interface, :class:`Dispatcher` (``delta(block, h, gates)``), four computations that give the
same numbers: :class:`DenseDispatcher` (all experts, two GEMMs), :class:`SparseDispatcher` (the
routed pairs only, grouped per expert), :class:`LoopDispatcher` (a Python loop over experts, the
benchmark's reference) and the expert-parallel all-to-all
(:mod:`hmora_ds.parallel.expert_parallel`). Gates are always a dense (…, E) tensor whose zeros
are the experts a token does not use, so a method may route each token to a different number of
experts (AdaMoLE's thresholds) and each site may have its own E (MoLA): the plan below reads the
non-zero pattern, not a fixed k.

Sparse dispatch:
With top-k routing each token uses k of the E experts, so computing all E (the dense path)
spends E/k times the adapter FLOPs that are needed. A :class:`DispatchPlan` sorts the M
(token, expert) pairs by expert, so every expert's tokens are one contiguous slice; the experts
then run as one grouped GEMM over the slices (:func:`grouped_matmul`) and the results are
added back per token with ``index_add``. No padding and no dropped tokens: task-level routing
sends whole sequences to the same experts, so per-expert loads are very uneven and padding every
expert to the largest load would cost more than the dense path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DispatchPlan:
    """The routed (token, expert) pairs of one router decision, sorted by expert.

    Attributes:
        token: (M,) token index of each pair, grouped by expert (expert 0's first).
        weight: (M,) the pair's gate value, differentiable w.r.t. the gates.
        offsets: (E,) int32 end offset of each expert's slice (cumulative counts, on device).
        num_tokens: N.
    """

    token: torch.Tensor
    weight: torch.Tensor
    offsets: torch.Tensor
    num_tokens: int
    _counts: list[int] | None = None

    @classmethod
    def build(cls, gates: torch.Tensor, k: int | None, num_tokens_per_row: int) -> DispatchPlan:
        """Plan for ``gates`` (B, T, E) or per-sequence (B, 1, E) with T tokens a row.

        ``k``: every token uses exactly k experts (top-k: no host sync); ``None``: each token
        uses the experts whose gate is non-zero, however many (one ``nonzero``, a host sync).
        """
        if k is None:
            return cls._build_variable(gates, num_tokens_per_row)
        e, b = gates.shape[-1], gates.shape[0]
        weights, experts = gates.topk(k, dim=-1)  # (B, T|1, k): the k non-zero gates
        weights = weights.expand(b, num_tokens_per_row, k).reshape(-1)
        experts = experts.expand(b, num_tokens_per_row, k).reshape(-1)
        order = torch.argsort(experts, stable=True)
        offsets = torch.bincount(experts, minlength=e).cumsum(0).to(torch.int32)
        return cls(
            token=order // k,
            weight=weights[order],
            offsets=offsets,
            num_tokens=experts.numel() // k,
        )

    @classmethod
    def _build_variable(cls, gates: torch.Tensor, num_tokens_per_row: int) -> DispatchPlan:
        e, b = gates.shape[-1], gates.shape[0]
        flat = gates.expand(b, num_tokens_per_row, e).reshape(-1, e)
        token, expert = (flat != 0).nonzero(as_tuple=True)  # sorted by token, then expert
        order = torch.argsort(expert, stable=True)
        token, expert = token[order], expert[order]
        offsets = torch.bincount(expert, minlength=e).cumsum(0).to(torch.int32)
        return cls(token=token, weight=flat[token, expert], offsets=offsets,
                   num_tokens=flat.shape[0])  # fmt: skip

    @property
    def counts(self) -> list[int]:
        """Tokens per expert on the host (a device sync; only the slice-loop path needs it)."""
        if self._counts is None:
            ends = self.offsets.tolist()
            self._counts = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]
        return self._counts


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``x[slice_i] @ w[i]`` for every expert i → (M, N_out); ``x`` (M, K), ``w`` (E, K, N_out).

    On CUDA in bf16, one ``torch._grouped_mm`` kernel (offsets stay on the device: no sync).
    Elsewhere (CPU, where that op is a slow fallback, or fp32) one GEMM per expert slice.
    """
    if x.is_cuda and hasattr(torch, "_grouped_mm"):
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        if dtype == torch.bfloat16:
            return aligned_grouped_mm(x.to(dtype), w.to(dtype), plan.offsets, torch._grouped_mm)
    if torch.compiler.is_compiling():  # the slice sizes are data: one opaque op, no break
        return sliced_mm(x, w, plan.offsets)
    parts = x.split(plan.counts)
    return torch.cat([xi @ w[i] for i, xi in enumerate(parts)])


GROUPED_MM_ALIGN_BYTES = 16


def aligned_grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, mm: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """``mm(x, w, offs=offsets)`` with ``x``'s and ``w``'s inner sizes zero-padded to a multiple
    of 16 bytes, which ``torch._grouped_mm`` requires of every stride ("strides should be
    multiple of 16 bytes"): a rank of 4 in bf16 (AdaMoLE's experts) is 8 bytes. The zeros add
    nothing to the products; the padded output columns are cut off (autograd sees a pad and a
    slice, so the gradients are those of the unpadded product)."""
    multiple = GROUPED_MM_ALIGN_BYTES // x.element_size()
    k, n = x.shape[-1], w.shape[-1]
    pad_k, pad_n = -k % multiple, -n % multiple
    if pad_k:
        x = F.pad(x, (0, pad_k))
        w = F.pad(w, (0, 0, 0, pad_k))
    if pad_n:
        w = F.pad(w, (0, pad_n))
    out = mm(x, w, offs=offsets)
    return out[:, :n] if pad_n else out


# ``x[slice_i] @ w[i]`` as a custom op for torch.compile. The slice sizes are data (how many
# tokens each expert got), so the eager slice loop would make dynamo either break the graph at
# ``offsets.tolist()`` or guard on every count. As an opaque op with a shape-only fake
# implementation the whole routed block stays one graph (``fullgraph=True``); the op runs the
# same slice loop eagerly inside. Written here because torch's own ``_grouped_mm`` needs CUDA
# (on CPU its backward rejects broadcast gradients and it wants 16-byte-aligned strides).
@torch.library.custom_op("hmora_ds::sliced_mm", mutates_args=())
def sliced_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x[slice_i] @ w[i]`` → (M, N); ``x`` (M, K), ``w`` (E, K, N), ``offsets`` (E,) ends."""
    ends = offsets.tolist()
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for i, end in enumerate(ends):
        if end > start:
            torch.mm(x[start:end], w[i], out=out[start:end])
        start = end
    return out


@sliced_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("hmora_ds::sliced_mm_wgrad", mutates_args=())
def sliced_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x[slice_i]ᵀ @ grad[slice_i]`` → (E, K, N): the weight gradient of :func:`sliced_mm`."""
    ends = offsets.tolist()
    out = x.new_zeros(len(ends), x.shape[-1], grad.shape[-1])
    start = 0
    for i, end in enumerate(ends):
        if end > start:
            torch.mm(x[start:end].t(), grad[start:end], out=out[i])
        start = end
    return out


@sliced_mm_wgrad.register_fake
def _(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(offsets.shape[0], x.shape[-1], grad.shape[-1])


def _sliced_mm_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _sliced_mm_backward(ctx: Any, grad: torch.Tensor):
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    gx = (
        sliced_mm(grad, w.transpose(1, 2).contiguous(), offsets)
        if ctx.needs_input_grad[0]
        else None
    )
    gw = sliced_mm_wgrad(x, grad, offsets) if ctx.needs_input_grad[1] else None
    return gx, gw, None


sliced_mm.register_autograd(_sliced_mm_backward, setup_context=_sliced_mm_setup)


class Dispatcher:
    """Computes an expert bank's routed update ``s · Σ_i g_i (h A_i) B_i`` → (N, O).

    ``block`` is the :class:`~hmora_ds.experts.bank.MoRALinear` (its ``lora_A`` / ``lora_B``,
    ``rank``, ``num_experts``, ``hydra``, ``scaling``), ``h`` the dropped-out input (N, I) and
    ``gates`` (B, T, E) or (B, 1, E) with zeros for unused experts.
    """

    name = "base"

    def delta(self, block: Any, h: torch.Tensor, x: torch.Tensor, gates: torch.Tensor):
        raise NotImplementedError


class DenseDispatcher(Dispatcher):
    """Every expert on every token: ``H = h·[A_1 … A_E]``, scale each R-wide slice by its gate,
    ``H·[B_1; …; B_E]`` — two GEMMs, dropout once (eqs. 3–5 as one computation).

    The bank calls :meth:`hidden` and fuses ``· B`` with the residual add in one ``addmm``;
    :meth:`delta` is the same update on its own.
    """

    name = "dense"

    def delta(self, block: Any, h: torch.Tensor, x: torch.Tensor, gates: torch.Tensor):
        return F.linear(self.hidden(block, h, gates), block.lora_B) * block.scaling

    def hidden(self, block: Any, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        # (N…, E·R) or (N…, R) with a shared (Hydra) A
        return self.gate(block, F.linear(h, block.lora_A), gates)

    def gate(self, block: Any, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``h = dropout(x)·[A_1 … A_E]`` with each expert's R-wide slice scaled by its gate."""
        r, e = block.rank, block.num_experts
        if block.hydra:
            h = h.unsqueeze(-2) * gates.unsqueeze(-1)  # (N…, E, R)
        else:
            h = h.unflatten(-1, (e, r)) * gates.unsqueeze(-1)
        return h.flatten(-2)


class SparseDispatcher(Dispatcher):
    """Only the routed (token, expert) pairs: sorted by expert (:class:`DispatchPlan`, shared by
    the members of a router group), one grouped GEMM per matrix, ``index_add`` back."""

    name = "sparse"

    def delta(self, block: Any, h: torch.Tensor, x: torch.Tensor, gates: torch.Tensor):
        plan = block.router.dispatch(gates, x.shape[-2])
        e, r = block.num_experts, block.rank
        h = h.reshape(-1, block.in_features)
        if block.hydra:  # one shared A: project every token once, then route the R-wide rows
            hs = F.linear(h, block.lora_A)[plan.token]  # (M, R)
        else:
            a = block.lora_A.view(e, r, block.in_features).transpose(1, 2)  # (E, I, R)
            hs = grouped_matmul(h[plan.token], a, plan)  # (M, R)
        hs = hs * plan.weight.unsqueeze(-1).to(hs.dtype)
        b = block.lora_B.view(block.out_features, e, r).permute(1, 2, 0)  # (E, R, O)
        ys = grouped_matmul(hs, b, plan) * block.scaling  # (M, O)
        out = ys.new_zeros(plan.num_tokens, block.out_features)
        return out.index_add_(0, plan.token, ys)


class LoopDispatcher(Dispatcher):
    """A Python loop over experts, as peer mixture-of-LoRA frameworks compute it: per expert,
    select its tokens (``nonzero``, a host sync per expert), apply its LoRA, weight by the gate,
    ``index_add`` back. The benchmark's reference point; never chosen automatically."""

    name = "loop"

    def delta(self, block: Any, h: torch.Tensor, x: torch.Tensor, gates: torch.Tensor):
        e, r = block.num_experts, block.rank
        flat_x = x.reshape(-1, block.in_features).to(h.dtype)  # dropout per expert, below
        flat_g = gates.expand(*x.shape[:-1], e).reshape(-1, e)
        result = h.new_zeros(flat_x.shape[0], block.out_features)
        for i in range(e):
            a = block.lora_A if block.hydra else block.lora_A[i * r : (i + 1) * r]
            b = block.lora_B[:, i * r : (i + 1) * r]
            if block.router.sparse_gates:
                rows = torch.nonzero(flat_g[:, i] != 0).squeeze(-1)
                if rows.numel() == 0:
                    continue
                hi, gi = block.dropout(flat_x[rows]), flat_g[rows, i : i + 1]
            else:
                rows, hi, gi = None, block.dropout(flat_x), flat_g[:, i : i + 1]
            yi = F.linear(F.linear(hi, a), b) * block.scaling * gi
            result = result + yi if rows is None else result.index_add(0, rows, yi)
        return result


@contextlib.contextmanager
def use_dispatcher(model: nn.Module, dispatcher: Dispatcher) -> Iterator[None]:
    """Within the block, every routed expert bank of ``model`` computes with ``dispatcher``
    (an attribute set on the model's own blocks and restored after: nothing global changes)."""
    blocks = [m for m in model.modules() if getattr(m, "router", None) is not None
              and hasattr(m, "dispatcher")]  # fmt: skip
    saved = [b.dispatcher for b in blocks]
    for b in blocks:
        b.dispatcher = dispatcher
    try:
        yield
    finally:
        for b, d in zip(blocks, saved, strict=True):
            b.dispatcher = d

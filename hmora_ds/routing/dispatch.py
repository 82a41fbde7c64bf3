"""Token → expert grouping for the sparse top-k computation (see :mod:`hmora_ds.lora`).

Shapes: ``N`` tokens (B·T), ``k`` experts per token, ``E`` experts, ``M = N·k`` routed pairs.

With top-k routing each token uses k of the E experts, so computing all E (the dense path)
spends E/k times the adapter FLOPs that are needed. A :class:`DispatchPlan` sorts the M
(token, expert) pairs by expert, so every expert's tokens are one contiguous slice; the experts
then run as one grouped GEMM over the slices (:func:`grouped_matmul`) and the results are
added back per token with ``index_add``. No padding and no dropped tokens: task-level routing
sends whole sequences to the same experts, so per-expert loads are very uneven and padding every
expert to the largest load would cost more than the dense path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    def build(cls, gates: torch.Tensor, k: int, num_tokens_per_row: int) -> DispatchPlan:
        """Plan for top-k ``gates`` (B, T, E) or per-sequence (B, 1, E) with T tokens a row."""
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
            return torch._grouped_mm(x.to(dtype), w.to(dtype), offs=plan.offsets)
    parts = x.split(plan.counts)
    return torch.cat([xi @ w[i] for i, xi in enumerate(parts)])

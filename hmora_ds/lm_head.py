"""The LM head and its cross-entropy in chunks of tokens: the (tokens × vocabulary) logits are
never held in full (``train.ce_chunk_tokens``).

For Qwen2's 151,936-token vocabulary a batch of 4 × 1024 tokens has 0.6 G logits: 2.5 GB in fp32
for the softmax, kept alive until the backward, plus the bf16 logits themselves. Here each chunk
of C tokens computes its logits, its loss and, at once, its gradients: with respect to the hidden
states (``softmax − target`` times the head's weight) and, when the head trains (a full
fine-tune), to the weight. Only the hidden-state gradient (tokens × hidden, as large as the hidden
states the plain path saves anyway) is kept for the backward; the chunk's logits are freed before
the next chunk. The peak is C × V instead of tokens × V.

Written here because nothing we depend on offers it on every device: PyTorch's cross-entropy
takes logits, and the fused kernels of Liger-Kernel are Triton (CUDA) only. The loss equals
``F.cross_entropy(logits.float(), labels, ignore_index=-100, label_smoothing=ε,
reduction="sum")`` of the full logits (tested to 1e-5, with its gradients).
"""

from __future__ import annotations

import torch

#: Label value of tokens without a loss (prompt, padding).
IGNORE = -100
#: Tokens per chunk by default (``train.ce_chunk_tokens``): with Qwen2's vocabulary a chunk's
#: fp32 logits take 0.6 GB, small against the 2.5 GB of a 4 × 1024 batch's.
DEFAULT_CHUNK_TOKENS = 1024


class _ChunkedLinearCE(torch.autograd.Function):
    """Σ over target tokens of CE(h W^T) with label smoothing ε; gradients computed in the
    forward, chunk by chunk (the loss is a scalar: the backward only scales them)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, smoothing: float):  # type: ignore[override]
        vocab = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.detach()
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].detach()
            y = labels[start : start + chunk]
            logits = (h @ w.t()).float()  # (C, V): the only vocabulary-wide tensors are here
            lse = torch.logsumexp(logits, dim=-1)
            valid = y != IGNORE
            target = y.clamp_min(0)
            picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
            loss = lse - picked
            if smoothing:
                loss = (1.0 - smoothing) * loss + smoothing * (lse - logits.mean(dim=-1))
            total += torch.where(valid, loss, torch.zeros_like(loss)).sum()
            if grad_h is None and grad_w is None:
                continue
            # d loss / d logits = softmax − (1 − ε)·onehot(y) − ε / V, zero on ignored rows.
            g = logits.sub_(lse.unsqueeze(1)).exp_()
            if smoothing:
                g.sub_(smoothing / vocab)
            g.scatter_add_(
                1, target.unsqueeze(1), torch.full_like(picked, smoothing - 1.0).unsqueeze(1)
            )
            g.mul_(valid.unsqueeze(1).to(g.dtype))
            g = g.to(h.dtype)
            if grad_h is not None:
                grad_h[start : start + chunk] = g @ w
            if grad_w is not None:
                grad_w += (g.t() @ h).float()
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        has_h, has_w = ctx.has
        grad_h = next(saved) * grad_out if has_h else None  # keeps the hidden states' dtype
        grad_w = (next(saved) * grad_out).to(ctx.weight_dtype) if has_w else None
        return grad_h, grad_w, None, None, None


def chunked_lm_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of the LM head ``weight`` (V, D) over the hidden states
    (B, T, D), as :func:`hmora_ds.model.lm_loss_sum` computes it from the logits.

    Rows whose shifted label is ``-100`` are left out before the head runs (on CPU, where
    selecting them costs no device sync; on a GPU they are computed and masked, so the step
    never waits for the device).

    Returns:
        (summed loss in fp32, number of target tokens).
    """
    if chunk_tokens < 1:
        raise ValueError(f"train.ce_chunk_tokens: must be >= 1 here, got {chunk_tokens}")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    valid = y != IGNORE
    n = valid.sum()
    if h.device.type == "cpu":
        rows = valid.nonzero().squeeze(1)
        h, y = h.index_select(0, rows), y.index_select(0, rows)
    total = _ChunkedLinearCE.apply(h, weight, y, chunk_tokens, float(label_smoothing))
    return total, n

"""The task encoder: H_task = TaskEncoder([Embed(T_in) ; e_task]) at the e_task slot (spec §3).

Shapes: ``B`` batch, ``T`` tokens of the model input, ``D`` hidden size.

Only the task encoder's input tokens enter (``prompt_mask``: the raw instruction or the whole
templated prompt, chosen by ``routing.task_input`` in the model), packed to the left of each row
in their original order, followed by the trainable ``e_task`` vector; positions count from 0
inside that packed row, so a sequence gets exactly the same representation alone or in any
padded batch, with left or right padding. Sinusoidal positions are scaled to the RMS of the
embedding table (an unscaled sinusoid has RMS ≈ 0.7, which drowns embeddings of RMS ≈ 0.02).

The ``e_task`` slot gets **no** position by default, as in the official HMoRA code: a position at
the slot is the sinusoid of the input length, which at initialisation dominates H_task (the task
representation then mostly encodes how long the prompt is). ``slot_position=True`` (config
``routing.task_slot_position``) restores the earlier behaviour.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from hmora_ds.experts.dropout import Dropout, drop


def sinusoid_positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """The (length, dim) sinusoidal table of "Attention is all you need" (RMS = sqrt(1/2))."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


def pack_prompt(
    embeds: torch.Tensor, prompt_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's prompt embeddings to the front, keeping their order.

    Args:
        embeds: (B, T, D) token embeddings.
        prompt_mask: (B, T) 1/True on prompt tokens.

    Returns:
        packed (B, T, D) with zeros after each row's prompt, and the prompt lengths (B,).
    """
    mask = prompt_mask.bool()
    # Stable sort on "not prompt" puts prompt positions first, in their original order.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    lengths = mask.sum(dim=1)
    valid = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    packed = embeds.gather(1, order.unsqueeze(-1).expand_as(embeds))
    packed = packed * valid.unsqueeze(-1).to(packed.dtype)
    return packed, lengths


class SelfAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose dropout on the attention weights, in CPU training, is
    :func:`~hmora_ds.experts.dropout.drop` (a 1-byte mask, four draws per random number).

    There ``scaled_dot_product_attention`` computes the same products and softmax itself (its
    CPU kernel has no dropout) and draws the mask with ``bernoulli_``, one random number per
    weight: 2 % of HMoRA w LW's CPU step, the most the task encoder added besides its GEMMs.
    The queries may be fewer positions than the keys (the e_task slot alone, see
    :meth:`TaskEncoder.encode`). Elsewhere (eval, other devices, compiled, a mask or weights
    asked for, keys other than the values) it is ``nn.MultiheadAttention``, whose fused kernels
    draw their own masks.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):  # fmt: skip
        if (
            not (self.training and 0 < self.dropout < 1 and query.device.type == "cpu")
            or torch.compiler.is_compiling()
            or need_weights
            or attn_mask is not None
            or is_causal
            or not (key is value and self.batch_first and query.dim() == 3)
            or not self._qkv_same_embed_dim
            or self.in_proj_bias is None
            or self.bias_k is not None
            or self.add_zero_attn
        ):
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )  # fmt: skip
        (b, tq, d), tk, heads = query.shape, key.shape[1], self.num_heads
        w, bias = self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k, v = F.linear(query, w, bias).chunk(3, dim=-1)
        else:
            q = F.linear(query, w[:d], bias[:d])
            k, v = F.linear(key, w[d:], bias[d:]).chunk(2, dim=-1)

        def split(t: torch.Tensor, n: int) -> torch.Tensor:  # (B, n, D) -> (B, H, n, D/H)
            return t.reshape(b, n, heads, d // heads).transpose(1, 2)

        scores = (split(q, tq) * (d // heads) ** -0.5) @ split(k, tk).transpose(-2, -1)
        if key_padding_mask is not None:  # True or -inf on keys to ignore
            pad = key_padding_mask.view(b, 1, 1, tk)
            if pad.dtype == torch.bool:
                scores = scores.masked_fill(pad, float("-inf"))
            else:
                scores = scores + pad.to(scores.dtype)
        weights = drop(torch.softmax(scores, dim=-1), self.dropout)  # (B, H, Tq, Tk)
        out = (weights @ split(v, tk)).transpose(1, 2).reshape(b, tq, d)
        return self.out_proj(out), None


class TaskEncoder(nn.Module):
    """Transformer or mean-pool encoder of the prompt into one task vector per sequence.

    Args:
        hidden_size: the LLM's hidden size D (the encoder's d_model).
        kind: ``transformer`` or ``mean_pool``.
        num_layers, num_heads, ffn_mult, dropout: the ``nn.TransformerEncoderLayer`` stack
            (paper: 1 layer, 16 heads, FFN 2·D, dropout 0.1).
        init_task_embedding: (D,) initial ``e_task`` (the embedding of ``?``), or None to leave
            it zero (e.g. on the ``meta`` device).
        position_scale: RMS the positional table is scaled to (the embeddings' RMS).
        slot_position: also add the position (= the input length) to the ``e_task`` slot
            (earlier behaviour; the official code adds none).
    """

    def __init__(
        self,
        hidden_size: int,
        kind: str = "transformer",
        num_layers: int = 1,
        num_heads: int = 16,
        ffn_mult: float = 2.0,
        dropout: float = 0.1,
        init_task_embedding: torch.Tensor | None = None,
        position_scale: float = 1.0,
        slot_position: bool = False,
    ) -> None:
        super().__init__()
        assert kind in ("transformer", "mean_pool"), kind
        self.kind = kind
        self.slot_position = bool(slot_position)
        #: Cut the packed prompts to the longest one before the encoder (None: on CPU only;
        #: see :meth:`forward`). The output is the same either way.
        self.trim_padding: bool | None = None
        if kind == "transformer":
            layer = nn.TransformerEncoderLayer(
                d_model=hidden_size,
                nhead=num_heads,
                dim_feedforward=round(ffn_mult * hidden_size),
                dropout=dropout,
                batch_first=True,
            )
            # The residual, FFN and attention-weight dropouts keep 1-byte masks and draw them
            # faster on the CPU (the same parameters: the attention module is rebuilt on the
            # meta device, drawing no random numbers, and takes the original's tensors).
            for name in ("dropout", "dropout1", "dropout2"):
                setattr(layer, name, Dropout(dropout))
            attn = SelfAttention(hidden_size, num_heads, dropout=dropout, batch_first=True,
                                 device="meta")  # fmt: skip
            attn.load_state_dict(layer.self_attn.state_dict(), assign=True)
            layer.self_attn = attn
            self.encoder = nn.TransformerEncoder(
                layer, num_layers=num_layers, enable_nested_tensor=False
            )
            self.task_embedding = nn.Parameter(torch.zeros(hidden_size))
            if init_task_embedding is not None:
                with torch.no_grad():
                    self.task_embedding.copy_(init_task_embedding.reshape(hidden_size))
            # RMS of the sinusoid is sqrt(1/2): rescale it to the embeddings' RMS.
            self.register_buffer(
                "position_scale",
                torch.tensor(float(position_scale) * math.sqrt(2.0)),
                persistent=False,
            )

    def forward(self, embeds: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Encode the prompt tokens of each row.

        Args:
            embeds: (B, T, D) embeddings of the model input (frozen table).
            prompt_mask: (B, T) 1 on the tokens the encoder reads (see the module docstring).

        Returns:
            (B, D) task representation.
        """
        if self.kind == "transformer":  # its own dtype (an fp32 encoder on a bf16 base)
            embeds = embeds.to(self.task_embedding.dtype)
        packed, lengths = pack_prompt(embeds, prompt_mask)
        if self.kind == "mean_pool":
            return packed.sum(dim=1) / lengths.clamp_min(1).unsqueeze(-1).to(packed.dtype)
        trim = self.trim_padding
        if trim is None:
            trim = packed.device.type == "cpu"
        if trim and packed.shape[1]:
            # Only the longest prompt's columns (the rest are padding keys, masked anyway):
            # the same output with (B, heads, T_prompt²) attention instead of (B, heads, T²).
            # Reading the length is a host sync, free on a CPU; on a GPU the full width is
            # kept so the forward never waits on the device.
            packed = packed[:, : int(lengths.max())]
        bsz, t, d = packed.shape
        # One extra slot so that e_task always fits right after the longest prompt.
        packed = torch.cat([packed, packed.new_zeros(bsz, 1, d)], dim=1)
        pos = torch.arange(t + 1, device=packed.device).unsqueeze(0)  # (1, T+1)
        is_task = pos == lengths.unsqueeze(1)  # (B, T+1)
        task_vec = self.task_embedding.to(packed.dtype).expand(bsz, t + 1, d)
        x = torch.where(is_task.unsqueeze(-1), task_vec, packed)
        table = sinusoid_positions(t + 1, d, packed.device) * self.position_scale
        table = table.to(x.dtype).unsqueeze(0)  # (1, T+1, D)
        if not self.slot_position:  # e_task keeps no position: H_task does not encode length
            table = table * (~is_task).unsqueeze(-1).to(x.dtype)
        x = x + table
        ignore = pos > lengths.unsqueeze(1)  # keys after e_task are padding
        if torch.is_grad_enabled() and len(self.encoder.layers) > 1:
            # Layers before the last keep every position's activations (attention weights, FFN,
            # dropout masks): recomputed in the backward instead, the masks redrawn from the
            # saved RNG state, so the gradients are the kept activations' exactly. The last
            # layer alone (the default) keeps little more than its keys and values.
            return torch.utils.checkpoint.checkpoint(
                self.encode, x, ignore, lengths, use_reentrant=False
            )
        return self.encode(x, ignore, lengths)

    def encode(self, x: torch.Tensor, ignore: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The encoder's output at each row's e_task slot (B, D) for its input ``x`` (B, T, D),
        ``ignore`` (B, T) marking padding keys and the slots' positions ``lengths`` (B,).

        Only the slot is read, so the last layer computes only the slot's position: its query,
        its attention over every key, its residuals, norms and FFN (the keys and values are
        still projected at every position). The same output as the whole layer indexed at the
        slot (a post-norm layer's position depends on the others only through its attention),
        for about a quarter of the layer's multiply-adds; earlier layers, whose every position
        feeds the next, run whole. Dropout draws masks for the computed positions only.
        """
        layers = self.encoder.layers
        for layer in layers[:-1]:
            x = layer(x, src_key_padding_mask=ignore)
        last = layers[-1]
        # Indexing rather than gather: its backward keeps the indices only.
        slot = x[torch.arange(x.shape[0], device=x.device), lengths].unsqueeze(1)  # (B, 1, D)
        h = last.self_attn(slot, x, x, key_padding_mask=ignore, need_weights=False)[0]
        h = last.norm1(slot + last.dropout1(h))  # post-norm (norm_first=False, built so above)
        ff = last.linear2(last.dropout(last.activation(last.linear1(h))))
        h = last.norm2(h + last.dropout2(ff))
        if self.encoder.norm is not None:
            h = self.encoder.norm(h)
        return h.squeeze(1)

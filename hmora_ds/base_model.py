"""The frozen base model: finding its layers, its shape fingerprint, counting and gathering.

Shared by the wrapper model, the methods and adapter I/O (which must not import each other).
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

#: Per-architecture module paths of the seven targets inside one decoder layer.
ARCH_TARGETS: dict[str, dict[str, str]] = {
    arch: {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    for arch in ("qwen2", "llama")
}

#: Shape keys of the base config recorded with every adapter (a mismatch refuses loading).
FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def base_fingerprint(base_model: nn.Module, base_parameters: int | None = None) -> dict[str, Any]:
    """Shape keys of a base model's config plus its parameter count (adapter compatibility)."""
    cfg = base_model.config
    fp = {k: getattr(cfg, k, None) for k in FINGERPRINT_KEYS}
    fp["base_parameters"] = (
        count_parameters(base_model) if base_parameters is None else base_parameters
    )
    return fp


def fingerprint_mismatch(expected: dict[str, Any], base_model: nn.Module, what: str) -> str | None:
    """Where ``base_model`` differs from a saved shape fingerprint, as ``"key saved (what) vs
    actual (base)"`` pairs joined by commas; None when every saved key matches."""
    actual = base_fingerprint(base_model)
    diff = {k: (v, actual.get(k)) for k, v in expected.items() if actual.get(k) != v}
    if not diff:
        return None
    return ", ".join(f"{k} {a} ({what}) vs {b} (base)" for k, (a, b) in diff.items())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Qwen2 / LLaMA causal LM, checked against its config."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    n = model.config.num_hidden_layers
    if not isinstance(layers, nn.ModuleList) or len(layers) != n:
        raise ValueError(
            f"base model: could not find its {n} decoder layers through get_decoder().layers; "
            "only Qwen2 / LLaMA causal LMs are supported"
        )
    return layers


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modify: bool = False):
    """Gather ZeRO-3 partitioned parameters (a no-op for ordinary tensors).

    With ``modify`` rank 0's in-place changes are scattered back to every partition.
    """
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield
    else:
        yield


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count, shared (tied) tensors once; ZeRO-3 partitioned sizes via ``ds_numel``."""
    total = 0
    for p in module.parameters():  # parameters() already yields each tensor once
        if trainable_only and not p.requires_grad:
            continue
        total += int(getattr(p, "ds_numel", p.numel()))
    return total

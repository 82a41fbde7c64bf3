"""PEFT interoperability: plain-LoRA adapters to PEFT's format, and merged into the base.

``hmora-ds export --peft`` writes a directory that ``peft.PeftModel.from_pretrained(base, dir)``
loads: PEFT's own ``LoraConfig`` (saved by PEFT) and the tensors under PEFT's names
(``base_model.model.<module>.lora_A.weight``). Our LoRA computes ``W x + s · B A x`` with
``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), which is PEFT's ``lora_alpha`` /
``use_rslora`` scaling, so the tensors are copied unchanged.

``hmora-ds export --merge`` writes the base model with ``W + s · B A`` folded in (PEFT's
``merge_and_unload``), saved by transformers as sharded safetensors in the Hugging Face layout,
with the tokenizer: a plain model for any tool.

Only the plain-LoRA methods can do either: a mixture's update depends on each input's routing
and is no single ``B A``. Our own ``adapter_config.json`` carries ``peft_type`` set to a tag that
PEFT does not know, so PEFT's loaders stop with a ``KeyError`` that names hmora-ds instead of
loading the wrong tensors.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Methods whose adapter is one LoRA per adapted linear.
PLAIN_LORA_METHODS = ("lora",)


def plain_lora_problem(meta: dict[str, Any]) -> str | None:
    """Why an adapter (its ``adapter_config.json``) is not a plain LoRA; None if it is."""
    config = meta.get("config", {})
    method = config.get("method")
    if method not in PLAIN_LORA_METHODS:
        return (
            f"method {method} is not plain LoRA: its experts' mix depends on each input's "
            "routing, which a single LoRA (PEFT, a merged model) cannot express; only the "
            "plain-LoRA presets (lora_r8, lora_r64) convert"
        )
    adapter = config.get("adapter", {})
    if adapter.get("num_experts", 1) != 1 or adapter.get("hydra"):
        return "the adapter has several experts per layer; only one LoRA per layer converts"
    return None


def to_peft(adapter: str | Path, out: str | Path) -> Path:
    """Write a PEFT LoRA directory from a plain-LoRA hmora-ds adapter directory.

    Raises:
        ValueError: the adapter is a mixture (one line saying why it cannot convert).
    """
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    from hmora_ds.adapter_io import WEIGHTS_NAME, check_adapter

    adapter, out = Path(adapter), Path(out)
    meta = check_adapter(adapter)
    problem = plain_lora_problem(meta)
    if problem:
        raise ValueError(f"export --peft: {problem}")
    a = meta["config"]["adapter"]
    tensors, modules = {}, set()
    for name, value in load_file(str(adapter / WEIGHTS_NAME)).items():
        prefix, _, kind = name.rpartition(".")
        if kind not in ("lora_A", "lora_B") or not prefix.startswith("base_model."):
            raise ValueError(f"export --peft: unexpected tensor {name} in a plain-LoRA adapter")
        module = prefix[len("base_model.") :]
        modules.add(module.rpartition(".")[2])
        tensors[f"base_model.model.{module}.{kind}.weight"] = value.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(
        r=a["rank"],
        lora_alpha=a["alpha"],
        use_rslora=bool(a.get("rslora", False)),
        lora_dropout=a.get("dropout", 0.0),
        target_modules=sorted(modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=meta["base_model"].get("name_or_path"),
        inference_mode=True,
    ).save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def merge(
    adapter: str | Path,
    out: str | Path,
    model: str | None = None,
    *,
    dtype: str = "auto",
    max_shard_size: str = "2GB",
) -> Path:
    """Fold a plain-LoRA adapter into its base and save the result as a Hugging Face model.

    Args:
        adapter: the hmora-ds adapter directory.
        out: output directory (``config.json``, sharded ``*.safetensors``, the tokenizer).
        model: the base model (HF name / dir / ``.gguf`` / alias); default: the one the
            adapter records.
        dtype: the saved weights' dtype (``auto``: the base's own on GPU, fp32 on CPU).

    Raises:
        ValueError: a mixture adapter, or no base model to merge into.
    """
    from peft import PeftModel

    from hmora_ds.adapter_io import check_adapter
    from hmora_ds.base_model import fingerprint_mismatch
    from hmora_ds.runtime.loading import (
        load_base_model,
        load_tokenizer,
        resolve_checkpoint,
        torch_dtype,
    )

    meta = check_adapter(adapter)
    problem = plain_lora_problem(meta)
    if problem:
        raise ValueError(f"export --merge: {problem}")
    name = model or meta["base_model"].get("name_or_path")
    if not name:
        raise ValueError("export --merge: the adapter does not record its base; pass --model")
    ckpt = resolve_checkpoint(name, option="--model")
    base = load_base_model(ckpt, torch_dtype(dtype, torch.cuda.is_available()), option="--model")
    details = fingerprint_mismatch(meta["base_model"]["fingerprint"], base, "adapter")
    if details:
        raise ValueError(f"export --merge: {adapter} was made for another base: {details}")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        merged = PeftModel.from_pretrained(base, to_peft(adapter, tmp)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    load_tokenizer(ckpt, option="--model").save_pretrained(str(out))
    (out / "hmora_ds_merge.json").write_text(
        json.dumps({"adapter": str(adapter), "base": name}, indent=2) + "\n"
    )
    return out

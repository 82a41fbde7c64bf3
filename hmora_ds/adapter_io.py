"""Adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's layout).

``adapter_config.json`` holds the full resolved method config, the base model's name and shape
fingerprint, and the tensor shapes; ``adapter_model.safetensors`` holds the trainable tensors
only (real safetensors), named as in the wrapper's ``named_parameters()``. Loading is strict: a
missing, extra or mis-shaped tensor, or an adapter made for another base, is a clear error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hmora_ds import __version__
from hmora_ds.base_model import base_fingerprint, gathered
from hmora_ds.config import HMoRAConfig
from hmora_ds.methods import adapter_parameters
from hmora_ds.model import HMoRAModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "hmora-ds-adapter"


def adapter_metadata(model: HMoRAModel) -> dict[str, Any]:
    """What ``adapter_config.json`` says about a model (without the tensor shapes)."""
    return {
        "format": FORMAT,
        "hmora_ds_version": __version__,
        "config": model.config.to_dict(),
        "base_model": {
            "name_or_path": getattr(model.base_model.config, "_name_or_path", None),
            "fingerprint": model.shape_fingerprint(),
        },
        "task_token_id": model.task_token_id,
    }


def write_adapter(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` atomically; returns the dir.

    Raises:
        RuntimeError: if a tensor is empty (a ZeRO-3 partition that was not gathered).
    """
    for name, t in tensors.items():
        if t.numel() == 0:
            raise RuntimeError(f"save_adapter: tensor {name} is empty (a partition not gathered)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "tensors": {n: list(t.shape) for n, t in tensors.items()}}
    tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in tensors.items()}
    # Write next to the target, then rename: a crash never leaves a half-written adapter.
    tmp_weights = directory / f".{WEIGHTS_NAME}.tmp"
    tmp_config = directory / f".{CONFIG_NAME}.tmp"
    save_file(tensors, str(tmp_weights), metadata={"format": FORMAT})
    tmp_config.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_weights, directory / WEIGHTS_NAME)
    os.replace(tmp_config, directory / CONFIG_NAME)
    return directory


def _expert_parallel_state(model: HMoRAModel) -> dict[str, torch.Tensor] | None:
    """All experts gathered into the replicated layout, or None without expert parallelism."""
    if "deepspeed" not in sys.modules:  # expert-parallel blocks are DeepSpeed modules
        return None
    from hmora_ds.parallel.expert_parallel import expert_parallel_blocks, gather_expert_state

    return gather_expert_state(model) if expert_parallel_blocks(model) else None


def save_adapter(model: HMoRAModel, directory: str | Path, *, write: bool = True) -> Path:
    """Write the adapter of ``model`` to ``directory`` (created if needed); returns it.

    ZeRO-3 partitioned tensors are gathered first (a collective: under ZeRO-3 every rank must
    call this; pass ``write=False`` on all ranks but one), so a tensor is never saved empty.
    """
    if model.config.full_finetune:
        raise ValueError(
            "save_adapter: a full fine-tune has no adapter; save the base model with "
            "model.base_model.save_pretrained(dir)"
        )
    tensors = _expert_parallel_state(model)
    if tensors is None:
        tensors = {}
        for name, param in adapter_parameters(model).items():
            with gathered([param]):
                tensors[name] = param.detach().to("cpu", copy=True)
    if write:
        write_adapter(directory, tensors, adapter_metadata(model))
    return Path(directory)


#: Routing options added after adapters were first written → the behaviour those adapters were
#: trained with (a missing key means the adapter predates the option).
LEGACY_ROUTING = {"task_slot_position": True, "task_input": "prompt"}


def legacy_routing_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a saved adapter's) with :data:`LEGACY_ROUTING` filled in where missing, so
    an adapter saved before an option existed keeps computing what it was trained with."""
    routing = config.get("routing")
    if not isinstance(routing, dict):
        return config
    filled = {k: v for k, v in LEGACY_ROUTING.items() if k not in routing}
    return {**config, "routing": {**routing, **filled}} if filled else config


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory (validated format), with
    routing options the adapter predates set to what it was trained with
    (:func:`legacy_routing_defaults`)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"load_adapter: {path} not found (is {directory} an adapter dir?)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"load_adapter: {path} is not an hmora-ds adapter (format {meta.get('format')!r})"
        )
    if isinstance(meta.get("config"), dict):
        meta["config"] = legacy_routing_defaults(meta["config"])
    return meta


def load_adapter(base_model: torch.nn.Module, directory: str | Path) -> HMoRAModel:
    """Inject the saved adapter into ``base_model`` and load its tensors strictly.

    Raises:
        FileNotFoundError: the directory lacks ``adapter_config.json`` or the weights.
        ValueError: the adapter was made for a base of another shape, or a tensor is missing,
            extra or mis-shaped.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    config = HMoRAConfig.from_dict(meta["config"])
    expected_fp = meta["base_model"]["fingerprint"]
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"load_adapter: {weights} not found")
    # Compare shapes before touching the base: a refused adapter leaves it unmodified.
    actual_fp = base_fingerprint(base_model)
    diff = {k: (v, actual_fp.get(k)) for k, v in expected_fp.items() if actual_fp.get(k) != v}
    if diff:
        details = ", ".join(f"{k} {a} (adapter) vs {b} (base)" for k, (a, b) in diff.items())
        raise ValueError(
            f"load_adapter: {directory} was made for base {meta['base_model']['name_or_path']!r} "
            f"of another shape: {details}"
        )
    # e_task is overwritten by the saved tensor; the token id only seeds its initial value.
    task_token_id = meta.get("task_token_id")
    model = HMoRAModel(base_model, config, task_token_id=task_token_id or 0)
    tensors = load_file(str(weights))
    params = adapter_parameters(model)
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(
            f"load_adapter: {weights} does not match the model: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra)} unexpected (e.g. {extra[:3]})"
        )
    for name, param in params.items():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if name.endswith("alpha_logit") and tensors[name].dim() == 0 and shape == (1,):
            tensors[name] = tensors[name].reshape(1)  # a learnable α saved before it was (1,)
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"load_adapter: tensor {name} has shape {tuple(tensors[name].shape)} in {weights}, "
                f"the model expects {shape}"
            )
    with torch.no_grad():
        for name, param in params.items():
            with gathered([param], modify=True):
                param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))
    model.task_token_id = task_token_id
    return model

"""Adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's layout).

``adapter_config.json`` holds the full resolved method config, the base model's name and shape
fingerprint, and the tensor shapes; ``adapter_model.safetensors`` holds the trainable tensors
(real safetensors), named as in the wrapper's ``named_parameters()``, and the method's frozen
adapter tensors (:func:`~hmora_ds.methods.frozen_adapter_tensors`: MoLE's library experts), so
an adapter never needs the files it was built from. Loading is strict: a
missing, extra or mis-shaped tensor, or an adapter made for another base, is a clear error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from hmora_ds import __version__
from hmora_ds.base_model import fingerprint_mismatch, gathered
from hmora_ds.config import HMoRAConfig
from hmora_ds.methods import adapter_parameters, frozen_adapter_tensors
from hmora_ds.model import HMoRAModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: ``peft_type`` of every hmora-ds adapter: PEFT's loaders look it up among their types and
#: stop with this text in the error
#: (hmora_ds/peft_interop.py converts the plain-LoRA ones).
PEFT_TAG = (
    "HMORA_DS (an hmora-ds mixture-of-LoRA-experts adapter, not a PEFT one: load it with "
    "hmora_ds.adapter_io.load_adapter; plain-LoRA adapters convert with hmora-ds export --peft)"
)
FORMAT = "hmora-ds-adapter"
#: What to do about a damaged adapter (the end of every "corrupt file" message).
REEXPORT = "copy it again or re-export it (python -m hmora_ds.export <run>/checkpoints <dir>)"


class AdapterError(ValueError):
    """An adapter directory that cannot be used: a corrupt or incomplete file, or tensors that
    do not fit the model. The message is one line naming the file and what to do; every
    command line prints it as ``error: …`` and exits with status 2 (a ``ValueError``)."""


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """The adapter directory or one of its two files does not exist."""


def adapter_metadata(model: HMoRAModel) -> dict[str, Any]:
    """What ``adapter_config.json`` says about a model (without the tensor shapes)."""
    return {
        "format": FORMAT,
        # PEFT's loaders read this key: an unknown type stops them with this text.
        "peft_type": PEFT_TAG,
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
        for name, tensor in frozen_adapter_tensors(model).items():
            tensors[name] = tensor.detach().to("cpu", copy=True)
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


#: The keys of ``adapter_config.json`` an adapter cannot load without: dotted path → the JSON
#: type(s) allowed (``None`` = null).
REQUIRED_KEYS: dict[str, tuple[type | None, ...]] = {
    "format": (str,),
    "config": (dict,),
    "base_model": (dict,),
    "base_model.fingerprint": (dict,),
}
#: Keys that may be absent (older adapters) but have a type when present.
OPTIONAL_KEYS: dict[str, tuple[type | None, ...]] = {
    "base_model.name_or_path": (str, None),
    "task_token_id": (int, None),
    "tensors": (dict,),
}
_JSON_TYPES = {str: "a string", dict: "an object", int: "an integer", None: "null"}


def _check_keys(meta: dict[str, Any], path: Path, fix: str) -> None:
    """Refuse a parsed ``adapter_config.json`` that lacks a required key or has a key of the
    wrong type (one line naming the file and the key)."""
    for keys, required in ((REQUIRED_KEYS, True), (OPTIONAL_KEYS, False)):
        for dotted, kinds in keys.items():
            node: Any = meta
            for part in dotted.split("."):
                node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
            if node is KeyError:
                if required:
                    raise AdapterError(
                        f"{path}: required key {dotted!r} is missing; the file is incomplete — "
                        f"{fix}"
                    )
                continue
            ok = any(
                node is None if k is None else isinstance(node, k) and not isinstance(node, bool)
                for k in kinds
            )
            if not ok:
                want = " or ".join(_JSON_TYPES[k] for k in kinds)
                raise AdapterError(
                    f"{path}: key {dotted!r} must be {want}, got {json.dumps(node)[:60]}; "
                    f"the file was edited or damaged — {fix}"
                )


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory, with routing options the
    adapter predates set to what it was trained with (:func:`legacy_routing_defaults`).

    Validated: readable JSON, the hmora-ds format, the required keys with their types
    (:data:`REQUIRED_KEYS`) and a valid method config.

    Raises:
        AdapterNotFoundError: the directory or its ``adapter_config.json`` does not exist.
        AdapterError: the file is not valid JSON, lacks a key, or holds an invalid config.
    """
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise AdapterNotFoundError(
            f"load_adapter: adapter directory {directory} does not exist; give the directory "
            f"save_adapter or python -m hmora_ds.export wrote ({CONFIG_NAME} + {WEIGHTS_NAME})"
        )
    if not path.is_file():
        raise AdapterNotFoundError(
            f"load_adapter: {path} not found (is {directory} an adapter dir? it needs "
            f"{CONFIG_NAME} + {WEIGHTS_NAME})"
        )
    meta = read_adapter_meta(path, REEXPORT)
    meta["config"] = legacy_routing_defaults(meta["config"])
    try:
        HMoRAConfig.from_dict(meta["config"])
    except ValueError as err:
        raise AdapterError(f"{path}: its method config is invalid: {err}") from None
    return meta


def read_adapter_meta(path: str | Path, fix: str = REEXPORT) -> dict[str, Any]:
    """An adapter's metadata JSON (``adapter_config.json``, or the ``adapter_meta.json`` of a
    checkpoint), parsed and checked: valid JSON, an object, the hmora-ds format, the keys of
    :data:`REQUIRED_KEYS` with their types.

    Args:
        path: the file.
        fix: what to do about a damaged file (the end of the message).

    Raises:
        AdapterError: one line naming the file, what is wrong and ``fix``.
    """
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AdapterError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            f"the file is truncated or damaged — {fix}"
        ) from None
    except UnicodeDecodeError:
        raise AdapterError(f"{path}: not a text (UTF-8 JSON) file — {fix}") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(meta).__name__} — {fix}")
    if meta.get("format") != FORMAT:
        raise AdapterError(
            f"load_adapter: {path} is not an hmora-ds adapter (format {meta.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    _check_keys(meta, path, fix)
    return meta


def check_adapter(directory: str | Path) -> dict[str, Any]:
    """Check an adapter directory before anything slow runs; returns its parsed config.

    Reads ``adapter_config.json`` (:func:`read_adapter_config`) and the header of
    ``adapter_model.safetensors`` (names, shapes, that the file is as long as the header says;
    the tensor data is not read). Whether the tensors fit the model is checked when it loads
    (:func:`load_adapter`).

    Raises:
        AdapterNotFoundError: the directory or one of its files does not exist.
        AdapterError: a file is corrupt or incomplete.
    """
    meta = read_adapter_config(directory)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterNotFoundError(
            f"load_adapter: {weights} not found; the adapter is incomplete — {REEXPORT}"
        )
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError) as err:
        raise AdapterError(_corrupt_weights(weights, err)) from None
    if not names:
        raise AdapterError(f"{weights}: holds no tensor — {REEXPORT}")
    return meta


def _corrupt_weights(weights: Path, err: BaseException) -> str:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (
        f"{weights}: not a readable safetensors file ({reason}); it is truncated or damaged — "
        f"{REEXPORT}"
    )


def load_adapter(base_model: torch.nn.Module, directory: str | Path) -> HMoRAModel:
    """Inject the saved adapter into ``base_model`` and load its tensors strictly.

    Raises:
        AdapterNotFoundError: the directory lacks ``adapter_config.json`` or the weights (a
            ``FileNotFoundError``).
        AdapterError: a file is corrupt, the adapter was made for a base of another shape, or
            a tensor is missing, extra or mis-shaped (a ``ValueError``; one line naming the
            file or tensor and what to do).
    """
    directory = Path(directory)
    meta = check_adapter(directory)
    config = HMoRAConfig.from_dict(meta["config"])
    expected_fp = meta["base_model"]["fingerprint"]
    weights = directory / WEIGHTS_NAME
    # Compare shapes before touching the base: a refused adapter leaves it unmodified.
    details = fingerprint_mismatch(expected_fp, base_model, "adapter")
    if details:
        raise AdapterError(
            f"load_adapter: {directory} was made for base "
            f"{meta['base_model'].get('name_or_path')!r} of another shape: {details}; load it "
            "onto that base model"
        )
    # e_task is overwritten by the saved tensor; the token id only seeds its initial value.
    task_token_id = meta.get("task_token_id")
    # A library method's frozen experts are among the tensors: its library is not read.
    model = HMoRAModel(base_model, config, task_token_id=task_token_id or 0, from_adapter=True)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise AdapterError(_corrupt_weights(weights, err)) from None
    params = {**adapter_parameters(model), **frozen_adapter_tensors(model)}
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise AdapterError(
            f"load_adapter: {weights} does not match the model its {CONFIG_NAME} describes: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra)} unexpected (e.g. {extra[:3]}); the two files come from different "
            f"adapters — {REEXPORT}"
        )
    for name, param in params.items():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if name.endswith("alpha_logit") and tensors[name].dim() == 0 and shape == (1,):
            tensors[name] = tensors[name].reshape(1)  # a learnable α saved before it was (1,)
        if tuple(tensors[name].shape) != shape:
            raise AdapterError(
                f"load_adapter: tensor {name} has shape {tuple(tensors[name].shape)} in {weights}, "
                f"the model its {CONFIG_NAME} describes expects {shape}; the two files come from "
                f"different adapters — {REEXPORT}"
            )
    with torch.no_grad():
        for name, param in params.items():
            with gathered([param], modify=True):
                param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))
    model.task_token_id = task_token_id
    return model

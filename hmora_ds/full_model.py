"""A full fine-tune's output: the whole model, saved as Hugging Face saves it.

A full fine-tune has no adapter: :func:`save_trained` writes the base model with its trained
weights (sharded safetensors, ``config.json``, the tokenizer) to ``model/`` and ``model_best/``
of the run, where an adapter method writes ``adapter/`` and ``adapter_best/``. The directory
loads anywhere a model name goes: ``hmora-ds eval --model runs/x/model_best``,
``hmora-ds chat --model …``, ``AutoModelForCausalLM.from_pretrained``.

Under ZeRO-3 every rank holds a shard of each weight: the weights are gathered one at a time
(a collective, so every rank calls this) and only the writing rank keeps a CPU copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from hmora_ds import __version__

#: The run's output directories: (final, best) for adapters and for a full fine-tune.
ADAPTER_DIRS = ("adapter", "adapter_best")
MODEL_DIRS = ("model", "model_best")
INFO_NAME = "hmora_ds_model.json"


def output_dirs(full_finetune: bool) -> tuple[str, str]:
    """``(final, best)`` output directory names of a run."""
    return MODEL_DIRS if full_finetune else ADAPTER_DIRS


def save_full_model(
    model: Any,
    directory: str | Path,
    tokenizer: Any = None,
    *,
    write: bool = True,
    max_shard_size: str = "5GB",
) -> Path:
    """Write ``model.base_model`` (every weight gathered) to ``directory`` in the HF layout.

    The directory is written beside its final name and renamed into place, so a crash never
    leaves a half-written model under the name.
    """
    from hmora_ds.base_model import gathered

    base = model.base_model
    state = {}
    for name, param in base.named_parameters():
        with gathered([param]):
            if write:
                state[name] = param.detach().to("cpu", copy=True)
    directory = Path(directory)
    if not write:
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base.save_pretrained(
        str(tmp), state_dict=state, safe_serialization=True, max_shard_size=max_shard_size
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    info = {"hmora_ds_version": __version__, "method": model.config.method}
    (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def save_trained(model: Any, directory: str | Path, tokenizer: Any, *, write: bool) -> Path:
    """The run's trained result: the adapter, or the whole model of a full fine-tune."""
    from hmora_ds.adapter_io import save_adapter

    if model.config.full_finetune:
        return save_full_model(model, directory, tokenizer, write=write)
    return save_adapter(model, directory, write=write)

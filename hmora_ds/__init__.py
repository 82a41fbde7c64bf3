"""hmora-ds: HMoRA (hierarchical mixture of LoRA experts) fine-tuning on DeepSpeed.

Heavy modules (transformers, deepspeed) are imported lazily: ``import hmora_ds`` is cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "HMoRAConfig": "hmora_ds.config",
    "load_config": "hmora_ds.config",
    "HMoRAModel": "hmora_ds.model",
    "HMoRAOutput": "hmora_ds.model",
    "save_adapter": "hmora_ds.adapter_io",
    "load_adapter": "hmora_ds.adapter_io",
    "parameter_report": "hmora_ds.params",
    "lora_plus_param_groups": "hmora_ds.optim",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hmora_ds' has no attribute {name!r}")

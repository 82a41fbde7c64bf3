"""LoRA-mixture methods as plug-ins: one file per method, one registry.
    from hmora_ds.methods import available_methods, get_method, register_method

A method subclasses :class:`Method` and is registered with :func:`register_method`; configs
name it in their ``method`` field. See ``docs/methods.md`` for how a method is put together.
"""

from hmora_ds.methods import (  # registers them
    adamole,
    full_ft,
    himole,
    hmora,
    hydralora,
    lora,
    loramoe,
    mixlora,
    mixture_of_loras,
    moelora,
    mola,
    mole,
    molora,
)
from hmora_ds.methods.base import (
    Method,
    RoutingBatch,
    adapter_parameters,
    available_methods,
    build_method,
    freeze_bank_tensors,
    frozen_adapter_tensors,
    get_method,
    import_plugins,
    library_missing,
    method_presets,
    register_method,
    stack_records,
)

__all__ = [
    "Method",
    "RoutingBatch",
    "adamole",
    "adapter_parameters",
    "available_methods",
    "build_method",
    "freeze_bank_tensors",
    "frozen_adapter_tensors",
    "full_ft",
    "get_method",
    "himole",
    "hmora",
    "hydralora",
    "import_plugins",
    "library_missing",
    "lora",
    "loramoe",
    "method_presets",
    "mixlora",
    "mixture_of_loras",
    "moelora",
    "mola",
    "mole",
    "molora",
    "register_method",
    "stack_records",
]

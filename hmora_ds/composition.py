"""Building the model of a method that composes a LoRA library (MoLE, Mixture-of-LoRAs).

A method with :attr:`~hmora_ds.methods.Method.library_experts` takes its experts from a
library (:mod:`hmora_ds.library`): :func:`build_model` reads ``options.library``, completes the
config from the library's LoRAs and builds the wrapper model with them as its experts; for any
other method it is ``HMoRAModel(base, config, …)``. Every entry point that builds a model from
a config (training, the TP report) goes through it; a saved adapter loads without the library
(:func:`~hmora_ds.adapter_io.load_adapter`).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from hmora_ds.config import TARGETS, HMoRAConfig
from hmora_ds.methods import get_method
from hmora_ds.model import HMoRAModel

logger = logging.getLogger(__name__)


def build_model(base_model: nn.Module, config: HMoRAConfig, **kwargs: Any) -> HMoRAModel:
    """The wrapper model of ``config`` around ``base_model`` (keyword arguments: those of
    :class:`~hmora_ds.model.HMoRAModel`), reading the library of a method that composes one
    (:func:`resolve_library`; on the meta device only its manifests)."""
    if get_method(config.method).library_experts is None:
        return HMoRAModel(base_model, config, **kwargs)
    on_meta = any(p.device.type == "meta" for p in base_model.parameters())
    config, sites = resolve_library(config, base_model, load_tensors=not on_meta)
    return HMoRAModel(base_model, config, library_sites=sites, **kwargs)


def resolve_library(
    config: HMoRAConfig, base_model: nn.Module, *, load_tensors: bool = True
) -> tuple[HMoRAConfig, list[dict[str, Any]]]:
    """The config of a method that composes a LoRA library (:attr:`Method.library_experts`),
    completed from the library, and the library's LoRAs.

    Reads ``options.library`` (``options.tasks`` selects and orders entries; empty = all),
    refuses a library of another base or whose LoRAs differ in rank, alpha, rslora or
    targets, and returns the config with ``adapter.rank / alpha / rslora / targets`` those of
    the LoRAs, ``adapter.num_experts`` the number of LoRAs and ``options.tasks`` their tasks
    (what a saved adapter records, so it loads without the library), plus each task's
    ``{module path: LoRASite}`` in that order (``[]`` without ``load_tensors``, e.g. on the
    meta device).

    Raises:
        ValueError: one line: no ``options.library``, not a library, another base model,
            LoRAs of different shapes, fewer than two LoRAs.
    """
    from hmora_ds.library import Library, LibraryError, load_lora

    name, options = config.method, config.options
    directory = options.get("library")
    if not directory:
        raise ValueError(
            f"method.options.library: method {name} composes the LoRAs of a library and needs "
            "its directory (built by python -m hmora_ds.library build --out DIR); set "
            "method.options.library=DIR"
        )
    library = Library.load(directory).select(list(options.get("tasks") or []) or None)
    library.check_base(base_model)
    shape = library.check_uniform()  # one rank, alpha, rslora and set of targets
    if len(library.entries) < 2:
        raise LibraryError(
            f"library {library.root}: method {name} mixes at least 2 LoRAs, the selection "
            f"holds 1 ({library.tasks[0]}); add tasks to the library or to options.tasks"
        )
    rank, alpha, rslora = shape["rank"], shape["alpha"], shape["rslora"]
    targets = [t for t in TARGETS if t in shape["targets"]]
    resolved = config.with_overrides({
        "adapter.rank": rank, "adapter.alpha": alpha, "adapter.rslora": rslora,
        "adapter.targets": targets, "adapter.single_lora_layers": [],
        "adapter.num_experts": len(library.entries), "options.tasks": library.tasks,
    })  # fmt: skip
    resolved.preset = config.preset
    logger.info(
        "method %s: library %s, %d LoRAs (%s), rank %d, alpha %g%s, targets %s (the adapter "
        "settings are the library's)", name, library.root, len(library.entries),
        ", ".join(library.tasks), rank, alpha, ", rslora" if rslora else "", targets,
    )  # fmt: skip
    sites = [load_lora(e.adapter) for e in library.entries] if load_tensors else []
    return resolved, sites

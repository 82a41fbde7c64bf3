"""Trainable-parameter report (the paper's TP column) and ``python -m hmora_ds.params``.

TP = trainable parameters (adapters, routers, task encoder, ``e_task``, learnable α) as a
percentage of the base model's parameter count, tied embeddings counted once (spec §7).
Works on a model built on the ``meta`` device from a config alone, so no weights are needed::

    python -m hmora_ds.params --model-config qwen2-1.5b --preset hmora_lw method.routing.eps=2

Overrides are the run config's ``method.*`` keys (``docs/config.md``), or the same keys without
the ``method.`` prefix (``routing.eps=2``).
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from hmora_ds.cli import Parser, prog_name
from hmora_ds.config import (
    HMoRAConfig,
    apply_overrides,
    available_presets,
    load_config,
    parse_override,
)
from hmora_ds.methods import adapter_parameters

MODEL_CONFIGS_DIR = Path(__file__).parent / "model_configs"

#: Display order of the trainable components of the built-in methods (a method may add more).
COMPONENTS = (
    "lora A",
    "lora B",
    "token routers",
    "task routers",
    "alpha",
    "task encoder",
    "e_task",
    "base model",
)


@dataclass(frozen=True)
class ParameterReport:
    """Trainable parameters by component and TP % of the base model."""

    components: dict[str, int]
    trainable: int
    base: int

    @property
    def tp_percent(self) -> float:
        return 100.0 * self.trainable / self.base

    def format(self) -> str:
        """A table, ending with the line ``TP <percent>%``."""
        lines = [f"{'component':<16}{'parameters':>16}{'% of base':>12}"]
        order = [*COMPONENTS, *sorted(set(self.components) - set(COMPONENTS))]
        for comp in order:
            if self.components.get(comp):
                n = self.components[comp]
                lines.append(f"{comp:<16}{n:>16,}{100.0 * n / self.base:>11.3f}%")
        lines.append(f"{'trainable':<16}{self.trainable:>16,}{self.tp_percent:>11.3f}%")
        lines.append(f"{'base model':<16}{self.base:>16,}")
        lines.append(f"TP {self.tp_percent:.2f}%")
        return "\n".join(lines)


def parameter_report(model: torch.nn.Module) -> ParameterReport:
    """Count the trainable parameters of an :class:`~hmora_ds.model.HMoRAModel` by component
    (each method names the components of its parameters)."""
    counts: Counter[str] = Counter()
    for name, p in adapter_parameters(model).items():
        counts[model.method.component_of(name)] += int(getattr(p, "ds_numel", p.numel()))
    return ParameterReport(dict(counts), sum(counts.values()), model.base_parameter_count)


def load_model_config(name_or_path: str):
    """A shipped architecture (``qwen2-1.5b``, ``llama-3.2-1b``) or a config.json / model dir."""
    from transformers import AutoConfig

    shipped = MODEL_CONFIGS_DIR / f"{name_or_path}.json"
    path = shipped if shipped.is_file() else Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        names = sorted(p.stem for p in MODEL_CONFIGS_DIR.glob("*.json"))
        raise ValueError(
            f"--model-config: {name_or_path!r} is neither a shipped architecture {names} "
            "nor a config.json / model directory"
        )
    return AutoConfig.from_pretrained(str(path))


def build_meta_model(model_config, config: HMoRAConfig):
    """Base model + HMoRA on the ``meta`` device: shapes only, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    # The model logs its report: imported where used. A library method reads its library's
    # manifests (the adapter's rank, targets and expert count), no tensor.
    from hmora_ds.composition import build_model

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model_config)
        return build_model(base, config)


#: The run config's namespace of method keys: ``method.routing.eps`` is ``routing.eps`` here.
METHOD_PREFIX = "method."
#: The run config's other top-level keys (``hmora_ds.train.config.RunConfig``; the training
#: package is a layer above this one, tests/test_config_keys.py keeps the two in sync).
RUN_CONFIG_KEYS = frozenset(
    {"model", "preset", "data", "train", "eval", "checkpoint", "parallel", "dist", "output_dir"}
    | {"plugins", "log"}
)


def method_overrides(items: list[str]) -> dict[str, Any]:
    """Dotted overrides in either namespace as ``{method-config key: value}`` (:func:`load_config`).

    ``method.routing.eps=2`` (the run config's key, as launchers/train.py, ``hmora_ds.plan`` and
    ``hmora_ds.ablate`` take it) and ``routing.eps=2`` name the same field. A key of another
    run-config section (``train.lr``) is an error naming the key and the tools that use it;
    unknown keys are errors naming the key as it was written.
    """
    run_only = RUN_CONFIG_KEYS - {f.name for f in fields(HMoRAConfig)}
    known = {"method": HMoRAConfig().to_dict()}
    out: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        top = key.split(".")[0]
        if key.startswith(METHOD_PREFIX):
            apply_overrides(copy.deepcopy(known), {key: value})  # an unknown key, as written
            key = key[len(METHOD_PREFIX) :]
        elif top in run_only:
            hint = "; give the architecture with --model-config" if top == "model" else ""
            raise ValueError(
                f"override {key}: a run-config key for launchers/train.py, "
                "python -m hmora_ds.plan and python -m hmora_ds.ablate --set; "
                "hmora_ds.params takes method keys only: method.adapter.*, method.routing.*, "
                f"method.loss.* (the method. prefix is optional){hint}"
            )
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog=prog_name("hmora_ds.params"),
        description="Trainable parameters and TP % of an HMoRA preset on a base architecture "
        "(built on the meta device: no weights needed).",
    )
    parser.add_argument(
        "--model-config",
        required=True,
        help="qwen2-1.5b, llama-3.2-1b, or a config.json / model directory",
    )
    parser.add_argument(
        "--preset",
        default="hmora_lw",
        help=f"preset name or YAML/JSON file; presets: {available_presets()}",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="method keys of the run config (docs/config.md), with or without the method. "
        "prefix: method.adapter.num_experts=16 or adapter.num_experts=16",
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.preset, method_overrides(args.overrides) or None)
        model = build_meta_model(load_model_config(args.model_config), config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"model {args.model_config} · preset {args.preset}"
        + (f" · {' '.join(args.overrides)}" if args.overrides else "")
    )
    print(parameter_report(model).format())
    return 0


if __name__ == "__main__":
    sys.exit(main())

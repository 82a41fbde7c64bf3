"""Fill a DeepSpeed JSON from the run config (HF-style ``"auto"`` values).

The run config is the single source of batch sizes, accumulation, clipping and precision. A
DeepSpeed JSON may leave those fields out or set them to ``"auto"``; a concrete value that
disagrees with the run config is an error naming both values. The optimizer and the lr schedule
are built by hmora-ds (LoRA+ groups, torch AdamW on CPU), so the JSON must not define them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hmora_ds.train.config import RunConfig


def read_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--deepspeed: {path} does not exist (see ds_configs/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--deepspeed: {path} is not valid JSON ({err})") from None


def _fill(cfg: dict[str, Any], key: str, value: Any, source: str) -> None:
    current = cfg.get(key, "auto")
    if current != "auto" and current != value:
        raise ValueError(
            f"ds_config {key}={current!r} conflicts with run config {source}={value!r}; "
            f'set it to "auto" or make them equal'
        )
    cfg[key] = value


def build_ds_config(
    ds_config: dict[str, Any], run: RunConfig, world_size: int, on_cpu: bool
) -> dict[str, Any]:
    """The DeepSpeed config dict for ``deepspeed.initialize``.

    Args:
        ds_config: the parsed JSON (not modified).
        run: the run config.
        world_size: data-parallel ranks.
        on_cpu: running on DeepSpeed's CPU accelerator.
    """
    cfg = copy.deepcopy(ds_config)
    t = run.train
    for block in ("optimizer", "scheduler"):
        if block in cfg:
            raise ValueError(
                f"ds_config {block}: hmora-ds builds the {block} from the run config "
                f"(train.lr, train.schedule, LoRA+ groups); remove the {block!r} block"
            )
    _fill(cfg, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size")
    _fill(cfg, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum")
    _fill(
        cfg,
        "train_batch_size",
        t.micro_batch_size * t.grad_accum * world_size,
        f"train.micro_batch_size×train.grad_accum×world({world_size})",
    )
    _fill(cfg, "gradient_clipping", float(t.grad_clip), "train.grad_clip")
    # Precision is bf16 *autocast* with fp32 adapter weights, done by hmora-ds: DeepSpeed's own
    # fp16/bf16 modes (which cast the trainable weights) stay off.
    for mode in ("fp16", "bf16"):
        block = cfg.get(mode, {})
        enabled = block.get("enabled", "auto") if isinstance(block, dict) else block
        if enabled not in ("auto", False):
            raise ValueError(
                f"ds_config {mode}.enabled={enabled!r}: precision comes from run config "
                f'train.precision (bf16 autocast, fp32 adapters); set it to "auto"'
            )
        cfg.pop(mode, None)
    # DeepSpeed's engine.forward switches an outer torch.autocast OFF unless its own
    # ``torch_autocast`` section is on (deepspeed/runtime/torch_autocast.py), so bf16 autocast is
    # declared there. No lower-precision-safe modules: no parameter gets a bf16 communication
    # dtype, gradients of the fp32 adapters are reduced in fp32.
    if "torch_autocast" in cfg:
        raise ValueError(
            "ds_config torch_autocast: precision comes from run config train.precision "
            "(bf16 autocast, fp32 adapters); remove the torch_autocast block"
        )
    if t.precision == "bf16" or (t.precision == "auto" and not on_cpu):
        cfg["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        }
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # Our client optimizer is torch AdamW (DeepSpeed's CPUAdam would JIT-compile ~150 s).
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    if on_cpu:
        zero.setdefault("overlap_comm", False)
    return cfg


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))

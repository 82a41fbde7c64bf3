"""Building the DeepSpeed engine of a run: base model, adapters, expert parallelism, optimizer.

Two stages, because their failures and costs differ: :func:`plan_engine` only reads configs
(it fills the DeepSpeed JSON, picks the method config and validates the expert-parallel layout,
so a bad run fails before anything is downloaded or loaded); :func:`build_engine` loads the base,
injects (or loads) the adapters, splits experts over ranks, and hands model, optimizer and
schedule to ``deepspeed.initialize``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hmora_ds.adapter_io import AdapterError, check_adapter, load_adapter
from hmora_ds.composition import build_model as build_model_of
from hmora_ds.config import HMoRAConfig
from hmora_ds.methods.base import Method
from hmora_ds.model import HMoRAModel
from hmora_ds.optim import lora_plus_param_groups
from hmora_ds.parallel.expert_parallel import to_expert_parallel, validate_expert_parallel
from hmora_ds.params import ParameterReport, parameter_report
from hmora_ds.runtime.dist import DistInfo, on_cpu, rank0_first
from hmora_ds.runtime.loading import (
    load_base_model,
    load_tokenizer,
    resolve_checkpoint,
    torch_dtype,
)
from hmora_ds.train.config import RunConfig, TrainConfig
from hmora_ds.train.deepspeed_config import build_ds_config, zero_stage
from hmora_ds.train.schedule import build_scheduler

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class EnginePlan:
    """What a run's engine will be, decided from configs alone.

    Attributes:
        ds_config: the DeepSpeed JSON with its "auto" fields filled from the run.
        method: the HMoRA method config (a starting adapter's own config wins).
        precision: ``fp32`` or ``bf16`` (``auto`` resolved: fp32 on CPU, bf16 elsewhere).
        autocast_dtype: ``torch.bfloat16`` under bf16 autocast, else None.
    """

    ds_config: dict[str, Any]
    method: HMoRAConfig
    precision: str
    autocast_dtype: torch.dtype | None


def resolve_method(run: RunConfig) -> HMoRAConfig:
    """The run's method config, or the starting adapter's own (``model.adapter``).

    The run's own is built (and validated) either way."""
    method = run.hmora_config()
    if run.model.adapter:  # the adapter's own method config wins
        try:  # both files checked now, before anything is loaded
            meta = check_adapter(run.model.adapter)
        except AdapterError as err:
            raise type(err)(f"model.adapter: {err}") from None
        method = HMoRAConfig.from_dict(meta["config"])
    return method


def plan_engine(run: RunConfig, ds_config: dict[str, Any], info: DistInfo) -> EnginePlan:
    """Fill the DeepSpeed config, resolve method and precision, validate the EP layout.

    Raises:
        ValueError: an expert-parallel layout the world size, ZeRO stage or routing forbids.
    """
    ds_config = build_ds_config(ds_config, run, info.world_size, on_cpu())
    method = resolve_method(run)
    validate_expert_parallel(
        run.parallel.ep_size,
        method.adapter.num_experts,
        info.world_size,
        zero_stage(ds_config),
        method.routing.mode,
        method.has_mixture,
    )
    precision = run.train.precision
    if precision == "auto":
        precision = "fp32" if info.device.type == "cpu" else "bf16"
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    return EnginePlan(ds_config, method, precision, autocast_dtype)


def resolve_base(run: RunConfig, rank: int) -> tuple[str, Any]:
    """(local checkpoint path, tokenizer) of the base; rank 0 downloads first. The tokenizer
    carries the chat template of ``data.chat_template`` (training and evaluation share it); a
    tokenizer without one and no ``data.chat_template`` is a one-line error."""
    from hmora_ds.data.chat_templates import apply_chat_template_setting

    checkpoint = rank0_first(
        lambda: resolve_checkpoint(run.model.name_or_path, run.model.gguf_file), rank
    )
    tokenizer = load_tokenizer(checkpoint, run.model.tokenizer)
    model = run.model.tokenizer or run.model.name_or_path
    return checkpoint, apply_chat_template_setting(tokenizer, run.data.chat_template, model)


@dataclass
class BuiltEngine:
    """What :func:`build_engine` built.

    Attributes:
        engine: the DeepSpeed engine (it owns optimizer and scheduler).
        model: ``engine.module``.
        report: trainable / total parameters, counted before experts were split over ranks.
        dp_group: the data-parallel group auxiliary losses are all-reduced over (None: 1 rank).
    """

    engine: Any
    model: HMoRAModel
    report: ParameterReport
    dp_group: Any


def build_model(
    run: RunConfig, plan: EnginePlan, info: DistInfo, checkpoint: str, tokenizer: Any
) -> HMoRAModel:
    """Load the frozen base and wrap it in fresh (or loaded) adapters, on ``info.device``
    unless ZeRO-3 places the (partitioned) weights itself."""
    dtype = torch_dtype(run.model.dtype, info.device.type == "cuda")
    base = load_base_model(checkpoint, dtype, run.model.attn_implementation, plan.ds_config)
    # Same seed on every rank right before the adapters are initialised: identical replicas,
    # and the same initial weights as a one-process run whatever loading consumed.
    seed_everything(run.train.seed)
    if run.model.adapter:
        model = load_adapter(base, run.model.adapter)
        logger.info("started from adapter %s (its method config is used)", run.model.adapter)
    else:
        model = build_model_of(base, plan.method, tokenizer=tokenizer)  # reads a library
    if zero_stage(plan.ds_config) < 3:
        model.to(info.device)
    return model


def split_experts(model: HMoRAModel, ep: int, num_experts: int, rank: int) -> None:
    """Keep this rank's ``num_experts / ep`` experts of every mixture block (EP > 1)."""
    n = to_expert_parallel(model, ep, rank % ep)
    logger.info(
        "expert parallelism: %d blocks, %d of %d experts per rank",
        n,
        num_experts // ep,
        num_experts,
    )


#: Devices where ``torch.optim.AdamW(fused=True)`` runs.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_optimizer(model: HMoRAModel, t: TrainConfig, ep: int):
    """AdamW over LoRA+ parameter groups (routing parameters at ``router_lr_mult · lr``), and
    the LR schedule (a ``LambdaLR``: one factor for every group, so their ratios hold), times
    the method's per-step :meth:`~hmora_ds.methods.Method.lr_scale` where it has one.

    With EP > 1 expert parameters get groups of their own (DeepSpeed reduces them over the
    expert-data-parallel ranks only); empty groups are dropped.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    param_groups = lora_plus_param_groups(
        model, t.lr, t.weight_decay, router_lr_mult=t.router_lr_mult
    )
    if ep > 1:
        param_groups = [
            g
            for g in split_params_into_different_moe_groups_for_optimizer(param_groups)
            if g["params"]
        ]
    # torch's fused AdamW: one kernel over every tensor of a group instead of a Python loop of
    # ~10 small ops per tensor (the default on CPU, where torch picks neither foreach nor
    # fused). DeepSpeed hands it its flat fp32 partitions under ZeRO; it runs on CPU and CUDA.
    params = [p for g in param_groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES for p in params)
    optimizer = torch.optim.AdamW(param_groups, lr=t.lr, betas=t.adam_betas, fused=fused or None)
    method = getattr(model, "method", None)
    scale = None
    if method is not None and type(method).lr_scale is not Method.lr_scale:
        scale = lambda step: method.lr_scale(step, t.max_steps)  # noqa: E731
    scheduler = build_scheduler(
        optimizer, t.warmup_steps, t.max_steps, t.schedule, t.min_lr_ratio, scale
    )
    return optimizer, scheduler


def compile_for_engine(model: HMoRAModel, run: RunConfig, plan: EnginePlan) -> list[nn.Module]:
    """``train.compile``: regional ``torch.compile`` before DeepSpeed wraps the model (the
    modules keep their names, so checkpoints are those of an eager run). Under ZeRO-3 each
    decoder layer gathers its parameters at its entry
    (:func:`hmora_ds.compile.gather_layers_whole`), so no DeepSpeed hook runs inside a block
    and a compiled layer is one graph between DeepSpeed's entry and exit hooks, which run
    eagerly (``fullgraph`` off); returns the routers whose DeepSpeed hooks are then removed."""
    from hmora_ds.compile import compile_model, gather_layers_whole

    zero3 = zero_stage(plan.ds_config) >= 3
    compile_model(model, run.train.compile, fullgraph=not zero3, backend=run.train.compile_backend)
    return gather_layers_whole(model) if zero3 else []


def build_engine(
    run: RunConfig,
    plan: EnginePlan,
    info: DistInfo,
    checkpoint: str,
    tokenizer: Any,
    fresh: bool = True,
) -> BuiltEngine:
    """Model (see :func:`build_model`), expert split, gradient checkpointing, optimizer and
    schedule → ``deepspeed.initialize``. ``fresh``: the run starts from scratch (no
    ``--resume``), so the method's :meth:`~hmora_ds.methods.Method.start_training` prepares
    the new adapters (never those of ``model.adapter`` or a checkpoint)."""
    import deepspeed

    model = build_model(run, plan, info, checkpoint, tokenizer)
    if fresh and not run.model.adapter:
        model.method.start_training(model)
    report = parameter_report(model)  # before experts are split over ranks
    ep = run.parallel.ep_size
    if ep > 1:
        split_experts(model, ep, plan.method.adapter.num_experts, info.rank)
    if run.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.ce_chunk_tokens = run.train.ce_chunk_tokens
    gathered: list[nn.Module] = []
    if run.train.compile != "none":
        gathered = compile_for_engine(model, run, plan)
    logger.info(
        "model %s (%s): %s trainable parameters, TP %.2f%%",
        run.model.name_or_path,
        run.preset,
        f"{report.trainable:,}",
        report.tp_percent,
    )
    optimizer, scheduler = build_optimizer(model, run.train, ep)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=plan.ds_config
    )
    if run.train.compile != "none":
        from hmora_ds.compile import leave_hooks_eager

        leave_hooks_eager(engine.module, gathered=gathered)
    dp_group = dist.group.WORLD if info.world_size > 1 else None
    return BuiltEngine(engine, engine.module, report, dp_group)

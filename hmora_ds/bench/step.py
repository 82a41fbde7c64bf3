"""Benchmark: one training step of every method, side by side on one model shape and batch.

    python -m hmora_ds.bench step [--device cpu|cuda] [--quick] [--out bench/results]

A step is forward + backward + AdamW step (``zero_grad`` included). Rows:

- ``frozen base``: the base model's forward and the backward to its input embeddings, no
  adapter, no optimizer: the physical limit of adapter training (every adapter method must run
  at least this, since gradients flow through the frozen layers to the adapters below).
- every registered method's presets (LoRA r = 8 / 64, MoLoRA, MixLoRA, HydraLoRA, HMoRA w LW,
  HMoRA w/o LW, and any method registered with a preset);
- HMoRA with e = 4, 8, 16, 32 experts: the dense and the sparse top-k computation, and the
  **per-expert loop** of peer frameworks (:mod:`hmora_ds.bench.reference`);
- fast paths, each against its "before": routers shared but recomputed per member, the task
  encoder run per router, dropout per expert, ``.item()`` syncs in the step, gradient
  checkpointing on, and (CUDA) fp32 instead of bf16 autocast with fp32 adapters;
- the cost of task-router statistics over the optimizer step: the first micro-step of a
  6-micro-step step (the paper configs' accumulation), whose forward also re-encodes the other
  5 micro-batches' prompts (once per optimizer step; compare with ``HMoRA w LW``).

Time is the median over the timed steps. Memory: on CUDA the peak allocated bytes of the step;
on CPU (which has no allocator statistics) the bytes the step keeps alive at its peak, counted
exactly: parameters + gradients + AdamW state + every tensor autograd saved for backward
(deduplicated by storage). The base model is random-init (benchmarks time shapes, not weights).
Results: ``<out>/step_<device>.json`` and ``.md`` with ratios to LoRA r = 64 and the frozen base.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hmora_ds.lm_head import DEFAULT_CHUNK_TOKENS, chunked_lm_loss_sum

logger = logging.getLogger(__name__)

# Model shapes (Qwen2 architecture, random init). CPU: small enough for minutes on 2 cores.
SHAPES: dict[str, dict[str, Any]] = {
    "cpu": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=8192,
        batch=4,
        seq=256,
        warmup=1,
        steps=5,
    ),
    "quick": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        batch=2,
        seq=32,
        warmup=1,
        steps=2,
        # The smoke run checks the compiled rows' mechanics, not inductor's C++ build time.
        compile_backend="aot_eager",
    ),
    # Qwen2-1.5B (hmora_ds/model_configs/qwen2-1.5b.json), bf16 + SDPA.
    "cuda": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        batch=4,
        seq=1024,
        warmup=3,
        steps=10,
    ),
}
EXPERTS = (4, 8, 16, 32)
# Task-encoder heads must divide the hidden size of the small shapes.
ENCODER_HEADS = {"cpu": 16, "quick": 4, "cuda": 16}


@dataclass
class Variant:
    name: str
    group: str
    preset: str | None  # None: the frozen base
    overrides: list[str] = field(default_factory=list)
    patch: Callable[[Any], contextlib.AbstractContextManager] | None = None
    item_syncs: bool = False
    grad_ckpt: bool = False
    fp32: bool = False  # CUDA: no autocast, fp32 base
    slow: bool = False  # the per-expert loop: fewer timed steps (median of 3 after 1)
    # The first micro-step of an optimizer step of 1 + step_batches micro-batches: its forward
    # also encodes the other micro-batches' prompts for the step-level task statistics.
    step_batches: int = 0
    # A PEFT LoRA with the settings of this preset instead of ours (the peers' reference).
    peft: bool = False
    # train.compile of the variant (none | blocks | layers).
    compile: str = "none"
    # CUDA: the compiled regions replayed as CUDA graphs (torch.compile mode="reduce-overhead",
    # an experiment of the benchmark: train.compile does not offer it).
    cuda_graphs: bool = False
    # The LM loss from the full logits (train.ce_chunk_tokens=0) instead of in chunks.
    full_logits: bool = False
    note: str = ""


# ----------------------------------------------------------------------------- "before" patches
@contextlib.contextmanager
def _unshared_routers(model: Any) -> Iterator[None]:
    """Before: every member of a shared router group computes the gates itself."""
    groups = [g for g in model.routers.values() if g.shared]
    for g in groups:
        g.shared = False
    try:
        yield
    finally:
        for g in groups:
            g.shared = True


@contextlib.contextmanager
def _task_encoder_per_router(model: Any) -> Iterator[None]:
    """Before: the task encoder runs again for every task router (not once per forward)."""
    ctx, encode = model.routing_context, model._task_representation
    state: dict[str, Any] = {}

    def capture(*args):
        state["args"] = args
        return encode(*args)

    bound = ctx.task_repr_for

    def recompute(x):
        ctx._task_repr = encode(*state["args"])
        return bound(x)

    model._task_representation, ctx.task_repr_for = capture, recompute
    try:
        yield
    finally:
        del model._task_representation, ctx.task_repr_for


@contextlib.contextmanager
def _dropout_per_expert(model: Any) -> Iterator[None]:
    from hmora_ds.bench.reference import per_expert_dropout

    with per_expert_dropout(model):
        yield


@contextlib.contextmanager
def _kept_dropout_masks(model: Any) -> Iterator[None]:
    """Before: the expert banks' and routers' input dropout is ``nn.Dropout`` (an fp32 mask on
    CPU and the dropped copy kept per adapted linear and router) instead of a boolean mask and
    no copy."""
    from hmora_ds.experts.dropout import InputDropout

    class PlainDropout(InputDropout):
        def projects(self):
            return False

        def recomputable(self, x):
            return torch.nn.Dropout.forward(self, x), contextlib.nullcontext()

    mods = [m for m in model.modules() if type(m) is InputDropout]
    for m in mods:
        m.__class__ = PlainDropout
    try:
        yield
    finally:
        for m in mods:
            m.__class__ = InputDropout


@contextlib.contextmanager
def _loop(model: Any) -> Iterator[None]:
    from hmora_ds.bench.reference import per_expert_loop

    with per_expert_loop(model):
        yield


def variants(device: str) -> list[Variant]:
    from hmora_ds.config import load_config
    from hmora_ds.methods import library_missing, method_presets

    rows = [
        Variant("frozen base", "methods", None, note="forward + input-gradient backward"),
        Variant("PEFT LoRA r=8", "peft", "lora_r8", peft=True, note="PEFT, loss from HF logits"),
        Variant("PEFT LoRA r=64", "peft", "lora_r64", peft=True, note="PEFT, loss from HF logits"),
    ]
    # Every registered method's presets (a full fine-tune is not an adapter step: left out;
    # a preset that needs a LoRA library the benchmark does not have: skipped, logged).
    for preset, label, _ in method_presets():
        config = load_config(preset)
        missing = library_missing(config)
        if missing:
            logger.info("bench: preset %s skipped: %s", preset, missing)
        elif not config.full_finetune:
            rows.append(Variant(label.replace(" = ", "="), "methods", preset))
    for e in EXPERTS:
        for compute in ("dense", "sparse"):
            rows.append(
                Variant(
                    f"HMoRA e={e} {compute}",
                    "experts",
                    "hmora",
                    [f"adapter.num_experts={e}", f"adapter.compute={compute}"],
                )
            )
        rows.append(
            Variant(
                f"HMoRA e={e} per-expert loop",
                "experts",
                "hmora",
                [f"adapter.num_experts={e}", "adapter.compute=dense"],
                patch=_loop,
                slow=True,
                note="reference: peers' loop over experts",
            )
        )
    for preset, label in (("lora_r64", "LoRA r=64"), ("hmora_lw", "HMoRA w LW"),
                          ("hmora", "HMoRA w/o LW")):  # fmt: skip
        rows.append(Variant(f"{label} compiled", "compiled", preset, compile="layers",
                            note="train.compile=layers (inductor)"))  # fmt: skip
    if device == "cuda":
        for preset, label in (("lora_r64", "LoRA r=64"), ("hmora_lw", "HMoRA w LW")):
            rows.append(Variant(f"{label} compiled + CUDA graphs", "compiled", preset,
                                compile="layers", cuda_graphs=True,
                                note='layers compiled with mode="reduce-overhead"'))  # fmt: skip
    lw = "hmora_lw"
    rows += [
        Variant("LW: full logits (no chunked CE)", "fast paths", lw, full_logits=True),
        Variant("LW: dropout masks kept", "fast paths", lw, patch=_kept_dropout_masks),
        Variant("LoRA r=8: dropout masks kept", "fast paths", "lora_r8", patch=_kept_dropout_masks),
        Variant("LW: routers recomputed per member", "fast paths", lw, patch=_unshared_routers),
        Variant("LW: task encoder per router", "fast paths", lw, patch=_task_encoder_per_router),
        Variant("LW: dropout per expert", "fast paths", lw, patch=_dropout_per_expert),
        Variant("LW: .item() syncs in the step", "fast paths", lw, item_syncs=True),
        Variant("LW: gradient checkpointing", "fast paths", lw, grad_ckpt=True),
        Variant(
            "LW: 1st of 6 micro-steps (step task stats)",
            "fast paths",
            lw,
            step_batches=5,
            note="re-encodes 5 more micro-batches' prompts, once per optimizer step",
        ),
    ]
    if device == "cuda":
        rows.append(Variant("LW: fp32 (no bf16 autocast)", "fast paths", lw, fp32=True))
    return rows


# ----------------------------------------------------------------------------- measuring
def _base_config(shape: dict[str, Any]):
    from transformers import Qwen2Config

    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    )
    return Qwen2Config(
        **{k: shape[k] for k in keys},
        max_position_embeddings=max(4096, shape["seq"]),
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward (unique storages), i.e. activations.

    ``exclude``: storages already counted as model state (parameters, buffers): a linear
    saves its weight as a transposed *view*, which is not the ``Parameter`` itself but shares
    its storage, and must not be counted twice.
    """

    def __init__(self, exclude: set[int] | None = None) -> None:
        self.seen: dict[int, int] = {}
        self.exclude = exclude or set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            try:
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.exclude:
                    self.seen[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):
                pass
        return t

    # Only counts: code that keeps a tensor in another form (the expert banks' recomputed
    # dropout) shows it what it really keeps (hmora_ds/experts/dropout.py).
    pack.observes_saved_tensors = True  # type: ignore[attr-defined]

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _state_storages(model: torch.nn.Module) -> set[int]:
    """Storages of the model's parameters and buffers (counted as state, not as saved)."""
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(
        p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
    )  # gradients
    if opt is not None:
        for st in opt.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


def _build(v: Variant, base: torch.nn.Module, shape_name: str, device: torch.device):
    shape = SHAPES[shape_name]
    from hmora_ds.config import load_config
    from hmora_ds.model import HMoRAModel

    if v.preset is None:
        model = copy.deepcopy(base)
        model.requires_grad_(False)
        return model, None
    if v.peft:
        return _build_peft(v, base, device)
    overrides = list(v.overrides)
    if load_config(v.preset).routing.task_encoder == "transformer":
        overrides.append(f"routing.encoder_heads={ENCODER_HEADS[shape_name]}")
    cfg = load_config(v.preset, overrides)
    model = HMoRAModel(copy.deepcopy(base), cfg, task_token_id=3).to(device)
    if v.fp32:
        model.float()
    if v.grad_ckpt:
        model.gradient_checkpointing_enable()
    model.ce_chunk_tokens = 0 if v.full_logits else DEFAULT_CHUNK_TOKENS
    if v.compile != "none":
        from hmora_ds.compile import compile_model

        compile_model(
            model,
            v.compile,
            backend=shape.get("compile_backend", "inductor"),
            compile_mode="reduce-overhead" if v.cuda_graphs else None,
        )
    return model, _adamw(model)


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer | None:
    """The trainer's optimizer: torch AdamW, fused (one kernel for all tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None


def _build_peft(v: Variant, base: torch.nn.Module, device: torch.device):
    """PEFT's LoRA with the preset's rank, α, dropout and target layers (the peers' plain LoRA;
    its AdamW is the same fused one, so the rows differ in the adapter path and the loss)."""
    from peft import LoraConfig, get_peft_model

    from hmora_ds.base_model import ARCH_TARGETS
    from hmora_ds.config import load_config

    a = load_config(v.preset).adapter
    paths = ARCH_TARGETS[base.config.model_type]
    modules = sorted({paths[t].rpartition(".")[2] for t in a.targets})
    config = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout,
                        target_modules=modules, use_rslora=a.rslora, bias="none")  # fmt: skip
    model = get_peft_model(copy.deepcopy(base), config).to(device)
    return model, _adamw(model)


def _step_fn(v: Variant, model, opt, batch, device: torch.device, autocast: bool):
    ids, labels, mask, pmask = batch
    ac = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if autocast and not v.fp32
        else contextlib.nullcontext()
    )
    if v.preset is None:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()

        def step():
            # The adapters' loss path (chunked LM-head cross-entropy), so the rows differ only
            # in what the adapters add.
            x = emb(ids).detach().requires_grad_(True)
            with ac:
                hidden = model.get_decoder()(inputs_embeds=x, attention_mask=mask)
                total, n = chunked_lm_loss_sum(
                    hidden.last_hidden_state, head.weight, labels, DEFAULT_CHUNK_TOKENS
                )
            (total / n).backward()

        return step
    if v.peft:

        def step():
            opt.zero_grad(set_to_none=True)
            with ac:
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            opt.step()

        return step

    others = [{"input_ids": ids, "attention_mask": mask, "prompt_mask": pmask}] * v.step_batches

    def step():
        if v.cuda_graphs:  # a new iteration: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with ac:
            out = model(
                ids,
                attention_mask=mask,
                labels=labels,
                prompt_mask=pmask,
                instruction_mask=pmask,  # synthetic prompts: no template wrapper
                return_router_stats=False,  # as the trainer calls it
                step_batches=others or None,
            )
        out.loss.backward()
        if v.item_syncs:  # what the training step used to do: read scalars every step
            float(out.aux_loss.detach())
            float(out.lm_loss_sum.detach())
        opt.step()

    return step


def measure(
    v: Variant,
    base,
    shape: dict[str, Any],
    shape_name: str,
    device: torch.device,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    model, opt, step = _prepare(v, base, shape, shape_name, device)
    b, t = shape["batch"], shape["seq"]
    patch = v.patch(model) if v.patch is not None else contextlib.nullcontext()
    sync = _sync(device)
    times = []
    warmup, steps = (1, 3) if v.slow else (shape["warmup"], shape["steps"])
    if v.compile != "none":
        warmup += 1  # the first step compiles every layer variant
    # CUDA graphs keep a step's activations in the graphs' private memory pool, allocated while
    # the graphs are recorded (warm-up) and only reused by the timed replays: their peak is
    # counted from before the warm-up, every other row's over the timed steps.
    if device.type == "cuda" and v.cuda_graphs:
        torch.cuda.reset_peak_memory_stats(device)
    with patch:
        for _ in range(warmup):
            step()
        sync()
        if device.type == "cuda" and not v.cuda_graphs:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:
            saved = _SavedBytes(_state_storages(model))
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda x: x):
                step()
            peak = _state_bytes(model, opt) + saved.total
        flops = _step_flops(step) if v.compile == "none" else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_params = sum(p.numel() for p in base.parameters())
    median = statistics.median(times)
    row = {
        "name": v.name,
        "group": v.group,
        "preset": v.preset,
        "overrides": v.overrides,
        "note": v.note,
        "step_ms": median * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "tokens_per_s": b * t / median,
        "peak_mb": peak / 2**20,
        "tp_percent": 100.0 * trainable / base_params,
        "gflop": None if flops is None else flops / 1e9,
    }
    if v.preset is not None:
        from hmora_ds.experts import MoRALinear, prefer_sparse

        blocks = [m for m in model.modules() if isinstance(m, MoRALinear) and m.router]
        row["sparse_blocks"] = sum(m.sparse for m in blocks)
        row["auto_sparse_blocks"] = sum(
            m.router.mode == "topk"
            and prefer_sparse(m.num_experts, m.router.top_k, m.rank, m.in_features)
            for m in blocks
        )
        row["mixture_blocks"] = len(blocks)
    if profile_dir is not None:
        row["profile"] = _profile(step, patch_factory=v.patch, model=model, v=v, out=profile_dir)
    del model, opt, step
    gc.collect()  # routers and hooks form reference cycles: free the model before the next
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _prepare(v: Variant, base, shape: dict[str, Any], shape_name: str, device: torch.device):
    """``(model, optimizer, step)`` of variant ``v`` on the benchmark's fixed batch."""
    torch.manual_seed(0)
    model, opt = _build(v, base, shape_name, device)
    model.train()
    b, t, vocab = shape["batch"], shape["seq"], shape["vocab_size"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (b, t), generator=g).to(device)
    labels = ids.clone()
    labels[:, : t // 2] = -100  # the first half is the prompt, as in instruction tuning
    mask = torch.ones_like(ids)
    pmask = (labels == -100).long()
    autocast = device.type == "cuda"
    return model, opt, _step_fn(v, model, opt, (ids, labels, mask, pmask), device, autocast)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


#: The eager rows the step targets compare, timed once more in alternation (:func:`interleave`).
INTERLEAVED = ("frozen base", "LoRA r=8", "PEFT LoRA r=8", "LoRA r=64", "HMoRA w LW",
               "HMoRA w/o LW")  # fmt: skip


def interleave(
    todo: list[Variant], base, shape: dict[str, Any], shape_name: str, device: torch.device
) -> dict[str, float]:
    """Median step (ms) of each variant, timed in rounds of one step of every variant in turn.

    Each row of the table is timed in its own minute of the run: a machine whose speed drifts
    between minutes (a shared CPU's turbo and neighbours; measured up to 7 % between two full
    runs) moves one row against another, and so the targets' ratios. In alternation the drift
    touches every variant of a round alike and cancels in their ratios. All the models are
    built at once (patched variants are not: their patch may be global)."""
    if any(v.patch is not None for v in todo):
        raise ValueError("interleave: patched variants cannot be timed side by side")
    sync = _sync(device)
    steps = {}
    for v in todo:
        model, opt, step = _prepare(v, base, shape, shape_name, device)
        steps[v.name] = (model, opt, step)
    for _ in range(shape["warmup"]):
        for _model, _opt, step in steps.values():
            step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(shape["steps"]):
        for name, (_model, _opt, step) in steps.items():
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    del steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def _step_flops(step) -> float | None:
    """Floating-point operations one step executes: matrix products and attention, forward
    and backward (input and weight gradients), as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            step()
    except AssertionError as exc:  # torch < 2.13 cannot count grouped-query SDPA
        logger.warning("bench step: FLOPs not counted (%s)", exc)
        return None
    return float(counter.get_total_flops())


def gemm_peak(device: torch.device) -> float:
    """The machine's attainable matrix-product rate (FLOP/s), measured: the best of several
    large square GEMMs in the step's compute dtype (fp32 on CPU, bf16 on CUDA). The roofline
    column is a row's executed FLOP/s over this, its distance to the physical limit."""
    n, dtype, reps = (
        (2048, torch.float32, 5) if device.type == "cpu" else (8192, torch.bfloat16, 10)
    )
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _profile(step, patch_factory, model, v: Variant, out: Path) -> str:
    """Two steps under torch.profiler: the ops by self time → ``profile_<variant>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    patch = patch_factory(model) if patch_factory is not None else contextlib.nullcontext()
    with patch, profile(activities=activities) as prof:
        for _ in range(2):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    name = "".join(c if c.isalnum() else "_" for c in v.name).strip("_")
    path = out / f"profile_{name}.txt"
    events = prof.key_averages()
    path.write_text(
        f"# {v.name}: 2 steps\n" + events.table(sort_by=key, row_limit=40, max_name_column_width=60)
    )
    return str(path)


# ----------------------------------------------------------------------------- report
TARGETS = (
    ("HMoRA w LW step / LoRA r=64 step", "HMoRA w LW", "LoRA r=64", "step_ms", 1.10),
    ("compiled: HMoRA w LW step / LoRA r=64 step", "HMoRA w LW compiled", "LoRA r=64 compiled",
     "step_ms", 1.10),
    ("CUDA graphs: HMoRA w LW step / LoRA r=64 step", "HMoRA w LW compiled + CUDA graphs",
     "LoRA r=64 compiled + CUDA graphs", "step_ms", 1.10),
    ("HMoRA w LW step / frozen-base limit", "HMoRA w LW", "frozen base", "step_ms", 1.35),
    ("compiled: HMoRA w LW step / frozen-base limit", "HMoRA w LW compiled", "frozen base",
     "step_ms", 1.35),
    ("HMoRA w/o LW step / LoRA r=64 step", "HMoRA w/o LW", "LoRA r=64", "step_ms", 1.25),
    ("HMoRA w LW peak memory / LoRA r=64", "HMoRA w LW", "LoRA r=64", "peak_mb", 1.10),
    ("our LoRA r=8 step / PEFT LoRA r=8 step", "LoRA r=8", "PEFT LoRA r=8", "step_ms", 1.00),
)  # fmt: skip
#: Fraction of the measured GEMM peak the flagship's step reaches (a GPU target; shown on CPU).
ROOFLINE_TARGET = ("HMoRA w LW", 0.40)
SPEEDUPS = ((8, 3.0), (32, 5.0))
FAST_PATHS = (
    ("fused stacked experts (e=8)", "HMoRA e=8 per-expert loop", "HMoRA e=8 dense"),
    ("sparse top-k (e=16)", "HMoRA e=16 dense", "HMoRA e=16 sparse"),
    ("sparse top-k (e=32)", "HMoRA e=32 dense", "HMoRA e=32 sparse"),
    ("shared routers computed once", "LW: routers recomputed per member", "HMoRA w LW"),
    ("task encoder once per forward", "LW: task encoder per router", "HMoRA w LW"),
    ("dropout once", "LW: dropout per expert", "HMoRA w LW"),
    ("no .item() in the step", "LW: .item() syncs in the step", "HMoRA w LW"),
    ("bf16 autocast, fp32 adapters", "LW: fp32 (no bf16 autocast)", "HMoRA w LW"),
    ("chunked LM-head cross-entropy", "LW: full logits (no chunked CE)", "HMoRA w LW"),
    ("dropout: boolean mask, no dropped copy", "LW: dropout masks kept", "HMoRA w LW"),
    (
        "dropout: boolean mask, no dropped copy (LoRA r=8)",
        "LoRA r=8: dropout masks kept",
        "LoRA r=8",
    ),
    ("compiled decoder layers (LoRA r=64)", "LoRA r=64", "LoRA r=64 compiled"),
    ("compiled decoder layers (HMoRA w LW)", "HMoRA w LW", "HMoRA w LW compiled"),
    ("compiled decoder layers (HMoRA w/o LW)", "HMoRA w/o LW", "HMoRA w/o LW compiled"),
    ("CUDA graphs (LoRA r=64)", "LoRA r=64 compiled", "LoRA r=64 compiled + CUDA graphs"),
    ("CUDA graphs (HMoRA w LW)", "HMoRA w LW compiled", "HMoRA w LW compiled + CUDA graphs"),
)


def summarize(
    rows: list[dict[str, Any]],
    peak: float | None = None,
    interleaved: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Ratios, targets and fast paths; ``peak``: the measured GEMM rate in TFLOP/s;
    ``interleaved``: step medians (ms) of :func:`interleave`, which a step target between two
    of its variants uses instead of their rows."""
    by = {r["name"]: r for r in rows}
    interleaved = interleaved or {}
    ref, limit = by.get("LoRA r=64"), by.get("frozen base")
    for r in rows:
        if r.get("gflop") is None and r["name"].endswith(" compiled"):
            eager = by.get(r["name"].removesuffix(" compiled"))  # the same work, compiled
            r["gflop"] = eager.get("gflop") if eager else None
        r["tflops"] = None if r.get("gflop") is None else r["gflop"] / r["step_ms"]
        r["roofline"] = r["tflops"] / peak if peak and r["tflops"] is not None else None
        r["vs_lora_r64"] = r["step_ms"] / ref["step_ms"] if ref else None
        r["vs_frozen_base"] = r["step_ms"] / limit["step_ms"] if limit else None
        r["memory_vs_lora_r64"] = r["peak_mb"] / ref["peak_mb"] if ref else None
    targets = []
    for label, a, b, key, bound in TARGETS:
        if a in by and b in by:
            value = rows_value = by[a][key] / by[b][key]
            paired = key == "step_ms" and a in interleaved and b in interleaved
            if paired:
                value = interleaved[a] / interleaved[b]
            targets.append({"target": label, "value": value, "limit": bound, "met": value <= bound,
                            "rows_value": rows_value if paired else None})  # fmt: skip
    name, bound = ROOFLINE_TARGET
    if by.get(name, {}).get("roofline") is not None:
        value = by[name]["roofline"]
        targets.append(
            {
                "target": f"{name}: fraction of the GEMM peak",
                "value": value,
                "limit": bound,
                "met": value >= bound,
                "higher_is_better": True,
            }
        )
    for e, bound in SPEEDUPS:
        loop, ours = by.get(f"HMoRA e={e} per-expert loop"), _auto_row(by, e)
        if loop and ours:
            value = loop["step_ms"] / ours["step_ms"]
            targets.append(
                {
                    "target": f"speed-up over the per-expert loop, e={e} (ours: {ours['name']})",
                    "value": value,
                    "limit": bound,
                    "met": value >= bound,
                    "higher_is_better": True,
                }
            )
    fast = []
    for label, before, after in FAST_PATHS:
        if before in by and after in by:
            fast.append(
                {
                    "fast path": label,
                    "before": before,
                    "after": after,
                    "before_ms": by[before]["step_ms"],
                    "after_ms": by[after]["step_ms"],
                    "speedup": by[before]["step_ms"] / by[after]["step_ms"],
                    "before_mb": by[before]["peak_mb"],
                    "after_mb": by[after]["peak_mb"],
                }
            )
    if "LW: gradient checkpointing" in by and "HMoRA w LW" in by:
        gc, lw = by["LW: gradient checkpointing"], by["HMoRA w LW"]
        fast.append(
            {
                "fast path": "non-reentrant gradient checkpointing (memory for time)",
                "before": "HMoRA w LW",
                "after": "LW: gradient checkpointing",
                "before_ms": lw["step_ms"],
                "after_ms": gc["step_ms"],
                "speedup": lw["step_ms"] / gc["step_ms"],
                "before_mb": lw["peak_mb"],
                "after_mb": gc["peak_mb"],
            }
        )
    return {"targets": targets, "fast_paths": fast}


def _auto_row(by: dict[str, dict[str, Any]], e: int) -> dict[str, Any] | None:
    """Our computation at e experts as ``adapter.compute=auto`` chooses it (dense / sparse)."""
    dense, sparse = by.get(f"HMoRA e={e} dense"), by.get(f"HMoRA e={e} sparse")
    if dense is None or sparse is None:
        return dense or sparse
    return sparse if dense.get("auto_sparse_blocks") else dense


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["shape"]
    lines = [
        f"# Training-step benchmark ({doc['device']})",
        "",
        f"Machine: {m['device_name']}, {m['cpus']} CPU cores, torch {m['torch']}, "
        f"transformers {m['transformers']}, {m['platform']}. Date {doc['date']}.",
        f"Shape: Qwen2 hidden {s['hidden_size']}, FFN {s['intermediate_size']}, "
        f"{s['num_hidden_layers']} layers, {s['num_attention_heads']}/{s['num_key_value_heads']} "
        f"heads, vocab {s['vocab_size']}; batch {s['batch']} × {s['seq']} tokens; "
        f"{doc['precision']}; median of {s['steps']} steps after {s['warmup']} warm-up.",
        f"Memory: {doc['memory_kind']}.",
        "",
        f"Roofline: the FLOPs a step executes (matrix products and attention, forward and "
        f"backward, torch's FlopCounterMode) per second, over the best large GEMM measured on "
        f"this machine in this run: {_fmt(m.get('gemm_peak_tflops'), 3)} TFLOP/s.",
        "",
        "| variant | group | TP % | step ms | tokens/s | memory MB | × LoRA r=64 | × frozen base "
        "| memory × LoRA r=64 | GFLOP/step | % of GEMM peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        name = r["name"]
        if r.get("sparse_blocks"):
            name += f" ({r['sparse_blocks']}/{r['mixture_blocks']} blocks sparse)"
        lines.append(
            f"| {name} | {r['group']} | {_fmt(r['tp_percent'])} | {_fmt(r['step_ms'], 1)} "
            f"| {r['tokens_per_s']:.0f} | {_fmt(r['peak_mb'], 0)} | {_fmt(r['vs_lora_r64'])} "
            f"| {_fmt(r['vs_frozen_base'])} | {_fmt(r['memory_vs_lora_r64'])} "
            f"| {_fmt(r.get('gflop'), 1)} "
            f"| {_fmt(None if r.get('roofline') is None else 100 * r['roofline'], 1)} |"
        )
    lines += ["", "## Targets", ""]
    if doc.get("interleaved"):
        lines += [
            "A step ratio between two eager variants is measured interleaved: "
            f"{', '.join(doc['interleaved'])} were built together and timed one step each in "
            f"turn, {s['steps']} rounds after {s['warmup']} (medians "
            + ", ".join(f"{n} {ms:.1f} ms" for n, ms in doc["interleaved"].items())
            + "), so a drift of the machine's speed during the run cancels in the ratio; the "
            "last column is the same ratio from the table's rows, each timed in its own minute.",
            "",
        ]
    lines += ["| target | measured | limit | met | from the rows |", "|---|---|---|---|---|"]
    for t in doc["targets"]:
        op = "≥" if t.get("higher_is_better") else "≤"
        lines.append(
            f"| {t['target']} | {t['value']:.2f} | {op} {t['limit']:.2f} "
            f"| {'yes' if t['met'] else '**no**'} | {_fmt(t.get('rows_value'))} |"
        )
    lines += [
        "",
        "## Fast paths (before → after)",
        "",
        "| fast path | before ms | after ms | speed-up | before MB | after MB |",
        "|---|---|---|---|---|---|",
    ]
    for f in doc["fast_paths"]:
        lines.append(
            f"| {f['fast path']} | {f['before_ms']:.1f} | {f['after_ms']:.1f} "
            f"| {f['speedup']:.2f}× | {f['before_mb']:.0f} | {f['after_mb']:.0f} |"
        )
    if doc.get("failed"):
        lines += ["", "## Failed variants (not measured)", ""]
        lines += [f"- {f['name']}: {f['error']}" for f in doc["failed"]]
    return "\n".join(lines) + "\n"


def _machine(device: torch.device) -> dict[str, Any]:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device_name": name,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    """The CPU's model and the vector instruction set torch's kernels use on it (AVX2, AVX512):
    float32 results and speed ratios differ between instruction sets."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"


def _write(
    path: Path,
    device: str,
    quick: bool,
    shape,
    dev,
    rows: list[dict[str, Any]],
    peak: float,
    failed: list[dict[str, str]] | None = None,
    interleaved: dict[str, float] | None = None,
) -> None:
    machine = _machine(dev)
    machine["gemm_peak_tflops"] = peak / 1e12
    doc = {
        "benchmark": "step",
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "quick": quick,
        "machine": machine,
        "shape": shape,
        "precision": "bf16 autocast, bf16 base, fp32 adapters" if device == "cuda" else "fp32",
        "memory_kind": "torch.cuda.max_memory_allocated during the timed steps"
        if device == "cuda"
        else "parameters + gradients + AdamW state + tensors saved for backward (exact count)",
        "rows": rows,
        "failed": failed or [],
        "interleaved": interleaved or {},
    }
    doc.update(summarize(rows, peak / 1e12, interleaved))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    path.with_suffix(".md").write_text(markdown(doc))


def run(
    device: str = "auto",
    quick: bool = False,
    out_dir: str | Path = "bench/results",
    only: list[str] | None = None,
    profile: list[str] | None = None,
    batch: int | None = None,
    seq: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
) -> Path:
    """Measure every variant, write ``step_<device>.json`` / ``.md``; returns the JSON path."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench step: --device cuda but no CUDA device is visible")
    dev = torch.device(device)
    shape_name = "quick" if quick else device
    shape = dict(SHAPES[shape_name])
    tag = ""
    if batch or seq:
        shape.update({k: v for k, v in (("batch", batch), ("seq", seq)) if v})
        tag = f"_b{shape['batch']}x{shape['seq']}"
    shape.update({k: v for k, v in (("steps", steps), ("warmup", warmup)) if v})
    torch.manual_seed(0)
    cfg = _base_config(shape)
    cfg._attn_implementation = "sdpa"
    with dev:
        base = AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step_{device}{'_quick' if quick else ''}{tag}.json"
    rows: list[dict[str, Any]] = []
    known = {v.name: v for v in variants(device)}
    unknown = [name for name in only or [] if name not in known]
    if unknown:
        raise SystemExit(
            f"bench step: --only names unknown variant(s) {unknown}; choose from {list(known)}"
        )
    # --only runs in the order given (the most wanted rows first when time is short).
    todo = [known[name] for name in only] if only is not None else list(known.values())
    peak = gemm_peak(dev)
    failed: list[dict[str, str]] = []
    for v in tqdm(todo, desc="bench step", unit="variant"):
        prof = out if profile and v.name in profile else None
        vbase = copy.deepcopy(base).float() if v.fp32 and device == "cuda" else base
        try:
            rows.append(measure(v, vbase, shape, shape_name, dev, prof))
        except Exception as exc:  # one variant's failure (e.g. a compiler error) is reported
            # in the results and the log, and the other variants are still measured.
            logger.exception("bench step: variant %r failed", v.name)
            failed.append({"name": v.name, "error": f"{type(exc).__name__}: {exc}"[:500]})
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        else:
            logger.info("%s: %.1f ms, %.0f MB", v.name, rows[-1]["step_ms"], rows[-1]["peak_mb"])
        del vbase
        _write(path, device, quick, shape, dev, rows, peak, failed)  # after every row
    measured = {r["name"] for r in rows}
    pairs = [known[name] for name in INTERLEAVED if name in measured]
    if len(pairs) >= 2:
        logger.info("bench step: timing %s interleaved", ", ".join(v.name for v in pairs))
        interleaved = interleave(pairs, base, shape, shape_name, dev)
        _write(path, device, quick, shape, dev, rows, peak, failed, interleaved)
    if failed:
        names = ", ".join(f["name"] for f in failed)
        raise SystemExit(
            f"bench step: {len(failed)} variant(s) failed ({names}); the others are in {path}"
        )
    return path

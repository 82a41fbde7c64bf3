"""Task-router statistics over the whole optimizer step (``loss.task_stats=step``, spec §5).

The paper applies L_aux to each task router over its batch of 12 sequences, which the
official loop feeds as several micro-batches. Here 2 gloo ranks × 2 micro-steps × 2 sequences
run the trainer's own :func:`~hmora_ds.train.step.train_step` and must give the task-router
loss and the gradient of one process holding all 8 sequences:

- in float64, to 1e-6, with an engine that follows DeepSpeed's contract (each backward divided
  by the accumulation steps, gradients averaged over ranks at the boundary): DeepSpeed itself
  refuses float64 gradients;
- with the real DeepSpeed ZeRO-2 engine in float32, to float32 rounding;
- ``task_stats=micro`` (statistics per micro-batch) does *not* give the global loss, so the
  check can fail.

Tiny random-init Qwen2 models: this is about mechanics. With every layer task-routed
(ε = 0, μ = 3: α = 0.95 > β_high) every trainable gradient must match; with hybrid layers
(the preset's α(l)) token routers are per micro-batch by design, so there the task-router
loss value is compared.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hmora_ds.losses import total_loss
from hmora_ds.methods import adapter_parameters
from tests._dist import run_ranks
from tests.conftest import batch, randomize_adapters, tiny_hmora

NO_DROPOUT = {"adapter.dropout": 0.0, "routing.router_dropout": 0.0, "routing.encoder_dropout": 0.0}
TASK_ONLY = {**NO_DROPOUT, "routing.eps": 0.0, "routing.mu": 3.0, "loss.aux_weight": 0.5}
CASES = {  # name → (overrides, dtype)
    "task_only": (TASK_ONLY, torch.float64),
    "hybrid": ({**NO_DROPOUT, "loss.aux_weight": 0.5}, torch.float64),
    "task_only_micro": ({**TASK_ONLY, "loss.task_stats": "micro"}, torch.float64),
    "task_only_blc": (
        {**TASK_ONLY, "loss.aux": "blc", "loss.blc_task_routers": True},
        torch.float64,
    ),
}
WORLD, ACCUM, MICRO = 2, 2, 2
GLOBAL = WORLD * ACCUM * MICRO


def _model(overrides: dict, dtype: torch.dtype):
    model = tiny_hmora("hmora", overrides=overrides).to(dtype)
    randomize_adapters(model, seed=4)
    return model.train()


def _global_batch(left_pad: bool = False):
    ids, attn, labels, prompt = batch(bsz=GLOBAL, length=20, seed=3, left_pad=left_pad)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "prompt_mask": prompt}


def _micro_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches: rows [rank·4 + 2k, rank·4 + 2k + 2) for k = 0, 1."""
    full = _global_batch()
    out = []
    for k in range(ACCUM):
        rows = slice(rank * ACCUM * MICRO + k * MICRO, rank * ACCUM * MICRO + (k + 1) * MICRO)
        out.append({key: t[rows] for key, t in full.items()})
    return out


class ContractEngine:
    """The part of DeepSpeed's engine contract that :func:`train_step` relies on, in float64:
    ``backward`` divides by the accumulation steps and accumulates; at the accumulation
    boundary every gradient is averaged over the ranks (kept here instead of applied)."""

    def __init__(self, module: torch.nn.Module, accum: int, world: int) -> None:
        self.module, self.accum, self.world, self.micro = module, accum, world, 0
        self.grads: dict[str, torch.Tensor] = {}

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum:
            return
        for name, p in adapter_parameters(self.module).items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            self.grads[name] = g / self.world

    def get_global_grad_norm(self):
        return None

    def get_lr(self):
        return [0.0]

    def was_step_applied(self) -> bool:
        return True


def _worker(rank: int, world: int, out_dir: Path) -> None:
    import deepspeed

    from hmora_ds.runtime.dist import skip_cpu_shm_build
    from hmora_ds.train.step import train_step

    def run(engine) -> dict:
        metrics = train_step(engine, iter(_micro_batches(rank)), None, grad_accum=ACCUM,
                             world=world, device=torch.device("cpu"), autocast_dtype=None,
                             dp_group=dist.group.WORLD)  # fmt: skip
        return {k: float(v) for k, v in metrics.aux_kinds.items()}

    results = {}
    for name, (overrides, dtype) in CASES.items():
        engine = ContractEngine(_model(overrides, dtype), ACCUM, world)
        results[name] = {"aux": run(engine), "grads": engine.grads}

    # The real engine (float32): ZeRO-2, SGD with lr 1, so the update is the averaged gradient.
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model = _model(TASK_ONLY, torch.float32)
    before = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": ACCUM,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    opt = torch.optim.SGD(list(adapter_parameters(model).values()), lr=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    aux = run(engine)
    updates = {n: before[n] - p.detach() for n, p in adapter_parameters(model).items()}
    results["zero2_fp32"] = {"aux": aux, "grads": updates}
    if rank == 0:
        torch.save(results, out_dir / "results.pt")


def _reference(overrides: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    """One process, the whole global batch in one forward: task-router loss and gradients."""
    model = _model(overrides, dtype)
    full = _global_batch()
    out = model(**full)
    n_target = (full["labels"][:, 1:] != -100).sum()
    total_loss(out.lm_loss_sum / n_target, out.aux_weighted).backward()
    grads = {
        n: p.grad if p.grad is not None else torch.zeros_like(p)
        for n, p in adapter_parameters(model).items()
    }
    return {k: float(v) for k, v in out.aux_by_kind.items()}, grads


def _assert_grads(got: dict, want: dict, rtol: float, case: str) -> None:
    assert got.keys() == want.keys(), case
    assert sum(float(g.abs().sum()) for n, g in want.items() if "task" in n) > 0, case
    for name, g in want.items():
        # Relative to the tensor's largest entry: elementwise relative error is meaningless
        # for entries that are zero up to rounding.
        err = float((got[name].to(g.dtype) - g).abs().max())
        assert err <= rtol * float(g.abs().max()) + 1e-12, f"{case}: {name} off by {err:.3g}"


@pytest.mark.multirank
def test_task_router_loss_and_gradient_cover_the_whole_step(tmp_path):
    run_ranks(_worker, WORLD, tmp_path, tmp_path, timeout=300)
    results = torch.load(tmp_path / "results.pt")

    want_aux, want_grads = _reference(*CASES["task_only"])
    got = results["task_only"]
    assert abs(got["aux"]["task"] - want_aux["task"]) <= 1e-6 * max(1.0, want_aux["task"])
    _assert_grads(got["grads"], want_grads, 1e-6, "task_only float64")

    # Real DeepSpeed ZeRO-2 (float32): the same loss and update, to float32 rounding.
    got = results["zero2_fp32"]
    assert abs(got["aux"]["task"] - want_aux["task"]) <= 1e-5
    _assert_grads(got["grads"], want_grads, 1e-3, "task_only ZeRO-2 float32")

    # Hybrid layers: token routers stay per micro-batch; the task-router loss is global.
    want_aux, _ = _reference(*CASES["hybrid"])
    got = results["hybrid"]["aux"]
    assert abs(got["task"] - want_aux["task"]) <= 1e-6 * max(1.0, want_aux["task"])
    assert "token" in got

    # L_blc on task routers (option): the same, over the step.
    want_aux, want_grads = _reference(*CASES["task_only_blc"])
    got = results["task_only_blc"]
    assert abs(got["aux"]["task"] - want_aux["task"]) <= 1e-6 * max(1.0, want_aux["task"])
    _assert_grads(got["grads"], want_grads, 1e-6, "task_only_blc float64")

    # Per micro-batch statistics (the old behaviour) are not the global batch's.
    want_aux, _ = _reference(*CASES["task_only"])
    got = results["task_only_micro"]["aux"]
    assert abs(got["task"] - want_aux["task"]) > 1e-3, (got, want_aux)


def test_blc_leaves_task_routers_out_by_default():
    full = _global_batch()
    out = _model({**TASK_ONLY, "loss.aux": "blc"}, torch.float32)(**full)
    assert "task" not in out.aux_by_kind and float(out.aux_weighted) == 0.0
    out = _model({**NO_DROPOUT, "loss.aux": "blc"}, torch.float32)(**full)
    assert set(out.aux_by_kind) == {"token"}
    on = {**NO_DROPOUT, "loss.aux": "blc", "loss.blc_task_routers": True}
    assert set(_model(on, torch.float32)(**full).aux_by_kind) == {"token", "task"}


@pytest.mark.parametrize("left_pad", [False, True])
def test_step_batches_extend_the_task_statistics_only(left_pad):
    """A forward given the step's other micro-batches has the task loss of all of them and the
    token loss of its own; ``step_aux=False`` drops the task loss; a forward of the whole
    batch is the reference (right or left padding: the other micro-batches are cut after
    their last prompt column and re-padded). Left padding in float32: the tiny HF model's
    eager attention gives NaN at fully masked float64 rows."""
    dtype = torch.float32 if left_pad else torch.float64
    tol = {"rtol": 1e-5, "atol": 1e-6} if left_pad else {"rtol": 1e-9, "atol": 1e-12}
    model = _model(NO_DROPOUT, dtype)
    full = _global_batch(left_pad)
    first, rest = ({k: t[:2] for k, t in full.items()},
                   [{k: t[i:i + 2] for k, t in full.items()} for i in (2, 4, 6)])  # fmt: skip
    whole = model(**full)
    step = model(**first, step_batches=rest)
    own = model(**first)
    later = model(**first, step_aux=False)
    torch.testing.assert_close(step.aux_by_kind["task"], whole.aux_by_kind["task"], **tol)
    torch.testing.assert_close(step.aux_by_kind["token"], own.aux_by_kind["token"])
    assert step.step_kinds == ("task",) and later.step_kinds == ()
    assert "task" not in later.aux_by_kind
    lam = model.method.aux_weight("task")
    torch.testing.assert_close(step.aux_step_weighted, lam * step.aux_by_kind["task"])
    torch.testing.assert_close(later.aux_weighted, lam * later.aux_by_kind["token"])


def test_methods_without_task_routers_ignore_step_batches(monkeypatch):
    """MoLoRA (token routers only) gets the same losses with or without the step's other
    micro-batches, and never re-encodes their prompts."""
    model = tiny_hmora("molora", overrides={**NO_DROPOUT, "loss.aux": "blc"}).train()
    full = _global_batch()
    first = {k: t[:2] for k, t in full.items()}
    want = model(**first)

    def refuse(*_):
        raise AssertionError("re-encoded prompts for a method without task routers")

    monkeypatch.setattr(model, "_step_routing_batch", refuse)
    got = model(**first, step_batches=[{k: t[2:4] for k, t in full.items()}])
    assert set(got.aux_by_kind) == {"token"} and got.step_kinds == ()
    torch.testing.assert_close(got.aux_weighted, want.aux_weighted)


def test_step_records_skip_router_groups_without_a_task_router():
    """A plug-in method's router groups need not have a ``task_router`` attribute: the step
    re-encoding skips them instead of failing. Guards against reading the attribute without
    a default."""
    from types import SimpleNamespace

    from torch import nn

    from hmora_ds.config import load_config
    from hmora_ds.methods import build_method

    method = build_method(load_config("hmora"))
    model = SimpleNamespace(routers={"layer00.gate_up": nn.Linear(2, 2)})
    assert method.step_records(model, batch=None) == []

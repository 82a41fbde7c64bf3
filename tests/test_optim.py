"""Optimizer groups: LoRA+, no weight decay on vectors, and the routing lr multiplier — through
warm-up and decay of a real DeepSpeed engine (CPU, gloo, one spawned rank)."""

from __future__ import annotations

import pytest
import torch

from hmora_ds.optim import ROUTING_COMPONENTS, lora_plus_param_groups
from hmora_ds.train.config import load_run_config
from hmora_ds.train.schedule import lr_lambda
from tests._dist import run_ranks
from tests.conftest import batch, randomize_adapters, tiny_hmora

NO_DROPOUT = {
    "adapter.dropout": 0.0,
    "routing.router_dropout": 0.0,
    "routing.encoder_dropout": 0.0,
    "routing.learn_alpha": True,
}


def _names(model, group):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in group["params"]}


def test_router_lr_mult_scales_exactly_the_routing_components():
    model = tiny_hmora("hmora_lw", overrides=NO_DROPOUT)
    method = model.method
    groups = {
        g["name"]: g
        for g in lora_plus_param_groups(model, lr=1e-4, weight_decay=0.1, router_lr_mult=10.0)
    }
    # The task encoder's norms and e_task are vectors at the plain lr (no_decay); the router
    # biases and α at the router lr.
    assert set(groups) == {"decay", "lora_B", "no_decay", "router_decay", "router_no_decay"}
    routing = _names(model, groups["router_decay"]) | _names(model, groups["router_no_decay"])
    # Every routing component is multiplied: HMoRA w LW's (with a learnable α), and HiMoLE's
    # sentence routers beside its token routers.
    himole = tiny_hmora("himole_one_stage", overrides=NO_DROPOUT)
    h_groups = lora_plus_param_groups(himole, lr=1e-4, weight_decay=0.1, router_lr_mult=10.0)
    h_routing = set().union(
        *(_names(himole, g) for g in h_groups if g["name"].startswith("router"))
    )
    assert {himole.method.component_of(n) for n in h_routing} == {
        "token routers",
        "sentence routers",
    }
    assert {method.component_of(n) for n in routing} | {"sentence routers"} == set(
        ROUTING_COMPONENTS
    )
    # The task encoder (and e_task) is not multiplied: at 20 × lr its H_task collapsed.
    assert "task_encoder.task_embedding" in _names(model, groups["no_decay"])
    assert {method.component_of(n) for n in _names(model, groups["no_decay"])} == {
        "task encoder",
        "e_task",
    }
    assert any(n.startswith("task_encoder.") for n in _names(model, groups["decay"]))
    assert groups["no_decay"]["lr"] == 1e-4 and groups["no_decay"]["weight_decay"] == 0.0
    assert any(n.endswith("alpha_logit") for n in _names(model, groups["router_no_decay"]))
    assert any(".token_router." in n for n in _names(model, groups["router_decay"]))
    assert any(".task_router." in n for n in _names(model, groups["router_decay"]))
    for name in ("decay", "lora_B"):  # nothing routing is left at the plain lr
        assert (
            not {method.component_of(n) for n in _names(model, groups[name])} & ROUTING_COMPONENTS
        )
    assert all(n.endswith("lora_B") for n in _names(model, groups["lora_B"]))
    assert groups["router_decay"]["lr"] == pytest.approx(1e-3, rel=1e-12)
    assert groups["router_no_decay"]["lr"] == pytest.approx(1e-3, rel=1e-12)
    assert groups["lora_B"]["lr"] == pytest.approx(2e-4, rel=1e-12)  # LoRA+ η_B = 2 kept
    assert groups["decay"]["lr"] == 1e-4
    assert {method.component_of(n) for n in _names(model, groups["decay"])} == {
        "lora A",
        "task encoder",
    }
    assert groups["router_decay"]["weight_decay"] == 0.1
    assert groups["router_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim < 2 for p in groups["router_no_decay"]["params"])
    assert all(p.ndim >= 2 for p in groups["router_decay"]["params"])
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_router_lr_mult_one_keeps_the_plain_layout():
    """At 1 (the paper) the groups are those of a run without the option: old checkpoints'
    optimizer states still load."""
    model = tiny_hmora("hmora_lw", overrides=NO_DROPOUT)
    plain = lora_plus_param_groups(model, lr=1e-4, weight_decay=0.1)
    assert [g["name"] for g in plain] == ["decay", "lora_B", "no_decay"]
    same = lora_plus_param_groups(model, lr=1e-4, weight_decay=0.1, router_lr_mult=1.0)
    assert [(g["name"], g["lr"], len(g["params"])) for g in same] == [
        (g["name"], g["lr"], len(g["params"])) for g in plain
    ]


def test_router_lr_mult_errors_name_the_field():
    model = tiny_hmora("hmora_lw")
    with pytest.raises(ValueError, match=r"^train\.router_lr_mult: must be > 0"):
        lora_plus_param_groups(model, lr=1e-4, router_lr_mult=0.0)
    with pytest.raises(ValueError, match=r"^train\.router_lr_mult: this model has no method"):
        lora_plus_param_groups(torch.nn.Linear(3, 3), lr=1e-4, router_lr_mult=2.0)
    for bad in ("0", "-1", "inf"):
        with pytest.raises(ValueError, match=r"^train\.router_lr_mult: must be > 0 and finite"):
            load_run_config(None, [f"train.router_lr_mult={bad}"])
    assert load_run_config(None, ["train.router_lr_mult=10"]).train.router_lr_mult == 10.0


WARMUP, TOTAL, LR, MULT = 3, 6, 1e-3, 10.0


def _engine_worker(rank: int, world: int, out_dir) -> None:
    import os

    import deepspeed

    from hmora_ds.losses import total_loss
    from hmora_ds.runtime.dist import skip_cpu_shm_build
    from hmora_ds.train.config import TrainConfig
    from hmora_ds.train.engine import build_optimizer

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    # A learnable α too: deepspeed.initialize broadcasts every parameter viewed as bytes, which
    # a 0-D parameter cannot do (it must be (1,)).
    model = tiny_hmora("hmora_lw", overrides={**NO_DROPOUT, "routing.learn_alpha": True})
    assert any(n.endswith("alpha_logit") for n, _ in model.named_parameters())
    randomize_adapters(model)  # B ≠ 0: the routers get a gradient from the first step
    train = TrainConfig(
        lr=LR,
        router_lr_mult=MULT,
        warmup_steps=WARMUP,
        max_steps=TOTAL,
        schedule="linear",
        grad_clip=0.0,
    )
    optimizer, scheduler = build_optimizer(model, train, ep=1)  # the trainer's own
    ds_config = {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    ids, attn, labels, prompt = batch(bsz=3, seed=4)
    lrs, moves = [], []
    for _ in range(TOTAL):
        groups = engine.optimizer.param_groups
        lrs.append({g["name"]: g["lr"] for g in groups})
        before = {g["name"]: [p.detach().clone() for p in g["params"]] for g in groups}
        out = engine(ids, attn, labels, prompt)
        engine.backward(total_loss(out.lm_loss, out.aux_weighted))
        engine.step()
        moves.append(
            {
                g["name"]: max(
                    (p.detach() - b).abs().max().item()
                    for p, b in zip(g["params"], before[g["name"]], strict=True)
                )
                for g in engine.optimizer.param_groups
            }
        )
    torch.save({"lrs": lrs, "moves": moves, "engine_lr": engine.get_lr()}, out_dir / "lrs.pt")


@pytest.mark.multirank
def test_deepspeed_schedule_keeps_the_router_ratio_through_warmup_and_decay(tmp_path):
    run_ranks(_engine_worker, 1, tmp_path, tmp_path, timeout=180)
    got = torch.load(tmp_path / "lrs.pt")
    peak = {
        "decay": LR,
        "lora_B": 2 * LR,
        "no_decay": LR,
        "router_decay": MULT * LR,
        "router_no_decay": MULT * LR,
    }
    for step, lrs in enumerate(got["lrs"]):
        assert set(lrs) == set(peak)
        factor = lr_lambda(step, WARMUP, TOTAL, "linear")
        for name, value in lrs.items():
            assert value == pytest.approx(peak[name] * factor, rel=1e-9), (step, name)
        assert lrs["router_decay"] / lrs["decay"] == pytest.approx(MULT, rel=1e-9)
    # The schedule really moved: warm-up rose, the decay fell.
    assert got["lrs"][0]["decay"] < got["lrs"][WARMUP - 1]["decay"] > got["lrs"][-1]["decay"]
    # AdamW's first update of an element is lr · g / (|g| + eps) ≈ lr: the largest move of each
    # group is its lr of step 0, so the routers did move MULT times further.
    first, lr0 = got["moves"][0], got["lrs"][0]
    for name in peak:
        assert first[name] == pytest.approx(lr0[name], rel=1e-3), name

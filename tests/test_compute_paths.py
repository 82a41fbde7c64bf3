"""The three ways to compute a MoRA block agree: dense (all experts, two GEMMs), sparse
(routed experts only, grouped per expert) and the peers' per-expert loop (bench reference).

Tiny random-init Qwen2 (mechanics), fp32, dropout off so the three draw no masks; outputs and
every parameter gradient must agree to 1e-5, for soft and top-k routing, e = 4 … 32.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from hmora_ds.bench.reference import per_expert_dropout, per_expert_loop
from hmora_ds.config import load_config
from hmora_ds.experts import DispatchPlan, MoRALinear, prefer_sparse
from hmora_ds.model import HMoRAModel

CFG = Qwen2Config(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
NO_DROPOUT = ["adapter.dropout=0", "routing.router_dropout=0", "routing.encoder_dropout=0"]


def _no_reference(model):
    return contextlib.nullcontext()


def _run(
    mode: str, experts: int, hydra: bool, compute: str, ctx=_no_reference, extra=(), dtype=None
):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(CFG)
    if dtype is not None:
        base = base.to(dtype)
    method = load_config(
        "hmora",
        [
            f"routing.mode={mode}",
            f"adapter.num_experts={experts}",
            f"adapter.hydra={str(hydra).lower()}",
            f"adapter.compute={compute}",
            "routing.share_routers=true",
            "routing.encoder_heads=4",
            *NO_DROPOUT,
            *extra,
        ],
    )
    model = HMoRAModel(base, method, task_token_id=5)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.2)
    ids = torch.randint(3, 290, (3, 11), generator=torch.Generator().manual_seed(1))
    with ctx(model):
        out = model(ids, labels=ids, prompt_mask=torch.ones_like(ids))
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads, model


@pytest.mark.parametrize("mode", ["soft", "topk"])
@pytest.mark.parametrize("hydra", [False, True])
def test_dense_sparse_and_loop_agree(mode, hydra):
    for experts in (4, 8, 16, 32):
        logits, loss, grads, model = _run(mode, experts, hydra, "dense")
        blocks = [m for m in model.modules() if isinstance(m, MoRALinear) and m.router]
        assert blocks and not any(b.sparse for b in blocks)
        variants = {
            "sparse": _run(mode, experts, hydra, "sparse"),
            "loop": _run(mode, experts, hydra, "dense", per_expert_loop),
            "dropout per expert": _run(mode, experts, hydra, "dense", per_expert_dropout),
        }
        sparse_blocks = [
            m for m in variants["sparse"][3].modules() if isinstance(m, MoRALinear) and m.router
        ]
        # soft routing has no sparse form: compute=sparse leaves it dense
        assert all(b.sparse == (mode == "topk") for b in sparse_blocks)
        for label, (lg, ls, gr, _) in variants.items():
            where = f"{label}, {mode}, e={experts}, hydra={hydra}"
            torch.testing.assert_close(lg, logits, rtol=1e-5, atol=1e-5, msg=where)
            torch.testing.assert_close(ls, loss, rtol=1e-5, atol=1e-5, msg=where)
            assert gr.keys() == grads.keys(), where
            for name, g in grads.items():
                torch.testing.assert_close(gr[name], g, rtol=1e-5, atol=1e-5, msg=f"{where} {name}")


def test_dispatch_plan_groups_pairs_by_expert():
    # 2 sequences × 3 tokens, E = 4, top-2: known routing
    gates = torch.zeros(2, 3, 4)
    picks = [[(0, 1), (1, 3), (0, 3)], [(2, 3), (0, 2), (0, 1)]]
    for b, row in enumerate(picks):
        for t, (i, j) in enumerate(row):
            gates[b, t, i], gates[b, t, j] = 0.7, 0.3
    plan = DispatchPlan.build(gates, 2, 3)
    assert plan.num_tokens == 6
    assert plan.offsets.tolist() == [4, 7, 9, 12]  # expert loads 4, 3, 2, 3
    assert plan.counts == [4, 3, 2, 3]
    experts = torch.repeat_interleave(torch.arange(4), torch.tensor(plan.counts))
    for token, expert, weight in zip(plan.token, experts, plan.weight, strict=True):
        assert gates.reshape(6, 4)[token, expert] == weight > 0
    # per-sequence (task-level) gates route every token of a row alike
    task = torch.tensor([[[0.0, 0.6, 0.4, 0.0]], [[0.5, 0.0, 0.0, 0.5]]])
    plan = DispatchPlan.build(task, 2, 5)
    assert plan.counts == [5, 5, 5, 5] and plan.num_tokens == 10
    assert sorted(plan.token[:5].tolist()) == [5, 6, 7, 8, 9]  # expert 0: the second row


@pytest.mark.parametrize("k, n", [(4, 4), (4, 16), (12, 3), (16, 8)])
def test_grouped_mm_operands_are_padded_to_16_byte_strides(k, n):
    """torch._grouped_mm (CUDA, bf16) rejects strides that are not multiples of 16 bytes: a
    rank-4 expert (AdaMoLE) in bf16 failed on the GPU with "strides should be multiple of 16
    bytes". The padding must hand it aligned operands and give back the unpadded product and
    gradients (checked here with the slice loop standing in for the CUDA kernel)."""
    from hmora_ds.experts.dispatch import aligned_grouped_mm, sliced_mm

    seen = []

    def kernel(x, w, offs):
        seen.append((x.shape[-1], w.shape[-1]))
        return sliced_mm(x, w, offs)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, k, generator=g, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, k, n, generator=g, dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)  # expert 1 gets no token
    out = aligned_grouped_mm(x, w, offsets, kernel)
    assert all(size * 2 % 16 == 0 for size in seen[0])
    ref = sliced_mm(x.detach(), w.detach(), offsets)
    assert out.shape == (10, n) and torch.equal(out, ref)  # zeros add exact zeros
    out.float().square().sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    sliced_mm(xr, wr, offsets).float().square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)


def test_auto_selects_sparse_only_where_the_dense_adapter_dominates():
    # the paper's settings (r = 8, e <= 32, hidden 1536): measured faster dense (H100, H200)
    assert not any(prefer_sparse(e, 2, 8, 1536) for e in (4, 8, 16, 32))
    assert prefer_sparse(32, 2, 32, 512)  # E·R = 2·I, a token uses 1/16 of the experts
    assert not prefer_sparse(8, 2, 256, 512)  # wide, but top-2 of 8 saves too little
    assert prefer_sparse(16, 2, 64, 512)  # both thresholds are inclusive: 16 = 8·2, E·R = 2·I
    # the tiny model (hidden 32): E·R = 256 ≥ 2·I, so auto makes its top-k mixtures sparse
    for experts, expect in ((32, True), (4, False)):
        _, _, _, model = _run("topk", experts, False, "auto")
        blocks = [m for m in model.modules() if isinstance(m, MoRALinear) and m.router]
        assert blocks and all(b.sparse == expect for b in blocks)
    with pytest.raises(
        ValueError, match=r"adapter\.compute: must be one of auto, dense, sparse, got 'bogus'"
    ):
        load_config("hmora_lw", ["adapter.compute=bogus"])


def _agree(runs, where, tol):
    (logits, loss, grads, _), *others = runs
    for i, (lg, ls, gr, _) in enumerate(others):
        torch.testing.assert_close(
            lg.float(), logits.float(), rtol=tol, atol=tol, msg=f"{where} {i}"
        )
        torch.testing.assert_close(ls.float(), loss.float(), rtol=tol, atol=tol)
        for name, g in grads.items():
            torch.testing.assert_close(gr[name].float(), g.float(), rtol=tol, atol=tol, msg=name)


def test_a_single_kept_expert_of_gate_one_is_computed_by_every_path():
    """Top-1 with ``sum`` renormalisation gives gates of exactly 1: the loop's token selection
    (gate ≠ 0) must keep them."""
    extra = ["routing.top_k=1", "routing.topk_renorm=sum"]
    runs = [
        _run("topk", 4, False, "dense", extra=extra),
        _run("topk", 4, False, "sparse", extra=extra),
        _run("topk", 4, False, "dense", per_expert_loop, extra=extra),
    ]
    _agree(runs, "top-1", 1e-5)


def test_fp32_adapters_on_a_bf16_base_agree_across_paths():
    """A bf16 base with the adapters in fp32 (their default): the sparse path weights its bf16
    or fp32 rows by fp32 gates in the rows' dtype, the loop casts the base input to the
    adapters' dtype; all three paths agree to bf16 precision."""
    runs = [
        _run("topk", 8, hydra, compute, ctx, dtype=torch.bfloat16)
        for hydra in (False,)
        for compute, ctx in (("dense", _no_reference), ("sparse", _no_reference),
                             ("dense", per_expert_loop))
    ]  # fmt: skip
    assert next(p for n, p in runs[0][3].named_parameters() if "lora_B" in n).dtype == (
        torch.float32
    )
    _agree(runs, "bf16 base", 2e-2)


def test_a_bank_built_with_its_defaults_is_one_plain_lora():
    """``MoRALinear(base, rank, alpha)``: one expert, no router, no dropout module, scaling
    α / r (rsLoRA α / √r on request), A drawn like ``nn.Linear`` (Kaiming-uniform, bound
    1/√I, as PEFT), B = 0, both on the base's device; a mixture without a router is a one-line
    error; Hydra needs more than one expert; dropout 0 is no module at all."""
    import math

    from hmora_ds.routing.context import RoutingContext
    from hmora_ds.routing.gates import RouterGroup

    torch.manual_seed(0)
    base = torch.nn.Linear(256, 64)
    bank = MoRALinear(base, 4, 8.0)
    assert (bank.num_experts, bank.hydra, bank.router, bank.compute) == (1, False, None, "auto")
    assert bank.scaling == 2.0 and isinstance(bank.dropout, torch.nn.Identity)
    assert MoRALinear(base, 4, 8.0, rslora=True).scaling == 4.0
    assert isinstance(MoRALinear(base, 4, 8.0, dropout=0.5).dropout, torch.nn.Dropout)
    assert isinstance(MoRALinear(base, 4, 8.0, dropout=1.0).dropout, torch.nn.Dropout)
    assert bank.lora_A.shape == (4, 256) and (bank.lora_B == 0).all()
    bound = 1 / math.sqrt(256)
    wide = MoRALinear(torch.nn.Linear(256, 64), 256, 8.0)  # 65,536 draws of A
    assert wide.lora_A.abs().max().item() <= bound
    assert wide.lora_A.abs().max().item() > 0.99 * bound
    assert wide.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert MoRALinear(base, 4, 8.0, hydra=True).hydra is False  # one expert: nothing to share
    with pytest.raises(ValueError) as err:
        MoRALinear(base, 4, 8.0, num_experts=4)
    assert str(err.value) == "MoRALinear: a mixture of experts (num_experts > 1) needs a router"
    router = RouterGroup(0, ("q",), 256, 256, "token", 0.0, 2, "topk", 1, "sum", 0.0, False,
                         RoutingContext())  # fmt: skip
    two = MoRALinear(base, 4, 8.0, num_experts=2, hydra=True, router=router)
    assert two.hydra is True and two.lora_A.shape == (4, 256) and two.lora_B.shape == (64, 8)
    meta = MoRALinear(torch.nn.Linear(256, 64, device="meta"), 4, 8.0)
    assert meta.lora_A.device.type == "meta" and meta.lora_B.device.type == "meta"

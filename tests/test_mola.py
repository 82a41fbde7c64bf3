"""MoLA: per-layer expert counts, its gates and balance loss by hand, its refusals, and expert
parallelism over layers with different counts. The invariant table (init = base, round trip,
checkpointing, bf16, meta TP, ZeRO-2) runs on its preset from ``tests/test_methods.py``."""

from __future__ import annotations

import math

import pytest
import torch

from hmora_ds.config import load_config
from hmora_ds.methods import build_method
from hmora_ds.methods.mola import layer_balance_loss, layer_expert_counts
from hmora_ds.routing.context import RouterId, RoutingRecord
from tests import _method_invariants as inv

PRESETS = {"mola": [2, 4, 6, 8], "mola_triangle": [8, 6, 4, 2], "mola_square": [5, 5, 5, 5],
           "mola_diamond": [3, 5, 5, 3]}  # fmt: skip


def test_block_patterns_cover_contiguous_equal_blocks():
    """Guards against a pattern applied per layer cyclically, reversed (first entry = lowest
    layers), or with the blocks of the wrong size."""
    assert layer_expert_counts([2, 4, 6, 8], 32) == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    assert layer_expert_counts("8,6,4,2", 28) == [8] * 7 + [6] * 7 + [4] * 7 + [2] * 7
    assert layer_expert_counts([3, 5], 6) == [3, 3, 3, 5, 5, 5]
    per_layer = [1, 2, 3, 4, 5, 6]
    assert layer_expert_counts(per_layer, 6) == per_layer  # L entries: one per layer, as is
    assert layer_expert_counts([4], 3) == [4, 4, 4]


def test_spread_blocks_differ_by_at_most_one_layer_and_equal_the_blocks_when_they_divide():
    """Guards against ``blocks=spread`` changing the paper's allocation on a depth the pattern
    divides, or dropping / doubling layers on one it does not."""
    for layers in (4, 8, 28, 32):
        assert layer_expert_counts([2, 4, 6, 8], layers, "spread") == layer_expert_counts(
            [2, 4, 6, 8], layers
        )
    assert layer_expert_counts([2, 4, 6, 8], 30, "spread") == [2] * 8 + [4] * 7 + [6] * 8 + [8] * 7
    assert layer_expert_counts([2, 4, 6, 8], 6, "spread") == [2, 2, 4, 6, 6, 8]


def test_a_pattern_that_does_not_divide_the_layers_is_one_line_naming_the_fix():
    """Guards against a silent truncation (30 // 4 = 7 layers per block would leave two layers
    without a count) and against an error that does not say what to set."""
    with pytest.raises(ValueError) as err:
        layer_expert_counts([2, 4, 6, 8], 30)
    assert str(err.value) == (
        "options.experts: 4 blocks do not divide the model's 30 layers; give a pattern of "
        "[1, 2, 3, 5, 6, 10, 15, 30] entries, or set options.blocks=spread for blocks that "
        "differ by at most one layer"
    )
    for bad in ("2,x", [], "2,,4", [2.5]):
        with pytest.raises(ValueError, match=r"^options\.experts: must be expert counts such as"):
            layer_expert_counts(bad, 4)


def test_the_model_carries_each_layers_count_at_every_site_and_plain_lora_for_one():
    """Guards against every layer getting ``adapter.num_experts`` (the shared default) instead
    of its own count, against a router on a one-expert layer, and against routers with the
    library's bias (the official code's routers have none)."""
    model = inv.build(load_config("mola", ["options.experts=1,2,4", "options.blocks=equal",
                                           "adapter.num_experts=4"]))  # fmt: skip
    banks = model.adapted_modules()
    assert len(banks) == 6 * 7
    for name, bank in banks.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        assert bank.num_experts == [1, 1, 2, 2, 4, 4][layer], name
        assert (bank.router is None) == (layer < 2), name
    assert len(model.routers) == 4 * 7  # one router per adapted linear of layers 2–5
    for router in model.routers.values():
        assert router.token_router.linear.bias is None
        assert router.topk_renorm == "sum" and router.top_k == 2
    biased = inv.build(load_config("mola", ["options.router_bias=true"]))
    assert all(r.token_router.linear.bias is not None for r in biased.routers.values())


@pytest.mark.parametrize(("preset", "pattern"), PRESETS.items())
def test_presets_build_their_pattern_on_the_tiny_model_and_on_qwen2(preset, pattern):
    """Guards against a preset that fails on a depth its pattern does not divide (the tiny
    models' 6 layers) and against the wrong allocation on Qwen2-1.5B's 28 layers (blocks of
    7)."""
    from hmora_ds.params import build_meta_model, load_model_config

    model = inv.build(load_config(preset))
    assert model.method.counts == layer_expert_counts(pattern, 6, "spread")
    meta = build_meta_model(load_model_config("qwen2-1.5b"), load_config(preset))
    assert meta.method.counts == [c for c in pattern for _ in range(7)]


def test_gates_are_the_top_two_probabilities_divided_by_their_sum():
    """Guards against the HMoRA renormalisation (a softmax over the kept probabilities) or no
    renormalisation: with p = (0.1, 0.2, 0.3, 0.4) the gates must be (0, 0, 3/7, 4/7)."""
    model = inv.build(load_config("mola", ["options.experts=4", "adapter.num_experts=4"]))
    block = model.base_model.model.layers[3].mlp.up_proj
    with torch.no_grad():
        weight = block.router.token_router.linear.weight
        weight.zero_()
        weight[:, 0] = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.zeros(1, 1, 64)
    x[..., 0] = 1.0
    gates = block.router.gates(x)
    torch.testing.assert_close(gates.view(-1), torch.tensor([0.0, 0.0, 3 / 7, 4 / 7]))


def _rec(layer, target, probs, mask=None):
    return RoutingRecord(RouterId(layer, (target,), "token"), torch.tensor(probs), mask)


def test_balance_loss_pools_the_layers_routers_as_the_official_code():
    """By hand, k = 1. Layer 0: q sends tokens to experts (0, 0), k to (1, 0) — pooled F =
    (3/4, 1/4), P = (0.6, 0.4): 2·(0.45 + 0.1) = 1.1 (the per-router sum would be 1.5 + 1.0).
    Layer 1 (E = 3, one router): F = (1/2, 1/2, 0), P = (0.45, 0.45, 0.1): 3·0.45 = 1.35.
    Guards against per-site losses where the code pools the layer, against layers with different
    E sharing one statistic, and against dropping a layer."""
    records = [
        _rec(0, "q", [[[0.9, 0.1], [0.6, 0.4]]]),
        _rec(0, "k", [[[0.2, 0.8], [0.7, 0.3]]]),
        _rec(1, "q", [[[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]]]),
    ]
    torch.testing.assert_close(layer_balance_loss(records[:2], 1), torch.tensor(1.1))
    torch.testing.assert_close(layer_balance_loss(records, 1), torch.tensor(1.1 + 1.35))
    method = build_method(load_config("mola", ["loss.aux=blc", "routing.top_k=1"]))
    torch.testing.assert_close(method.aux_losses(records, None)["token"], torch.tensor(2.45))
    site = build_method(load_config("mola", ["loss.aux=blc", "routing.top_k=1",
                                             "options.balance_scope=site"]))  # fmt: skip
    torch.testing.assert_close(site.aux_losses(records[:2], None)["token"], torch.tensor(2.5))
    assert build_method(load_config("mola")).aux_losses(records, None) == {}  # off by default


def test_balance_loss_leaves_out_masked_tokens_and_weighs_with_0_001():
    """Guards against padding counted in F and P (the mask must reach the pooled statistic)
    and against a preset weight other than the code's ``router_aux_loss_coef`` = 0.001."""
    mask = torch.tensor([[1, 0]])
    records = [_rec(0, "q", [[[0.9, 0.1], [0.1, 0.9]]], mask),
               _rec(0, "k", [[[0.3, 0.7], [0.5, 0.5]]], mask)]  # fmt: skip
    # Valid: (0.9, 0.1) → 0 and (0.3, 0.7) → 1: F = (1/2, 1/2), P = (0.6, 0.4) → 2·0.5 = 1.
    torch.testing.assert_close(layer_balance_loss(records, 1), torch.tensor(1.0))
    assert layer_balance_loss([], 2) is None
    assert build_method(load_config("mola")).aux_weight("token") == 0.001


def test_the_balance_loss_reaches_the_objective_with_a_gradient():
    """Guards against a balance loss computed on detached probabilities (no router gradient)."""
    from tests.conftest import batch

    model = inv.build(load_config("mola", ["loss.aux=blc"]))
    ids, attn, labels, prompt = batch()
    out = model(ids, attn, labels, prompt)
    assert math.isclose(float(out.aux_weighted.detach()),
                        0.001 * float(out.aux_by_kind["token"]),
                        rel_tol=1e-6)  # fmt: skip
    out.aux_weighted.backward()
    grads = [r.token_router.linear.weight.grad for r in model.routers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


REFUSALS = [
    ("routing.top_k=3",
     "routing.top_k: (3) exceeds the smallest routed count of options.experts (2); use top_k "
     "<= 2 (method mola)"),
    ("adapter.num_experts=4",
     "adapter.num_experts: must equal the largest count of options.experts (8) (got 4); set "
     "adapter.num_experts=8 (method mola)"),
    ("options.experts=0,2,4,8",
     "options.experts: each count must be >= 1 (1 = plain LoRA at that layer), got [0, 2, 4, 8] "
     "(method mola)"),
    ("options.experts=[1,1]",
     "options.experts: needs a count >= 2 somewhere; use method=lora for plain LoRA everywhere "
     "(method mola)"),
    ("options.experts=2,x",
     "options.experts: must be expert counts such as [2, 4, 6, 8] or '2,4,6,8', got '2,x' "
     "(method mola)"),
    ("routing.topk_renorm=paper",
     "routing.topk_renorm: must be sum (the kept probabilities divided by their sum, as the "
     "paper and the official code) (method mola)"),
    ("routing.task_encoder=transformer",
     "routing.task_encoder: must be none: MoLA routes tokens only (method mola)"),
    ("adapter.hydra=true", "adapter.hydra: must be false (method mola)"),
    ("adapter.single_lora_layers=[q]",
     "adapter.single_lora_layers: must be empty: a count of 1 in options.experts makes a layer "
     "plain LoRA (method mola)"),
    ("loss.aux=cgjs", "loss.aux: must be none or blc (the load-balancing loss) (method mola)"),
    ("options.blocks=equal",
     "options.experts: 4 blocks do not divide the model's 6 layers; give a pattern of "
     "[1, 2, 3, 6] entries, or set options.blocks=spread for blocks that differ by at most one "
     "layer"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "message"), REFUSALS)
def test_each_refused_setting_is_one_exact_line(override, message):
    """Guards against a refusal naming the wrong field, losing its fix, or not firing."""
    with pytest.raises(ValueError) as err:
        inv.build(load_config("mola", [override]))
    assert str(err.value) == message


@pytest.mark.parametrize("overrides", [
    ["routing.top_k=1"], ["loss.aux=blc"], ["options.router_bias=true"],
    ["options.experts=1,2,2", "adapter.num_experts=2"],  # k = 2 <= the smallest *routed* count
    ["options.experts=[2, 4, 6, 8]", "options.blocks=spread"],
    ["routing.share_routers=true"],
])  # fmt: skip
def test_the_settings_mola_allows_are_accepted(overrides):
    """Guards against a refusal that fires on its own escape hatch."""
    assert inv.build(load_config("mola", overrides)).config.method == "mola"


def test_expert_parallel_needs_an_ep_size_dividing_every_layers_count():
    """Guards against converting some blocks before finding a layer whose count the EP size does
    not divide (2-4-6-8 with EP = 4: the 2 and 6 expert layers), and against refusing a layout
    that works (EP = 2 divides every count; each block keeps E_j / 2 experts)."""
    from hmora_ds.experts import MoRALinear
    from hmora_ds.parallel.expert_parallel import ExpertParallelMoRA, to_expert_parallel

    model = inv.build(load_config("mola"))
    with pytest.raises(ValueError) as err:
        to_expert_parallel(model, 4, 0)
    assert str(err.value) == (
        "parallel.ep_size (4) must divide the 2 experts of "
        "base_model.model.layers.0.self_attn.q_proj; choose an ep_size dividing every site's "
        "expert count"
    )
    assert all(isinstance(m, MoRALinear) for m in model.adapted_modules().values())
    assert to_expert_parallel(model, 2, 1) == 6 * 7
    blocks = [m for m in model.modules() if isinstance(m, ExpertParallelMoRA)]
    assert sorted({(b.num_experts, b.num_local_experts) for b in blocks}) == [
        (2, 1), (4, 2), (6, 3), (8, 4)
    ]  # fmt: skip


def _ep_model():
    from tests.conftest import randomize_adapters, tiny_hmora

    model = tiny_hmora("mola", overrides={"adapter.dropout": 0.0, "loss.aux": "blc"})
    randomize_adapters(model)
    return model.double()


def _ep_worker(rank, world, out_dir):
    from tests._dist import ep_rank_forward, save_ep_rank

    model = _ep_model()
    _, out = ep_rank_forward(model, world, rank)
    save_ep_rank(model, out, rank, out_dir)


@pytest.mark.multirank
def test_expert_parallel_equals_replicated_with_a_count_per_layer(ep_runs):
    """EP = 2 on 2-4-6-8 (the tiny model's six layers: 2, 2, 4, 6, 6, 8 experts), the balance
    loss on: each rank's loss and the gradients equal the replicated model's on that rank's
    rows. Guards against a bank split as if every layer had the same count (experts of one
    layer sent to another's slots) and the layer's pooled balance loss computed per rank. The
    EP run is one of the shared spawn's (tests._dist.EP_CASES)."""
    from tests._dist import check_ep_equals_replicated

    ref = _ep_model()
    counts = {n: m.num_experts for n, m in ref.named_modules()
              if getattr(m, "router", None) is not None}  # fmt: skip
    assert sorted(set(counts.values())) == [2, 4, 6, 8]

    def per_rank(prefix):  # "<site>.deepspeed_moe.experts.deepspeed_experts" → E_site / 2
        return counts[prefix.split(".deepspeed_moe.")[0]] // 2

    check_ep_equals_replicated(ref, ep_runs / "test_mola", per_rank)

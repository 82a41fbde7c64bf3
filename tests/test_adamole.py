"""AdaMoLE (method ``adamole``): adaptive gates, the threshold router on a tiny model, the sparse
dispatch with a variable number of experts per token, the load-balancing loss, the active-expert
statistic, refusals, and expert parallelism (2 gloo ranks)."""

from __future__ import annotations

import re

import pytest
import torch

from hmora_ds.config import load_config
from hmora_ds.methods import get_method
from hmora_ds.methods.adamole import AdaMoLERouter, adamole_balance_loss, adaptive_gates
from hmora_ds.metrics import RouterStatsAccumulator
from hmora_ds.routing.context import RouterId, RoutingRecord
from tests._dist import two_ranks
from tests._method_invariants import build, no_dropout, randomize
from tests.conftest import batch, randomize_adapters, tiny_hmora

E = 8


def _config(*overrides: str):
    return load_config("adamole", list(overrides))


def _spread_routers(model, std: float = 2.0, seed: int = 0) -> None:
    """Gate weights large enough that tokens use different numbers of experts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.routers.values():
            w = router.gate.weight
            w.copy_(torch.randn(w.shape, generator=gen) * std)


# ------------------------------------------------------------------ adaptive gates
def test_adaptive_gates_against_hand_values():
    """Guards against weighting by p instead of p − τ, a strict threshold (p > τ) where the
    code keeps p = τ, a missing renormalisation, and NaN for a row with no active expert."""
    p = torch.tensor(
        [
            [0.50, 0.30, 0.20],  # two active: (0.25, 0.05) / 0.3
            [0.50, 0.25, 0.25],  # ties at τ: active with weight 0
            [0.40, 0.35, 0.25],  # τ above every p: none active
            [0.40, 0.35, 0.25],  # τ below every p: all active
            [0.25, 0.25, 0.50],  # ties at τ only, besides one
        ]
    )
    tau = torch.tensor([[0.25], [0.25], [0.5], [0.1], [0.25]])
    want = torch.tensor(
        [
            [0.25 / 0.30, 0.05 / 0.30, 0.0],
            [1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [0.30 / 0.70, 0.25 / 0.70, 0.15 / 0.70],
            [0.0, 0.0, 1.0],
        ]
    )
    torch.testing.assert_close(adaptive_gates(p, tau), want)
    # Every active expert tied at τ: the active weights sum to 0 and the row is all zeros
    # (the official code divides by 1 there), with finite gradients.
    q = torch.full((1, 4), 0.25, requires_grad=True)
    t = torch.full((1, 1), 0.25, requires_grad=True)
    g = adaptive_gates(q, t)
    assert torch.equal(g, torch.zeros(1, 4))
    g.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(t.grad).all()


def test_adaptive_gates_keep_shapes_and_differentiate_the_threshold():
    """Guards against a threshold treated as a constant (the threshold network would never
    learn) and against gates that do not sum to 1 over the active experts."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 5, E, generator=gen), -1).requires_grad_()
    tau = torch.full((2, 5, 1), 0.1, requires_grad=True)
    g = adaptive_gates(p, tau)
    assert g.shape == p.shape
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 5))
    (g * torch.arange(E)).sum().backward()
    assert tau.grad.abs().sum() > 0


# ------------------------------------------------------------------ the router on a tiny model
def test_tau_max_is_one_over_e_unless_set():
    """Guards against a τ_max other than the official default 1/E (and an ignored option)."""
    model = build(_config())
    assert {r.max_threshold for r in model.routers.values()} == {1.0 / E}
    router = model.routers["layer00_q"]
    with torch.no_grad():
        router.threshold.bias.fill_(60.0)  # σ → 1: τ reaches τ_max
    _, tau = router.probs_and_threshold(torch.zeros(1, 2, router.gate.in_features))
    torch.testing.assert_close(tau, torch.full((1, 2, 1), 1.0 / E))
    other = build(_config("options.max_threshold=0.05"))
    assert {r.max_threshold for r in other.routers.values()} == {0.05}


def test_one_gate_and_threshold_per_adapted_linear():
    """Guards against routers shared by q, k and v (the official code has one gate and one
    threshold network per adapted linear) and a bias on the gate (it has none)."""
    model = build(_config())
    assert sorted(model.routers)[:4] == ["layer00_k", "layer00_o", "layer00_q", "layer00_v"]
    router = model.routers["layer00_q"]
    assert router.gate.bias is None and router.threshold.bias is not None
    assert router.threshold.out_features == 1
    method = get_method("adamole")(_config())
    assert method.component_of("routers.layer00_q.threshold.weight") == "threshold networks"
    assert method.component_of("routers.layer00_q.gate.weight") == "token routers"


def test_gates_and_block_output_equal_a_hand_computation_from_the_router_weights():
    """Guards against the gate reading a dropped-out or otherwise altered input, a wrong
    sigmoid scale, and a dispatcher that drops or re-weights active experts."""
    model = build(no_dropout(_config())).eval()
    randomize(model)
    _spread_routers(model)
    block = model.base_model.model.layers[2].self_attn.v_proj
    router = block.router
    x = torch.randn(2, 6, block.in_features, generator=torch.Generator().manual_seed(3))
    w, wt, bt = (t.detach() for t in (router.gate.weight, router.threshold.weight,
                                      router.threshold.bias))  # fmt: skip
    e, r = block.num_experts, block.rank
    want_g = torch.zeros(2, 6, e)
    want_delta = torch.zeros(2, 6, block.out_features)
    for b in range(2):
        for t in range(6):
            xi = x[b, t]
            p = torch.softmax(w @ xi, -1)
            tau = (1.0 / e) * torch.sigmoid(wt @ xi + bt)
            a = [float(p[i] - tau) for i in range(e)]
            total = sum(v for v in a if v >= 0)
            for i in range(e):
                if a[i] >= 0 and total != 0:
                    want_g[b, t, i] = a[i] / total
                a_i = block.lora_A.detach()[i * r : (i + 1) * r]
                b_i = block.lora_B.detach()[:, i * r : (i + 1) * r]
                want_delta[b, t] += want_g[b, t, i] * block.scaling * (b_i @ (a_i @ xi))
    with torch.no_grad():
        gates = router.gates(x)
        delta = block(x) - block.base_layer(x)
    torch.testing.assert_close(gates, want_g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta, want_delta, rtol=1e-4, atol=1e-5)


def test_the_sparse_plan_has_a_variable_count_per_token():
    """Guards against a dense fallback hiding the sparsity (every expert computed) and a plan
    with a fixed k: each token's routed pairs are exactly its non-zero gates."""
    from hmora_ds.experts import DenseDispatcher, SparseDispatcher

    model = build(no_dropout(_config()))
    randomize(model)
    _spread_routers(model, std=0.5)
    banks = model.adapted_modules()
    assert banks and all(m.sparse for m in banks.values())
    block = model.base_model.model.layers[1].self_attn.q_proj
    assert isinstance(block._dispatcher(), SparseDispatcher)
    x = torch.randn(3, 9, block.in_features, generator=torch.Generator().manual_seed(1))
    gates = block.router.gates(x)
    plan = block.router.dispatch(gates, x.shape[-2])
    per_token = torch.bincount(plan.token, minlength=27)
    used = (gates != 0).sum(-1).reshape(-1)
    assert torch.equal(per_token, used)
    assert used.min() >= 1 and used.max() > used.min(), used
    dense = DenseDispatcher().delta(block, x, x, gates)
    sparse = SparseDispatcher().delta(block, x, x, gates).view_as(dense)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the auxiliary loss
def _hand_loss(adapted: torch.Tensor, mask: torch.Tensor) -> float:
    """E · Σ_i f_i · P_i in Python, over the masked tokens (official get_layer_loss)."""
    rows = [adapted[n].tolist() for n in range(adapted.shape[0]) if mask[n]]
    e, count = adapted.shape[-1], len(rows)
    f = [sum(1.0 for row in rows if row[i] >= 0) / count for i in range(e)]
    p = [sum(row[i] for row in rows) / count for i in range(e)]
    return e * sum(fi * pi for fi, pi in zip(f, p, strict=True))


def test_balance_loss_against_a_hand_computation():
    """Guards against P taken over p instead of p − τ, f divided by a k, padding counted as
    tokens, and a gradient through the (non-differentiable) active fractions."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(10, 4, generator=gen) * 2, -1)
    tau = torch.rand(10, 1, generator=gen) * 0.25
    adapted = (p - tau).requires_grad_()
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1, 1, 1])
    loss = adamole_balance_loss(adapted.unsqueeze(0), mask)[0]
    assert loss.item() == pytest.approx(_hand_loss(adapted.detach(), mask), rel=1e-6)
    loss.backward()
    valid = mask.bool()
    f = (adapted.detach()[valid] >= 0).float().mean(0)
    want = (4 * f / valid.sum()).expand(10, 4) * mask.unsqueeze(-1)
    torch.testing.assert_close(adapted.grad, want)


def test_balance_loss_over_two_ranks_equals_one_process(monkeypatch):
    """Guards against a per-rank loss: the sums must be all-reduced over the caller's group so
    that two halves of a batch give the whole batch's loss."""
    gen = torch.Generator().manual_seed(1)
    adapted = torch.softmax(torch.randn(3, 12, E, generator=gen), -1) - 0.06
    mask = (torch.rand(12, generator=gen) > 0.3).long()
    want = adamole_balance_loss(adapted, mask)
    got = two_ranks(monkeypatch, lambda a, m, group: adamole_balance_loss(a, m, group=group),
                    (adapted[:, :5], mask[:5]), (adapted[:, 5:], mask[5:]))  # fmt: skip
    torch.testing.assert_close(got, want)


def test_method_aux_loss_is_the_sum_of_each_routers_loss_from_its_p_and_tau():
    """Guards against pairing a router's probabilities with another router's threshold and
    against a mean over routers where the official code sums them."""
    model = build(no_dropout(_config()))
    randomize(model)
    _spread_routers(model, std=0.3)
    ids, attn, labels, prompt = batch()
    out = model(ids, attn, labels, prompt)
    ctx = model.routing_context
    want = 0.0
    for router in model.routers.values():
        p = next(r.probs for r in out.routing_records if r.id == router.token_id)
        tau = next(o.probs for o in ctx.observations if o.id == router.threshold_id)
        want += _hand_loss((p - tau.unsqueeze(-1)).detach().reshape(-1, E), attn.reshape(-1))
    assert out.aux_by_kind["token"].item() == pytest.approx(want, rel=1e-5)
    assert out.aux_weighted.item() == pytest.approx(1e-3 * want, rel=1e-5)
    assert not get_method("adamole")(_config("loss.aux=none")).aux_losses(out.routing_records, None)


# ------------------------------------------------------------------ statistics
def test_active_experts_statistic_by_hand():
    """Guards against counting padding, counting experts by a non-zero weight instead of
    p ≥ τ, and changing the statistics of a router that records no active experts."""
    rid = RouterId(3, ("q",), "token")
    probs = torch.softmax(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)), -1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    active = torch.tensor(
        [[[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], [[0, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]],
        dtype=torch.float,
    )
    plain = RouterStatsAccumulator(None)
    plain.add([RoutingRecord(rid, probs, mask)])
    base = plain.finalize()
    acc = RouterStatsAccumulator(None)
    acc.add([RoutingRecord(rid, probs, mask), RoutingRecord(RouterId(3, ("q",), "active"),
                                                            active, mask)])  # fmt: skip
    stats = acc.finalize()
    assert list(stats) == ["layer03.q.token"]
    s = stats["layer03.q.token"]
    assert s["active_experts"].item() == pytest.approx((1 + 3 + 3) / 3)
    torch.testing.assert_close(s["active_share"], torch.tensor([2, 2, 2, 1]) / 3.0)
    for key, value in base["layer03.q.token"].items():
        assert torch.equal(s[key], value), key
    assert set(s) - set(base["layer03.q.token"]) == {"active_experts", "active_share"}


def test_model_statistics_report_the_mean_active_experts_per_router():
    """Guards against the statistic missing from the model's router statistics, or not being
    the mean over real tokens of the experts with p ≥ τ."""
    model = build(no_dropout(_config()))
    _spread_routers(model, std=0.5)
    ids, attn, labels, prompt = batch()
    out = model(ids, attn, labels, prompt)
    assert len(out.router_stats) == len(model.routers)
    for router in model.routers.values():
        s = out.router_stats[str(router.token_id)]
        p = next(r.probs for r in out.routing_records if r.id == router.token_id)
        tau = next(o.probs for o in model.routing_context.observations
                   if o.id == router.threshold_id)  # fmt: skip
        counts = (p >= tau.unsqueeze(-1)).sum(-1).float()
        want = (counts * attn).sum() / attn.sum()
        assert s["active_experts"].item() == pytest.approx(want.item(), rel=1e-6)


def test_tensorboard_gets_one_active_experts_scalar_per_router(tmp_path):
    """Guards against the statistic reaching router_stats.jsonl but not TensorBoard, and
    against an extra scalar for routers without it."""
    import json

    from hmora_ds.train.sinks import Sinks

    class Writer:
        def __init__(self):
            self.tags = {}

        def add_scalar(self, tag, value, step):
            self.tags[tag] = value

    writer = Writer()
    sinks = Sinks(tmp_path, writer, None, True, 1)
    one = {"balance": torch.tensor(0.9), "certainty": torch.tensor(0.5),
           "load": torch.tensor([0.5, 0.5]), "count": torch.tensor(4.0)}  # fmt: skip
    sinks.log_router(3, {"layer00.q.token": {**one, "active_experts": torch.tensor(1.5),
                                             "active_share": torch.tensor([1.0, 0.5])},
                         "layer00.k.token": one})  # fmt: skip
    assert writer.tags["router_active_experts/layer00.q.token"] == 1.5
    assert "router_active_experts/layer00.k.token" not in writer.tags
    line = json.loads((tmp_path / "router_stats.jsonl").read_text())
    assert line["layer00.q.token"]["active_experts"] == 1.5


# ------------------------------------------------------------------ refusals
REFUSALS = [
    ("adapter.compute=dense",
     "adapter.compute: must be sparse: each token uses a variable number of experts, which the "
     "sparse dispatcher computes (dense would run every expert) (method adamole)"),
    ("adapter.compute=auto",
     "adapter.compute: must be sparse: each token uses a variable number of experts, which the "
     "sparse dispatcher computes (dense would run every expert) (method adamole)"),
    ("routing.mode=soft",
     "routing.mode: must be topk: AdaMoLE's gates are sparse (a learned threshold, not a soft "
     "mixture) (method adamole)"),
    ("routing.top_k=2",
     "routing.top_k: must equal adapter.num_experts (8): the threshold activates up to E "
     "experts per token (method adamole)"),
    ("routing.task_encoder=transformer",
     "routing.task_encoder: must be none: AdaMoLE routes tokens only (method adamole)"),
    ("routing.share_routers=true",
     "routing.share_routers: must be false: every adapted linear has its own gate and "
     "threshold (method adamole)"),
    ("routing.router_dropout=0.1",
     "routing.router_dropout: must be 0: the gate and threshold read the layer input without "
     "dropout (method adamole)"),
    ("adapter.hydra=true", "adapter.hydra: must be false (method adamole)"),
    ("loss.aux=cgjs",
     "loss.aux: must be blc (AdaMoLE's load-balancing loss) or none (method adamole)"),
    ("options.max_threshold=0.0",
     "options.max_threshold: must lie in (0, 1] or be null (1/E), got 0.0 (method adamole)"),
    ("options.top_k=2",
     "options.top_k: unknown for method adamole; valid: ['max_threshold']"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "message"), REFUSALS)
def test_each_refused_setting_is_one_exact_line(override, message):
    """Guards against a setting AdaMoLE does not have being silently accepted (a dense
    fallback, a shared or dropped-out router) and against vague or multi-line errors."""
    with pytest.raises(ValueError) as err:
        build(_config(override))
    assert str(err.value) == message


def test_accepted_settings_build():
    """Guards against refusing what the method allows: no auxiliary loss, a custom τ_max,
    a different E (with top_k following it), other targets."""
    build(_config("loss.aux=none", "options.max_threshold=0.2"))
    build(_config("adapter.num_experts=4", "routing.top_k=4", "adapter.targets=[gate,up,down]"))


def test_the_preset_is_the_official_training_config():
    """Guards against a preset drifting from the official settings (rank 32 split over 8
    experts, α 16, dropout 0.05, q/k/v/o, aux coefficient 1e-3)."""
    c = _config()
    a = c.adapter
    want = (4, 16, 0.05, 8, ["q", "k", "v", "o"])
    assert (a.rank, a.alpha, a.dropout, a.num_experts, a.targets) == want
    assert (c.loss.aux, c.loss.aux_weight, c.loss.label_smoothing) == ("blc", 1e-3, 0.0)
    cls = get_method("adamole")
    assert cls.preset == "adamole" and cls.presets == {"adamole": "AdaMoLE"}
    assert re.fullmatch(r"\d+", str(cls.order))


# ------------------------------------------------------------------ expert parallelism
def _ep_worker(rank, world, out_dir):
    from tests._dist import ep_rank_forward, logits_objective, save_ep_rank

    model = _ep_reference()
    blocks, out = ep_rank_forward(model, world, rank)
    assert blocks == 6 * 4
    save_ep_rank(model, out, rank, out_dir, keys=("logits",), objective=logits_objective)


def _ep_reference():
    torch.manual_seed(0)
    model = tiny_hmora("adamole", overrides={"adapter.dropout": 0.0})
    randomize_adapters(model)
    _spread_routers(model, std=0.5)
    return model.double()


@pytest.mark.multirank
def test_expert_parallel_equals_replicated(ep_runs):
    """Guards against the all-to-all dispatcher assuming k experts per token: with AdaMoLE's
    variable counts, EP = 2 must give the replicated model's logits and gradients. The EP run
    is one of the shared spawn's (tests._dist.EP_CASES)."""
    from tests._dist import check_ep_equals_replicated, logits_objective

    check_ep_equals_replicated(_ep_reference(), ep_runs / "test_adamole", E // 2,
                               keys=("logits",), objective=logits_objective, out_tol=1e-6,
                               grad_tol=(1e-6, 1e-6))  # fmt: skip


def test_router_is_a_plain_module_with_the_bank_interface():
    """Guards against a router missing what the bank, the bench and EP read from it."""
    model = build(_config())
    router = next(iter(model.routers.values()))
    assert isinstance(router, AdaMoLERouter)
    assert router.top_k is None and router.sparse_gates and router.mode == "threshold"
    assert router.shared is False

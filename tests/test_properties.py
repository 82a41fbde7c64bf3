"""Property-based tests (hypothesis) of the pure routing functions whose domain is large.

The hand-computed tests in ``test_losses.py`` / ``test_routing.py`` pin a few points; these
check the laws that must hold for *every* input: random shapes, numbers of experts, k,
temperatures (from near-uniform to saturated routers), masks. Inputs are drawn as torch
tensors from a hypothesis-chosen seed and shape, so shrinking still gives a small failing case.

With ``CI=true`` the examples are derandomized (the same on every CI run) and no example
database is written; locally hypothesis explores new examples each run and remembers failures
in ``.hypothesis/``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hmora_ds.config import TARGETS
from hmora_ds.losses import (
    cgjs_divergence,
    entropy,
    stacked_cgjs_loss,
    stacked_load_balance_loss,
)
from hmora_ds.metrics import routing_statistics
from hmora_ds.routing.context import RouterId
from hmora_ds.routing.gates import topk_gates

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI", "").lower() == "true" else "dev")


@st.composite
def router_probs(draw, min_experts: int = 2, max_experts: int = 16):
    """(R, N, E) softmax probabilities of R routers over N decisions, float64, with a
    temperature from near-uniform (0.01) to saturated (30), plus a (N,) 0/1 mask with at
    least one valid decision."""
    seed = draw(st.integers(0, 2**31 - 1))
    r = draw(st.integers(1, 3))
    n = draw(st.integers(1, 24))
    e = draw(st.integers(min_experts, max_experts))
    temp = draw(st.sampled_from([0.01, 0.3, 1.0, 3.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(r, n, e, generator=g, dtype=torch.float64) * temp
    mask = (torch.rand(n, generator=g) < draw(st.sampled_from([0.5, 0.9, 1.0]))).double()
    mask[draw(st.integers(0, n - 1))] = 1.0
    return torch.softmax(logits, dim=-1), mask


# ------------------------------------------------------------------ top-k renormalisations
@given(router_probs(), st.data(), st.sampled_from(["paper", "sum"]))
def test_topk_gates_rows_sum_to_one_with_exactly_k_experts_the_largest(pm, data, renorm):
    """Guards against a top-k that keeps the wrong experts (smallest, or k ± 1 of them), leaks
    weight to unselected experts, or fails to renormalise (rows not summing to 1)."""
    probs, _ = pm
    e = probs.shape[-1]
    k = data.draw(st.integers(1, e))
    gates = topk_gates(probs, k, renorm)
    assert torch.allclose(gates.sum(-1), torch.ones_like(gates[..., 0]), atol=1e-12)
    assert ((gates > 0).sum(-1) == k).all()
    # the kept experts are the k largest probabilities
    kept_min = torch.where(gates > 0, probs, torch.full_like(probs, math.inf)).amin(-1)
    dropped_max = torch.where(gates > 0, torch.full_like(probs, -math.inf), probs).amax(-1)
    assert (kept_min >= dropped_max).all()


@given(router_probs(min_experts=3), st.data())
def test_topk_renormalisations_follow_their_equations(pm, data):
    """``sum`` keeps the probabilities' ratios (p_i / Σ_kept p); ``paper`` is a softmax over
    the kept probabilities (eq. 15). Guards against the two being swapped or either formula
    changed (e.g. softmax over logits instead of probabilities)."""
    probs, _ = pm
    k = data.draw(st.integers(2, probs.shape[-1]))
    kept = probs.topk(k, dim=-1)
    s = topk_gates(probs, k, "sum").gather(-1, kept.indices)
    p = topk_gates(probs, k, "paper").gather(-1, kept.indices)
    assert torch.allclose(s, kept.values / kept.values.sum(-1, keepdim=True), atol=1e-12)
    assert torch.allclose(p, torch.softmax(kept.values, -1), atol=1e-12)


@given(router_probs(), st.data(), st.sampled_from(["paper", "sum"]))
def test_topk_gates_are_permutation_equivariant(pm, data, renorm):
    """Relabelling the experts relabels the gates and nothing else. Guards against an expert
    index used as a value (e.g. gates tied to position 0). Ties are broken away first."""
    probs, _ = pm
    e = probs.shape[-1]
    probs = probs + torch.arange(e, dtype=probs.dtype) * 1e-9  # distinct values: no ties
    k = data.draw(st.integers(1, e))
    perm = torch.tensor(data.draw(st.permutations(list(range(e)))))
    direct = topk_gates(probs, k, renorm)[..., perm]
    permuted = topk_gates(probs[..., perm], k, renorm)
    assert torch.allclose(direct, permuted, atol=1e-12)


# ------------------------------------------------------------------ CGJS (eqs. 10–12)
gammas = st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).map(sorted)


@given(router_probs(), gammas)
def test_cgjs_loss_is_eq_12_and_within_its_bounds(pm, gc_gb):
    """L_aux = max((γ_b − γ_c) log E − CGJS, 0) / log E (eq. 12, computed here from eq. 11's
    pieces by hand), with CGJS ≤ (γ_b − γ_c) log E, so 0 ≤ L_aux; and L_aux ≤ max(γ_b, 1 − γ_c)
    (balance Ĥ(M) ≥ mean certainty Ĥ(p) by concavity; collapsed routing reaches γ_b, so the
    bound γ_b − γ_c holds for CGJS, not for L_aux). Guards against a sign or clamp error in the
    stacked implementation, or a mask ignored in one of the two moments."""
    (probs, mask), (gamma_c, gamma_b) = pm, gc_gb
    e = probs.shape[-1]
    log_e = math.log(e)
    loss = stacked_cgjs_loss(probs, mask, gamma_b=gamma_b, gamma_c=gamma_c)
    for r in range(probs.shape[0]):
        valid = probs[r][mask.bool()]
        h_mean_p = entropy(valid.mean(0))  # H(M) over valid decisions only
        mean_h = entropy(valid).mean()
        cgjs = min(h_mean_p, gamma_b * log_e) - max(mean_h, gamma_c * log_e)
        assert cgjs <= (gamma_b - gamma_c) * log_e + 1e-9
        cgjs_fn = cgjs_divergence(probs[r], mask, gamma_b=gamma_b, gamma_c=gamma_c)
        assert cgjs_fn.item() == pytest.approx(float(cgjs), abs=1e-9)
        expected = max((gamma_b - gamma_c) * log_e - cgjs, 0.0) / log_e
        assert loss[r].item() == pytest.approx(float(expected), abs=1e-9)
        assert -1e-12 <= loss[r].item() <= max(gamma_b, 1.0 - gamma_c) + 1e-9


@given(router_probs(), gammas, st.data())
def test_cgjs_loss_ignores_masked_decisions_and_their_order(pm, gc_gb, data):
    """Appending decisions with mask 0 (padding) or reordering the decisions leaves L_aux
    unchanged. Guards against padding counted in the balance or certainty moments."""
    (probs, mask), (gamma_c, gamma_b) = pm, gc_gb
    r, n, e = probs.shape
    junk = torch.softmax(torch.randn(r, 5, e, dtype=probs.dtype) * 10, -1)
    padded = torch.cat([probs, junk], 1)
    pmask = torch.cat([mask, torch.zeros(5, dtype=mask.dtype)])
    perm = torch.tensor(data.draw(st.permutations(list(range(n + 5)))))
    kw = {"gamma_b": gamma_b, "gamma_c": gamma_c}
    base = stacked_cgjs_loss(probs, mask, **kw)
    assert torch.allclose(stacked_cgjs_loss(padded, pmask, **kw), base, atol=1e-10)
    assert torch.allclose(stacked_cgjs_loss(padded[:, perm], pmask[perm], **kw), base, atol=1e-10)


@given(st.integers(2, 16), st.integers(1, 12), gammas)
def test_cgjs_loss_is_zero_at_balanced_certain_routing_and_gamma_b_at_collapse(e, n, gc_gb):
    """One-hot decisions spread evenly over all experts (balance 1, certainty 0) cost nothing;
    every decision on one expert costs exactly γ_b. Guards against the balance and certainty
    terms exchanged or their clamps reversed."""
    gamma_c, gamma_b = gc_gb
    spread = torch.eye(e, dtype=torch.float64).repeat(n, 1).unsqueeze(0)
    collapsed = torch.zeros(1, n * e, e, dtype=torch.float64)
    collapsed[..., 0] = 1.0
    kw = {"gamma_b": gamma_b, "gamma_c": gamma_c}
    assert stacked_cgjs_loss(spread, None, **kw).item() == pytest.approx(0.0, abs=1e-12)
    assert stacked_cgjs_loss(collapsed, None, **kw).item() == pytest.approx(gamma_b, abs=1e-12)


# ------------------------------------------------------------------ L_blc (eqs. 17–19)
@given(router_probs(), st.data())
def test_load_balance_loss_equation_and_bounds(pm, data):
    """L_blc = E · Σ_i F_i P_i over valid decisions (F: top-k fractions / k, P: mean
    probability), recomputed by hand, and 0 < L_blc ≤ E (Σ F_i = 1, P_i ≤ 1). Guards against a
    missing / k, a mask ignored in F or P, or F taken from the bottom-k."""
    probs, mask = pm
    r, _, e = probs.shape
    k = data.draw(st.integers(1, e))
    loss = stacked_load_balance_loss(probs, k, mask)
    for i in range(r):
        valid = probs[i][mask.bool()]
        chosen = torch.zeros_like(valid).scatter(-1, valid.topk(k, -1).indices, 1.0)
        frac = chosen.mean(0) / k
        assert frac.sum().item() == pytest.approx(1.0, abs=1e-12)
        expected = e * (frac * valid.mean(0)).sum()
        assert loss[i].item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
        assert 0.0 < loss[i].item() <= e + 1e-9


@given(st.integers(2, 16), st.integers(1, 40), st.data())
def test_load_balance_loss_is_one_at_uniform_routing(e, n, data):
    """Uniform probabilities give L_blc = E · Σ F_i / E = 1 whichever experts the ties pick
    (the loss's value at perfect balance). Guards against F not divided by k or P not a mean."""
    k = data.draw(st.integers(1, e))
    uniform = torch.full((2, n, e), 1.0 / e, dtype=torch.float64)
    loss = stacked_load_balance_loss(uniform, k, None)
    assert torch.allclose(loss, torch.ones(2, dtype=torch.float64), atol=1e-12)


@given(st.integers(2, 16), st.integers(1, 8), st.data())
def test_routing_statistics_at_uniform_and_balanced_one_hot_routing(e, n, data):
    """Uniform routing: balance 1, certainty 1 (maximally uncertain), load 1/E. One-hot
    routing spread evenly: balance 1, certainty 0, load 1/E. Guards against balance and
    certainty exchanged, or a load not normalised by k."""
    k = data.draw(st.integers(1, e))
    uniform = torch.full((n * e, e), 1.0 / e, dtype=torch.float64)
    stats = routing_statistics(uniform, k=None)
    assert stats["balance"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["certainty"].item() == pytest.approx(1.0, abs=1e-6)
    one_hot = torch.eye(e, dtype=torch.float64).repeat(n, 1)
    stats = routing_statistics(one_hot, k=k)
    assert stats["balance"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["certainty"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["load"].sum().item() == pytest.approx(1.0, abs=1e-6)
    if k == 1:
        assert torch.allclose(
            stats["load"].double(), torch.full((e,), 1.0 / e, dtype=torch.float64)
        )


# ------------------------------------------------------------------ router names
@given(
    st.integers(0, 300),
    st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3, unique=True),
    st.sampled_from(["token", "task"]),
)
def test_router_names_round_trip(layer, targets, kind):
    """``RouterId.parse(str(rid)) == rid`` for every layer, target group and kind: the names
    in statistics, TensorBoard tags and analysis files read back to the router that wrote
    them. Guards against a parse that drops a target, misreads the layer or swaps fields."""
    rid = RouterId(layer, tuple(targets), kind)
    name = str(rid)
    assert name.startswith(f"layer{layer:02d}.")
    assert RouterId.parse(name) == rid


@pytest.mark.parametrize(
    "name", ["layer03.q_k_v", "layer03.q.token.x", "lyr03.q.token", "layerx3.q.token", ""]
)
def test_malformed_router_names_are_refused_naming_them(name):
    """A name not written by ``str(RouterId)`` is a one-line error quoting it."""
    with pytest.raises(ValueError, match=r"router name .*expected layerNN\.<targets>\.<kind>"):
        RouterId.parse(name)


@given(router_probs(), st.integers(1, 4))
def test_cgjs_divergence_defaults_and_token_shapes(pm, batch):
    """The defaults are the paper's γ_b = 1, γ_c = 0.4 (spec §5), and a (B, T, E) token
    router with its (B, T) mask gives the value of its flattened (B·T, E) decisions, whatever
    T is. Guards against changed defaults and E read from the wrong axis."""
    probs, mask = pm
    p = probs[0]
    n, e = p.shape
    tokens = p.repeat(batch, 1).view(batch, n, e)  # T = n differs from E in general
    tmask = mask.repeat(batch).view(batch, n)
    explicit = cgjs_divergence(p, mask, gamma_b=1.0, gamma_c=0.4)
    assert cgjs_divergence(p, mask).item() == pytest.approx(explicit.item(), abs=1e-12)
    assert cgjs_divergence(tokens, tmask).item() == pytest.approx(explicit.item(), abs=1e-9)
    assert stacked_cgjs_loss(tokens.unsqueeze(0), tmask).item() == pytest.approx(
        stacked_cgjs_loss(p.unsqueeze(0), mask, gamma_b=1.0, gamma_c=0.4).item(), abs=1e-9
    )


# ------------------------------------------------------------------ the sparse dispatch plan
@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(2, 8),
    st.sampled_from([None, 1, 2]),
)
def test_dispatch_plan_lists_every_routed_pair_once_grouped_by_expert(seed, b, t, e, k):
    """The plan's (token, expert, weight) triples rebuild the gates exactly, expert slices
    in expert order with tokens ascending inside each, ``offsets`` int32 of length E (the
    layout ``torch._grouped_mm`` reads on CUDA) — also when the last experts get no token.
    For a top-k plan every token has k pairs; for a variable plan (AdaMoLE-style thresholds)
    any number, zero included. Guards against lost or duplicated pairs, offsets shorter than
    E (``bincount`` without ``minlength``), int64 offsets and unordered slices."""
    from hmora_ds.experts.dispatch import DispatchPlan

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, e, generator=g, dtype=torch.float64)
    logits[..., e // 2 :] -= 100.0  # the upper experts are never chosen: empty slices at the end
    probs = torch.softmax(logits, -1)
    if k is None:
        gates = torch.where(probs > 1.0 / e, probs, torch.zeros_like(probs))  # 0..E experts
    else:
        gates = topk_gates(probs, min(k, e // 2), "sum")
    plan = DispatchPlan.build(gates, None if k is None else min(k, e // 2), t)
    assert plan.offsets.dtype == torch.int32 and plan.offsets.shape == (e,)
    assert plan.num_tokens == b * t
    rebuilt = torch.zeros(b * t, e, dtype=gates.dtype)
    start = 0
    for expert, end in enumerate(plan.offsets.tolist()):
        tokens = plan.token[start:end]
        assert (tokens[1:] > tokens[:-1]).all()  # each token once per expert, ascending
        rebuilt[tokens, expert] = plan.weight[start:end]
        start = end
    assert start == plan.token.numel()
    assert torch.equal(rebuilt, gates.reshape(-1, e))


@pytest.mark.parametrize("k", [None, 2])
def test_dispatch_plan_keeps_token_order_inside_each_expert_on_long_inputs(k):
    """From 32 keys on, torch's CPU ``argsort`` is no longer stable unless asked: the plan
    must still list each expert's tokens in ascending order (its sort is stable). Guards
    against ``stable=True`` dropped (invisible on the short inputs above)."""
    from hmora_ds.experts.dispatch import DispatchPlan

    probs = torch.softmax(torch.randn(4, 64, 8, generator=torch.Generator().manual_seed(0)), -1)
    gates = (
        torch.where(probs > 0.125, probs, torch.zeros_like(probs))
        if k is None
        else (topk_gates(probs, k, "sum"))
    )
    plan = DispatchPlan.build(gates, k, 64)
    start = 0
    for end in plan.offsets.tolist():
        tokens = plan.token[start:end]
        assert (tokens[1:] > tokens[:-1]).all()
        start = end


# ------------------------------------------------------------------ masked mean (HiMoLE's L_div)
@given(router_probs())
def test_masked_mean_is_the_mean_over_valid_entries(pm):
    """The mean over the mask's valid entries only, with the gradient 1/count on each of them
    and 0 on padding; 0 (not NaN) with no valid entry; a mismatched mask is a one-line error.
    Guards against padding in the mean, a count over all entries, or a NaN on empty masks."""
    from hmora_ds.losses import masked_mean

    probs, mask = pm
    values = probs[0, :, 0].clone().requires_grad_(True)
    got = masked_mean(values, mask)
    expected = values.detach()[mask.bool()].mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    got.backward()
    assert torch.allclose(values.grad, mask / mask.sum())
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0
    assert masked_mean(values).item() == pytest.approx(values.detach().mean().item(), rel=1e-12)
    with pytest.raises(ValueError, match=r"^mask: shape \(\d+, 1\) must equal \(\d+,\)$"):
        masked_mean(values, mask.unsqueeze(-1))


# ------------------------------------------------------------------ HiMoLE's gates and L_div
@given(
    st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 6), st.integers(1, 4),
    st.integers(1, 4), st.data(), st.sampled_from([torch.float32, torch.bfloat16]),
)  # fmt: skip
def test_himole_gates_are_eq_4_with_exactly_k_experts(seed, b, t, n, m, data, dtype):
    """G = KeepTopK(softmax(broadcast(G_sen) ⊙ G_tok)) recomputed by hand (eq. 4): rows sum
    to 1 with exactly k non-zero entries, the kept ones the k largest of the softmax, expert j
    scaled by its group j // M's score; fp32 gates for bf16 logits. Guards against the groups
    broadcast in the wrong order (tile instead of repeat), k ± 1 experts, unnormalised rows
    and low-precision routing."""
    from hmora_ds.methods.himole import hierarchical_gates, hierarchical_probs

    k = data.draw(st.integers(1, n * m))
    g = torch.Generator().manual_seed(seed)
    sen = (torch.randn(b, n, generator=g) * 2).to(dtype)
    tok = (torch.randn(b, t, n * m, generator=g) * 2).to(dtype)
    gates = hierarchical_gates(sen, tok, experts_per_group=m, top_k=k)
    assert gates.dtype == torch.float32 and gates.shape == (b, t, n * m)
    by_hand = torch.empty(b, t, n * m)
    for j in range(n * m):
        by_hand[..., j] = sen.float()[:, j // m, None] * tok.float()[..., j]
    probs = torch.softmax(by_hand, -1)
    got = hierarchical_probs(sen, tok, experts_per_group=m)
    assert got.dtype == torch.float32
    assert torch.allclose(got, probs, atol=1e-6)
    assert torch.allclose(gates.sum(-1), torch.ones(b, t), atol=1e-6)
    assert ((gates > 0).sum(-1) == k).all()
    assert torch.allclose(gates, topk_gates(probs, k, "sum"), atol=1e-6)


@given(
    st.integers(0, 2**31 - 1), st.integers(2, 4), st.integers(1, 3), st.integers(1, 4),
    st.integers(1, 8), st.sampled_from([1e-3, 1.0, 1e3]),
)  # fmt: skip
def test_himole_group_cosines_are_the_mean_pairwise_cosine(seed, n, b, t, d, scale):
    """Per token, the mean over pairs n < n' of cos(e_n, e_n') (eq. 7) against
    ``torch.nn.functional.cosine_similarity`` pair by pair, for outputs of any scale (small
    norms included), within [−1, 1]; a group whose output is 0 contributes cosine 0 with a
    finite gradient. Guards against a norm clamp that bites at small norms, the ordered-pair
    count off by two, and a NaN gradient at e = 0."""
    from hmora_ds.methods.himole import diversity_loss, group_cosines

    g = torch.Generator().manual_seed(seed)
    e = (torch.randn(n, b, t, d, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    with torch.no_grad():
        e[0, 0, 0] = 0.0  # group 0 keeps no expert for this token
    got = group_cosines(e)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    expected = sum(torch.nn.functional.cosine_similarity(e[i], e[j], dim=-1, eps=1e-30)
                   for i, j in pairs) / len(pairs)  # fmt: skip
    assert torch.allclose(got, expected.detach(), atol=1e-9)
    assert (got.abs() <= 1 + 1e-12).all()
    mask = torch.ones(b, t)
    mask[0, 0] = 0.0
    loss = diversity_loss(e, mask)
    valid = got[mask.bool()]
    expected_loss = valid.mean().item() if valid.numel() else 0.0  # no valid token: 0, not NaN
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    loss.backward()
    assert torch.isfinite(e.grad).all()
    if n * b * t > 1:
        assert e.grad[:, 0, 0].abs().sum() == 0  # the masked token gets no gradient


@given(st.integers(1, 40), st.integers(1, 33))
def test_sinusoid_positions_are_the_transformer_table(length, dim):
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)) ("Attention is
    all you need"), for odd widths too, written out per entry. Guards against sin / cos
    swapped, a wrong base or exponent sign, and odd columns shifted by one frequency."""
    from hmora_ds.routing.task_encoder import sinusoid_positions

    table = sinusoid_positions(length, dim, torch.device("cpu"))
    assert table.shape == (length, dim) and table.dtype == torch.float32
    expected = torch.empty(length, dim, dtype=torch.float64)
    for p in range(length):
        for j in range(dim):
            angle = p / 10000.0 ** ((j - j % 2) / dim)
            expected[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    assert torch.allclose(table.double(), expected, atol=2e-5)


@given(router_probs(), st.data())
def test_adamole_gates_are_the_active_experts_renormalised(pm, data):
    """AdaMoLE (``w = (p − τ)·[p ≥ τ]`` renormalised): with τ ≤ 1/E at least the largest expert
    is active and rows sum to 1; exactly the experts with p > τ are non-zero; every kept gate
    is (p_i − τ) / Σ_active (p_j − τ). Guards against the threshold compared the wrong way,
    an inactive expert leaking a negative weight, and rows that do not sum to 1."""
    from hmora_ds.methods.adamole import adaptive_gates

    probs, _ = pm
    e = probs.shape[-1]
    n = probs.shape[0] * probs.shape[1]
    tau = torch.tensor(data.draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)),
                       dtype=probs.dtype)  # fmt: skip
    tau = (tau / e).view(*probs.shape[:-1], 1)  # τ = τ_max·σ(·) ∈ [0, 1/E]
    gates = adaptive_gates(probs, tau)
    active = probs >= tau
    assert active.any(-1).all()
    assert ((gates > 0) == (probs > tau)).all()
    assert (gates >= 0).all()
    excess = torch.where(active, probs - tau, torch.zeros_like(probs))
    total = excess.sum(-1, keepdim=True)
    rows = total.squeeze(-1) > 0
    assert torch.allclose(gates[rows].sum(-1), torch.ones(int(rows.sum()), dtype=probs.dtype))
    assert torch.allclose(gates[rows], (excess / total)[rows], atol=1e-6)

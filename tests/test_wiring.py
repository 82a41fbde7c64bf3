"""The tested pure functions as the model wires them: hybrid gates (eq. 7), the top-k
renormalisation chosen in the config, and the auxiliary loss over the model's own routing
records with the padding mask.

Each test recomputes by hand, from what the routers output inside a real forward, the value
the model used, so a mistake in the wiring (not in the bare function, which test_routing.py
and test_losses.py check) fails here. Tiny random-init Qwen2 models: mechanics only.
"""

from __future__ import annotations

import math

import pytest
import torch

from hmora_ds.losses import cgjs_loss, load_balance_loss
from tests.conftest import batch, tiny_hmora

NO_DROPOUT = {"adapter.dropout": 0.0, "routing.router_dropout": 0.0, "routing.encoder_dropout": 0.0}
#: The preset's α(l) = σ(−ε + 2ε·l/(L−1) + μ) on six layers, ε = 4, μ = −2: layer 3 is hybrid
#: with α = σ(−1.2) ≈ 0.23, far from 0.5, so exchanging α and 1 − α changes every gate.
HYBRID_LAYER = 3
HYBRID_ALPHA = 1.0 / (1.0 + math.exp(1.2))


def _capture(group) -> dict[str, torch.Tensor]:
    """Hooks on a router group: its token and task routers' probabilities and its gates."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda _m, _i, out: seen.__setitem__(name, out.detach())

    if group.token_router is not None:
        group.token_router.register_forward_hook(keep("token"))
    if group.task_router is not None:
        group.task_router.register_forward_hook(keep("task"))
    group.register_forward_hook(keep("gates"))
    return seen


def _hand_topk(g: torch.Tensor, k: int, renorm: str) -> torch.Tensor:
    """Top-k by sorting (not ``topk_gates``), renormalised as eq. 15 (``paper``) or by sum."""
    vals, idx = g.sort(dim=-1, descending=True)
    kept = vals[..., :k]
    kept = torch.exp(kept) / torch.exp(kept).sum(-1, keepdim=True) if renorm == "paper" else kept
    kept = kept / kept.sum(-1, keepdim=True) if renorm == "sum" else kept
    return torch.zeros_like(g).scatter(-1, idx[..., :k], kept)


@pytest.mark.parametrize("mode", ["soft", "topk"])
def test_hybrid_gates_mix_task_and_token_routers_with_alpha(mode):
    """Guards against exchanging α and 1 − α (or dropping a term) in the hybrid mix
    g = α·g_task + (1 − α)·g_token (eq. 7): the gates a hybrid layer used are recomputed from
    its token and task routers' outputs and α(l) computed by hand from eq. 8."""
    model = tiny_hmora("hmora_lw", overrides={**NO_DROPOUT, "routing.mode": mode}).eval()
    group = model.routers[f"layer{HYBRID_LAYER:02d}_q_k_v"]
    assert group.layer_mode == "hybrid"
    seen = _capture(group)
    ids, attn, labels, prompt = batch()
    with torch.no_grad():
        model(ids, attn, labels, prompt)
    p_token, p_task = seen["token"], seen["task"]  # (B, T, E), (B, E)
    assert p_token.shape == (3, 12, 8) and p_task.shape == (3, 8)
    mixed = HYBRID_ALPHA * p_task[:, None, :] + (1.0 - HYBRID_ALPHA) * p_token
    want = mixed if mode == "soft" else _hand_topk(mixed, 2, "paper")
    torch.testing.assert_close(seen["gates"], want, rtol=0, atol=1e-6)
    # The swap would be visible: the two routers disagree by far more than the tolerance.
    swapped = (1.0 - HYBRID_ALPHA) * p_task[:, None, :] + HYBRID_ALPHA * p_token
    assert (swapped - mixed).abs().max() > 1e-3


def test_topk_renorm_from_the_config_reaches_the_gates():
    """Guards against ignoring ``routing.topk_renorm`` (the model always renormalising with
    the paper's softmax): with ``sum`` the gates a token-only and a hybrid layer used equal
    p_i / Σ_kept p by hand, and differ from the default model's (same weights) paper gates."""
    gates = {}
    for renorm in ("sum", "paper"):
        model = tiny_hmora("hmora", overrides={**NO_DROPOUT, "routing.topk_renorm": renorm})
        model.eval()
        token_only, hybrid = model.routers["layer00_q"], model.routers[f"layer{HYBRID_LAYER:02d}_q"]
        assert (token_only.layer_mode, hybrid.layer_mode) == ("token", "hybrid")
        seen0, seen3 = _capture(token_only), _capture(hybrid)
        ids, attn, labels, prompt = batch(seed=1)
        with torch.no_grad():
            model(ids, attn, labels, prompt)
        mixed = HYBRID_ALPHA * seen3["task"][:, None, :] + (1.0 - HYBRID_ALPHA) * seen3["token"]
        torch.testing.assert_close(
            seen0["gates"], _hand_topk(seen0["token"], 2, renorm), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(seen3["gates"], _hand_topk(mixed, 2, renorm), rtol=0, atol=1e-6)
        gates[renorm] = (seen0["gates"], seen3["gates"])
    for sum_gates, paper_gates in zip(gates["sum"], gates["paper"], strict=True):
        assert (sum_gates - paper_gates).abs().max() > 1e-2


@pytest.mark.parametrize("aux", ["cgjs", "blc"])
def test_model_aux_loss_equals_recomputation_from_records_over_real_tokens(aux):
    """Guards against dropping the padding mask from the model's auxiliary loss (token
    routers' statistics taken over padding too): the loss is recomputed with the bare loss
    functions from the model's routing records, token routers over the batch's real tokens
    (its attention mask, not the records' own mask), task routers over its sequences, and
    compared with the model's per-kind values, ``aux_weighted`` and ``loss``."""
    model = tiny_hmora("hmora", overrides={**NO_DROPOUT, "loss.aux": aux}).eval()
    ids, attn, labels, prompt = batch()  # rows 1 and 2 end with 2 and 4 padding tokens
    assert (attn == 0).sum() == 6
    with torch.no_grad():
        out = model(ids, attn, labels, prompt)
    lc, k = model.config.loss, model.config.routing.top_k
    want = {"token": torch.zeros(()), "task": torch.zeros(())}
    kinds = {"token": 0, "task": 0}
    for rec in out.routing_records:
        kinds[rec.kind] += 1
        if rec.kind == "token":
            assert rec.probs.shape == (3, 12, 8)
            if aux == "cgjs":
                value = cgjs_loss(rec.probs, attn, gamma_b=lc.gamma_b, gamma_c=lc.gamma_c)
            else:
                value = load_balance_loss(rec.probs, k, attn)
        else:
            assert rec.probs.shape == (3, 8)  # one decision per sequence
            if aux == "blc":  # L_blc leaves the task routers out by default
                continue
            value = cgjs_loss(rec.probs, gamma_b=lc.gamma_b, gamma_c=lc.gamma_c)
        want[rec.kind] = want[rec.kind] + value
    assert kinds == {"token": 7 * 5, "task": 7 * 3}  # token on layers 0–4, task on 3–5
    if aux == "blc":
        del want["task"]
    assert out.aux_by_kind.keys() == want.keys()
    for kind, value in want.items():
        torch.testing.assert_close(out.aux_by_kind[kind], value, rtol=1e-6, atol=1e-6)
    total = sum(want.values())
    torch.testing.assert_close(out.aux_weighted, lc.aux_weight * total, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out.loss, out.lm_loss + lc.aux_weight * total)
    # Taken over padding too, the token routers' loss would differ by far more than that.
    unmasked = sum(
        cgjs_loss(r.probs, gamma_b=lc.gamma_b, gamma_c=lc.gamma_c)
        if aux == "cgjs"
        else load_balance_loss(r.probs, k)
        for r in out.routing_records
        if r.kind == "token"
    )
    assert abs(unmasked - want["token"]) > 1e-4

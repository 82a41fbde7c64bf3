"""CGJS L_aux (eqs. 9–13) and L_blc (eqs. 17–19) against hand-computed values."""

import math

import pytest
import torch

from hmora_ds.losses import (
    cgjs_divergence,
    cgjs_loss,
    entropy,
    load_balance_loss,
    masked_mean,
    stacked_cgjs_loss,
    stacked_routing_moments,
)
from hmora_ds.metrics import RouterStatsAccumulator, routing_statistics
from hmora_ds.routing.context import RouterId, RoutingRecord
from tests._dist import run_ranks, two_ranks

RID = RouterId(0, ("r",), "token")

EYE4 = torch.eye(4)


def test_cgjs_zero_when_balanced_and_certain():
    assert cgjs_loss(EYE4).item() == 0.0
    assert cgjs_loss(EYE4, gamma_b=1.0, gamma_c=0.0).item() == 0.0


@pytest.mark.parametrize(
    ("probs", "expected"),
    [
        (torch.full((5, 4), 0.25), 0.6),  # balanced, maximally uncertain: 1 − 0.4
        (EYE4[[0, 0, 0]], 1.0),  # certain, fully collapsed: γ_b − 0
        (torch.tensor([[0.5, 0.5, 0, 0]] * 2), (1 - 0.5) + (0.5 - 0.4)),  # Ĥ(M) = Ĥ(p) = 1/2
    ],
)
def test_cgjs_hand_values(probs, expected):
    assert cgjs_loss(probs).item() == pytest.approx(expected, abs=1e-6)


def test_cgjs_two_forms_agree_and_bounds_clip():
    gen = torch.Generator().manual_seed(0)
    for gb, gc in [(1.0, 0.4), (0.8, 0.2), (0.5, 0.5)]:
        for temp in (0.1, 1.0, 5.0):
            probs = torch.softmax(torch.randn(32, 8, generator=gen) / temp, -1)
            cg = cgjs_divergence(probs, gamma_b=gb, gamma_c=gc)
            eq12 = torch.clamp((gb - gc) * math.log(8) - cg, min=0) / math.log(8)
            ref = cgjs_loss(probs, gamma_b=gb, gamma_c=gc)
            torch.testing.assert_close(ref, eq12)
            hm = entropy(probs.mean(0)) / math.log(8)
            hp = entropy(probs).mean() / math.log(8)
            torch.testing.assert_close(ref, (gb - hm.clamp(max=gb)) + (hp.clamp(min=gc) - gc))


def test_cgjs_masks_padding_and_accepts_token_shapes():
    probs = torch.tensor([[[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0.1, 0.2, 0.3, 0.4]]])
    mask = torch.tensor([[1, 1, 0]])
    assert cgjs_loss(probs, mask).item() == pytest.approx(0.6, abs=1e-6)
    assert cgjs_loss(probs, torch.zeros(1, 3)).item() == 0.0
    with pytest.raises(ValueError, match="mask: shape"):
        cgjs_loss(probs, torch.ones(3))
    with pytest.raises(ValueError, match="at least 2 experts"):
        cgjs_loss(torch.ones(3, 1))


def test_cgjs_is_fp32_under_low_precision_input():
    probs = torch.softmax(torch.randn(16, 8), -1)
    low = cgjs_loss(probs.to(torch.bfloat16))
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(cgjs_loss(probs.to(torch.bfloat16).float()).item())


def test_load_balance_hand_values():
    p = torch.tensor([[0.6, 0.2, 0.15, 0.05], [0.1, 0.6, 0.25, 0.05]])
    # k = 2: top-2 sets {0, 1}, {1, 2} → F = [1, 2, 1, 0] / (2·2); P = column means.
    assert load_balance_loss(p, 2).item() == pytest.approx(
        4 * (0.25 * 0.35 + 0.5 * 0.4 + 0.25 * 0.2)
    )
    # k = 1: F = [1/2, 1/2, 0, 0].
    assert load_balance_loss(p, 1).item() == pytest.approx(4 * (0.5 * 0.35 + 0.5 * 0.4))
    # Perfectly balanced one-hot routing gives the minimum, 1.
    assert load_balance_loss(EYE4, 1).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k must lie in"):
        load_balance_loss(p, 5)


def test_saturated_router_gives_finite_gradient_and_the_same_value():
    """A softmax that underflows to an exact 0 (logits ~100 apart, seen on SmolLM2's down_proj
    routers) must not turn the CGJS gradient into NaN (xlogy's backward divides 0 by 0)."""
    logits = torch.tensor([[0.0, 200.0, 1.0, 3.0], [2.0, 0.5, -1.0, 0.0]], requires_grad=True)
    probs = torch.softmax(logits, -1)
    assert (probs == 0).any()
    loss = cgjs_loss(probs, gamma_c=0.4)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # Two code paths (log of a clamped p vs xlogy): equal up to rounding, not bit for bit; the
    # last bit differs on some CPUs.
    reference = -torch.special.xlogy(probs, probs).sum(-1)
    torch.testing.assert_close(entropy(probs.detach()), reference.detach(), rtol=1e-6, atol=1e-7)


def test_load_balance_gradient_flows_through_p_only():
    """Guards against a gradient through the hard top-k fractions F (a straight-through or
    soft F) and against padding rows getting gradient: L_blc = E · Σ_i F_i · P_i with F
    constant gives dL/dp_(n,i) = E · F_i / N on each of the N valid rows, 0 on masked ones.
    (It used to check only that some gradient is non-zero.)"""
    p = torch.tensor(
        [
            [0.6, 0.2, 0.15, 0.05],
            [0.1, 0.6, 0.25, 0.05],
            [0.3, 0.1, 0.2, 0.4],
            [0.7, 0.1, 0.1, 0.1],
        ],
        requires_grad=True,
    )
    mask = torch.tensor([1, 1, 1, 0])
    load_balance_loss(p, 2, mask).backward()
    # Valid rows' top-2 sets {0, 1}, {1, 2}, {3, 0} → F = [2, 2, 1, 1] / (2·3); N = 3, E = 4.
    row = 4 * torch.tensor([2.0, 2.0, 1.0, 1.0]) / 6 / 3
    want = torch.stack([row, row, row, torch.zeros(4)])
    torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=0.0)


def test_routing_statistics_on_known_distributions():
    s = routing_statistics(EYE4[[0, 1, 2, 3]], k=1)
    assert s["balance"].item() == pytest.approx(1.0)
    assert s["certainty"].item() == pytest.approx(0.0)
    torch.testing.assert_close(s["load"], torch.full((4,), 0.25))
    s = routing_statistics(torch.full((3, 4), 0.25))
    assert s["certainty"].item() == pytest.approx(1.0)


def test_statistics_accumulate_over_micro_steps_like_one_batch():
    """Balance is not linear: two micro-batches must give the statistics of their union."""
    a, b = EYE4[[0, 0]], EYE4[[1, 1]]  # each alone is fully collapsed (balance 0)
    acc = RouterStatsAccumulator(k=1)
    acc.add([RoutingRecord(RID, a, None)])
    acc.add([RoutingRecord(RID, b, None)])
    stats = acc.finalize()[str(RID)]
    union = routing_statistics(torch.cat([a, b]), k=1)
    for key in ("balance", "certainty", "load"):
        torch.testing.assert_close(stats[key], union[key])
    assert stats["balance"].item() == pytest.approx(0.5)  # Ĥ([.5, .5, 0, 0]) = log 2 / log 4
    assert len(acc) == 0


def _global_worker(rank, world, probs_logits, mask, out_dir):
    import torch.distributed as dist

    local = probs_logits.chunk(world)[rank].clone().requires_grad_(True)
    local_mask = mask.chunk(world)[rank]
    probs = torch.softmax(local, -1)
    cg = cgjs_loss(probs, local_mask, group=dist.group.WORLD)
    blc = load_balance_loss(probs, 2, local_mask, group=dist.group.WORLD)
    div = cgjs_divergence(probs, local_mask, group=dist.group.WORLD)
    (cg + blc).backward()
    # Data-parallel engines average gradients over ranks: do the same for the comparison.
    torch.save(
        {"cg": cg.detach(), "blc": blc.detach(), "div": div.detach(), "grad": local.grad / world},
        out_dir / f"rank{rank}.pt",
    )


@pytest.mark.multirank
def test_global_batch_statistics_two_ranks_equal_one_process(tmp_path):
    """CGJS, its divergence and L_blc on two ranks holding half a batch each equal one
    process holding all of it, values and gradients. Guards against a statistic that is not
    all-reduced (the ``group`` not passed down) or a non-differentiable all-reduce."""
    torch.manual_seed(0)
    logits = torch.randn(12, 8)
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 1, 1])
    run_ranks(_global_worker, 2, tmp_path, logits, mask, tmp_path, timeout=90)
    ref_logits = logits.clone().requires_grad_(True)
    probs = torch.softmax(ref_logits, -1)
    cg, blc = cgjs_loss(probs, mask), load_balance_loss(probs, 2, mask)
    (cg + blc).backward()
    grads = []
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["cg"], cg.detach())
        torch.testing.assert_close(got["blc"], blc.detach())
        torch.testing.assert_close(got["div"], cgjs_divergence(probs, mask).detach())
        grads.append(got["grad"])
    torch.testing.assert_close(torch.cat(grads), ref_logits.grad)


# ---------------------------------------------------------------- the group reaches the sums
def _halves(e=6):
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(2, 10, e, generator=g) * 2, -1)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 0, 1])
    return probs, mask


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, m, group: cgjs_loss(p, m, gamma_b=0.9, gamma_c=0.3, group=group),
        lambda p, m, group: cgjs_divergence(p, m, gamma_b=0.9, gamma_c=0.3, group=group),
        lambda p, m, group: load_balance_loss(p, 2, m, group=group),
        lambda p, m, group: masked_mean(p[..., 0], m, group=group),
        lambda p, m, group: stacked_cgjs_loss(
            torch.stack([p, p.flip(-1) ** 2 / (p.flip(-1) ** 2).sum(-1, keepdim=True)]),
            m,
            gamma_b=0.9,
            gamma_c=0.3,
            group=group,
        ),
        lambda p, m, group: torch.cat(
            [
                t.reshape(-1)
                for t in stacked_routing_moments(torch.stack([p, p.roll(1, -1)]), m, group=group)
            ]
        ),
    ],
    ids=[
        "cgjs_loss",
        "cgjs_divergence",
        "load_balance",
        "masked_mean",
        "stacked_cgjs",
        "stacked_moments",
    ],
)
def test_statistics_are_summed_over_the_callers_group(monkeypatch, fn):
    """Rank 0 holding the first half of a masked batch and rank 1 the second give rank 0 the
    whole batch's value: catches a ``group`` dropped on its way to an all-reduce."""
    probs, mask = _halves()
    whole = fn(probs.reshape(-1, probs.shape[-1]), torch.cat([mask, mask.flip(0)]), group=None)
    got = two_ranks(monkeypatch, fn, (probs[0], mask), (probs[1], mask.flip(0)))
    torch.testing.assert_close(got, whole)


def test_all_reduce_sums_over_a_real_group_and_passes_gradients():
    """``_all_reduce`` on a real (one-rank gloo) process group: the value and a gradient come
    back (an in-place or detached reduction would break the backward pass)."""
    import torch.distributed as dist

    from hmora_ds.losses import _all_reduce
    from tests._dist import free_port

    assert not dist.is_initialized()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        x = torch.tensor([1.5, -2.0, 3.0], requires_grad=True)
        out = _all_reduce(x * 2, dist.group.WORLD)
        assert type(out) is torch.Tensor
        torch.testing.assert_close(out, torch.tensor([3.0, -4.0, 6.0]))
        (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        torch.testing.assert_close(x.grad, torch.tensor([2.0, 4.0, 6.0]))
    finally:
        dist.destroy_process_group()


def test_loss_argument_errors_are_exact():
    with pytest.raises(ValueError) as err:
        cgjs_loss(torch.full((2, 3, 4), 0.25), torch.ones(2, 4))
    assert str(err.value) == "mask: shape (2, 4) must equal probs.shape[:-1] (2, 3)"
    for gb, gc in [(1.5, 0.4), (0.3, 0.4), (1.0, -0.1)]:
        with pytest.raises(ValueError) as err:
            stacked_cgjs_loss(torch.full((1, 3, 4), 0.25), gamma_b=gb, gamma_c=gc)
        assert str(err.value) == (f"cgjs_loss: need 0 <= gamma_c <= gamma_b <= 1, got {gc}, {gb}")


def test_masked_mean_is_fp32_from_low_precision():
    """``masked_mean`` of bf16 values is an fp32 mean (the losses it feeds are fp32)."""
    v = torch.full((1024,), 1.0 + 2**-7, dtype=torch.bfloat16)
    got = masked_mean(v)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(1.0 + 2**-7, abs=1e-7)


def test_losses_stay_on_the_inputs_device():
    """Without a mask the all-valid mask is created on the probabilities' device (``meta``
    stands in for a GPU in CI)."""
    meta = torch.empty(2, 5, 4, device="meta")
    assert cgjs_loss(meta).device.type == "meta"
    assert load_balance_loss(meta, 2).device.type == "meta"

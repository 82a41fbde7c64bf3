"""MoELoRA (hmora_ds/methods/moelora.py): the contrastive loss against hand-computed values (same
expert pulls, other experts push), the token sampling, padding, the gates and the observed expert
outputs of a real forward, the gradient reaching the experts, the one-line refusals, and the
global batch over 2 gloo ranks (data parallel and expert parallel). The registry's invariant
table (tests/test_methods.py) runs MoELoRA through init = base, only adapters train, round trip,
checkpointing, bf16 and the ZeRO-2 step. Tiny random-init Qwen2 models: mechanics only."""

from __future__ import annotations

import math

import pytest
import torch

from hmora_ds.methods.moelora import contrastive_loss, sample_positions
from tests._dist import run_ranks
from tests.conftest import batch, randomize_adapters, tiny_hmora

NO_DROPOUT = {"adapter.dropout": 0.0, "routing.router_dropout": 0.0}
S = 1 / math.sqrt(2)


# ------------------------------------------------------------------ the loss
def _three_rows():
    """a = (1, 0) and b = (1, 1) from expert 0, c = (0, 1) from expert 1 (cosines: a·b = b·c =
    1/√2, a·c = 0)."""
    z = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 3.0]], dtype=torch.float64)
    return z, torch.tensor([0, 0, 1])


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_contrastive_loss_equals_hand_computed_values(tau):
    """Guards against positives and negatives swapped, the anchor counted among its own
    candidates, a denominator without the positives, unnormalised outputs (b and c have norms
    2√2 and 3) and a mean over rows that have no positive (c): by hand, anchor a has positive b
    and candidates {b, c}; anchor b has positive a and candidates {a, c}; c is no anchor."""
    z, e = _three_rows()
    l_a = math.log(math.exp(S / tau) + math.exp(0.0)) - S / tau
    l_b = math.log(math.exp(S / tau) + math.exp(S / tau)) - S / tau  # = log 2
    got = contrastive_loss(z, e, temperature=tau)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor((l_a + l_b) / 2, dtype=torch.float64))
    # c as expert 0 too: three anchors, each with two positives and no negative.
    l_all = contrastive_loss(z, torch.tensor([0, 0, 0]), temperature=tau)
    la = math.log(math.exp(S / tau) + 1) - (S / tau + 0) / 2
    lb = math.log(2 * math.exp(S / tau)) - S / tau
    lc = la
    torch.testing.assert_close(l_all, torch.tensor((la + lb + lc) / 3, dtype=torch.float64))


def _rows(*vectors):
    return torch.tensor(vectors, dtype=torch.float64)


def test_same_expert_pairs_pull_and_different_expert_pairs_push():
    """Guards against a sign error (the loss maximised) and against a loss that only pulls or
    only pushes. Pull: a and b from expert 0, c from expert 1 orthogonal to both, so only
    cos(a, b) changes: the loss falls as b turns towards a, and a descent step raises cos(a, b).
    Push: a = b from expert 0, c from expert 1 at angle φ to both: the loss falls as φ grows,
    and a descent step lowers cos(a, c)."""
    e = torch.tensor([0, 0, 1])
    cos = lambda w, i, j: torch.cosine_similarity(w[i], w[j], dim=0).item()  # noqa: E731

    def pull(t):
        return _rows([1, 0, 0], [math.cos(t), math.sin(t), 0], [0, 0, 1])

    def push(f):
        return _rows([1, 0, 0], [1, 0, 0], [math.cos(f), 0, math.sin(f)])

    loss = lambda z: contrastive_loss(z, e, temperature=0.5).item()  # noqa: E731
    assert loss(pull(0.3)) < loss(pull(1.2))
    assert loss(push(1.4)) < loss(push(0.3))
    for z, (i, j), sign in ((pull(1.0), (0, 1), 1), (push(0.5), (0, 2), -1)):
        z.requires_grad_(True)
        contrastive_loss(z, e, temperature=0.5).backward()
        after = (z - 0.05 * z.grad).detach()
        assert sign * (cos(after, i, j) - cos(z.detach(), i, j)) > 0


def test_padding_rows_change_nothing_and_get_no_gradient():
    """Guards against padding slots (expert −1) acting as anchors, positives or negatives:
    rows appended with expert −1 leave the loss and the real rows' gradients unchanged and
    receive a zero gradient. No anchor at all gives 0 with finite gradients (no NaN)."""
    z, e = _three_rows()
    z = z.requires_grad_(True)
    ref = contrastive_loss(z, e, temperature=0.5)
    (g_ref,) = torch.autograd.grad(ref, z)
    pad = torch.randn(4, 2, dtype=torch.float64).requires_grad_(True)
    got = contrastive_loss(torch.cat([z, pad]), torch.cat([e, torch.full((4,), -1)]),
                           temperature=0.5)  # fmt: skip
    g_z, g_pad = torch.autograd.grad(got, (z, pad))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_z, g_ref)
    assert torch.equal(g_pad, torch.zeros_like(g_pad))
    lonely = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)  # B = 0: zero outputs
    value = contrastive_loss(lonely, torch.tensor([0, 1]), temperature=0.07)
    (g,) = torch.autograd.grad(value, lonely)
    assert value.item() == 0.0 and torch.isfinite(g).all()


def test_sample_positions_equal_hand_computed_ranks():
    """Guards against sampling padding, against the samples moving with the padding side or
    length (one process and two ranks pad differently) and against short rows repeating a
    token: 5 real tokens, m = 2 → ranks ⌊5/4⌋ = 1 and ⌊15/4⌋ = 3; 1 real token → rank 0 and an
    invalid slot."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 0]])
    pos, valid = sample_positions(mask, 2)
    assert pos.tolist() == [[1, 3], [3, 5], [5, 0]]
    assert valid.tolist() == [[True, True], [True, True], [True, False]]


# ------------------------------------------------------------------ the model
def _model(**overrides):
    torch.manual_seed(0)
    model = tiny_hmora("moelora", overrides={**NO_DROPOUT, **overrides})
    randomize_adapters(model)
    return model


def test_gates_are_top2_of_8_renormalised_to_sum_one():
    """Guards against soft routing, a k other than the preset's 2, or a renormalisation other
    than Softmax(TopK(W x)) = p_i / Σ_kept p: each token's gates are the router's two largest
    probabilities divided by their sum, zeros elsewhere."""
    model = _model()
    router = model.routers["layer00_q"]
    x = torch.randn(2, 5, router.token_router.linear.in_features)
    probs = router.token_router(x)
    gates = router(x)
    top = probs.topk(2, dim=-1)
    want = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, True))
    torch.testing.assert_close(gates, want)
    assert ((gates > 0).sum(-1) == 2).all()


def _observe(model, ids, attn, labels, prompt):
    out = model(ids, attn, labels, prompt)
    return out, list(model.routing_context.observations)


def test_observed_outputs_are_each_routed_experts_own_output_at_the_sampled_tokens():
    """Guards against gate-weighted or summed outputs (the loss compares what each expert
    adds), against the wrong tokens or experts labelling a row, and against padding slots
    counted as real: at layer 0's q projection every row is s·(x A_i) B_i of the expert i it is
    labelled with, at the token sample_positions picks; the shortest row's missing slots are
    −1. With cl_every = 2 only layers 0, 2, 4 observe."""
    model = _model(**{"options.cl_every": 2, "options.cl_tokens": 10})
    seen = {}
    block = model.base_model.model.layers[0].self_attn.q_proj
    hook = block.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0].detach()))
    ids, attn, labels, prompt = batch(bsz=3, length=12, seed=3)
    _, obs = _observe(model, ids, attn, labels, prompt)
    hook.remove()
    assert sorted({(o.id.layer, o.id.targets) for o in obs}) == [
        (layer, (t,)) for layer in (0, 2, 4) for t in ("q", "v")
    ]
    rec = next(o for o in obs if o.id.layer == 0 and o.id.targets == ("q",))
    x, r = seen["x"], block.rank
    pos, valid = sample_positions(attn, 10)
    values, experts = rec.probs.view(3, 10, 2, -1), rec.mask.view(3, 10, 2)
    assert (experts[~valid] == -1).all() and (experts[valid] >= 0).all()
    assert valid[:2].all() and valid[2].sum() == 8  # row 2: 8 real tokens, 2 empty slots
    for b in range(3):
        for j in range(10):
            if not valid[b, j]:
                continue
            h = x[b, pos[b, j]]
            for c in range(2):
                i = experts[b, j, c].item()
                a, bb = block.lora_A[i * r : (i + 1) * r], block.lora_B[:, i * r : (i + 1) * r]
                want = (h @ a.t()) @ bb.t() * block.scaling
                torch.testing.assert_close(values[b, j, c], want, rtol=1e-5, atol=1e-6)
    gates = model.routers["layer00_q"](x)
    chosen = gates.topk(2, -1).indices.gather(1, pos.unsqueeze(-1).expand(3, 10, 2))
    assert torch.equal(experts[valid], chosen[valid])


def test_contrastive_gradient_reaches_the_experts_of_the_sites_only():
    """Guards against the observed outputs being detached (L_cl would train nothing) and
    against L_cl taken at layers it should skip: with cl_every = 2 the gradient of L_cl alone is
    non-zero on the A and B of the sites' layers 0, 2, 4 and zero on layer 5, which no site
    reads (layers 1 and 3 feed the later sites' inputs, so they receive one)."""
    model = _model(**{"options.cl_every": 2})
    ids, attn, labels, prompt = batch(seed=2)
    _, obs = _observe(model, ids, attn, labels, prompt)
    loss = model.method.aux_losses(obs, None)["cl"]
    loss.backward()
    for layer in range(6):
        for t in ("q_proj", "v_proj"):
            block = getattr(model.base_model.model.layers[layer].self_attn, t)
            for p in (block.lora_A, block.lora_B):
                norm = 0.0 if p.grad is None else p.grad.norm().item()
                if layer % 2 == 0 or layer == 5:
                    assert (norm > 0) == (layer != 5), (layer, t, norm)


def test_the_objective_weights_the_contrastive_loss_by_cl_weight():
    """Guards against L_cl entering the objective with the balance loss's weight (or not at
    all): aux_weighted = 0.01·L_balance + cl_weight·L_cl."""
    model = _model(**{"options.cl_weight": 0.3})
    ids, attn, labels, prompt = batch(seed=2)
    out = model(ids, attn, labels, prompt)
    k = out.aux_by_kind
    torch.testing.assert_close(out.aux_weighted.detach(), 0.01 * k["token"] + 0.3 * k["cl"])
    assert k["cl"] > 0
    off = _model(**{"options.cl_weight": 0.0})(ids, attn, labels, prompt)
    assert "cl" not in off.aux_by_kind


REFUSALS = [
    ("routing.mode=soft",
     "routing.mode: must be topk (MoELoRA routes each token to its top-k experts) "
     "(method moelora)"),
    ("routing.task_encoder=transformer",
     "routing.task_encoder: must be none: MoELoRA routes tokens only (method moelora)"),
    ("routing.topk_renorm=paper",
     "routing.topk_renorm: must be sum (Softmax(TopK(W x)): the kept probabilities renormalised "
     "to sum 1) (method moelora)"),
    ("adapter.hydra=true", "adapter.hydra: must be false (method moelora)"),
    ("loss.aux=cgjs", "loss.aux: must be blc (or none) (method moelora)"),
    ("options.cl_weight=-1", "options.cl_weight: must be >= 0, got -1.0 (method moelora)"),
    ("options.cl_temperature=0",
     "options.cl_temperature: must be > 0, got 0.0 (method moelora)"),
    ("options.cl_tokens=0", "options.cl_tokens: must be >= 1, got 0 (method moelora)"),
    ("options.cl_every=0", "options.cl_every: must be >= 1, got 0 (method moelora)"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "message"), REFUSALS)
def test_each_refused_setting_is_one_exact_line(override, message):
    """Guards against a setting MoELoRA does not have being accepted (or failing later, deep
    in the model), and against a refusal naming the wrong field or losing its reason."""
    from hmora_ds.config import load_config
    from tests._method_invariants import build

    with pytest.raises(ValueError) as err:
        build(load_config("moelora", [override]))
    assert str(err.value) == message


# ------------------------------------------------------------------ two ranks
def _dp_worker(rank, world, out_dir):
    import torch.distributed as dist

    model = _model().double()
    ids, attn, labels, prompt = batch(bsz=4, seed=7)
    mine = slice(2 * rank, 2 * rank + 2)
    out = model(ids[mine], attn[mine], labels[mine], prompt[mine], aux_group=dist.group.WORLD)
    cl = out.aux_by_kind["cl"]
    (
        model.method.aux_weight("cl")
        * model.method.aux_losses(list(model.routing_context.observations), dist.group.WORLD)["cl"]
    ).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"cl": cl, "grads": grads}, out_dir / f"r{rank}.pt")


@pytest.mark.multirank
def test_two_ranks_give_one_process_contrastive_loss_and_gradient(tmp_path):
    """Guards against per-rank negatives (each rank contrasting only its own tokens), a
    non-differentiable gather (the other ranks' rows would train nothing) and a gradient
    scaled by the world size: 2 gloo ranks with half the batch each (rows of different
    lengths) give the L_cl of one process with the whole batch, and the ranks' gradients,
    averaged as data parallelism does, equal that process's."""
    run_ranks(_dp_worker, 2, tmp_path, tmp_path, timeout=180)
    ref = _model().double()
    ids, attn, labels, prompt = batch(bsz=4, seed=7)
    ref(ids, attn, labels, prompt)
    loss = ref.method.aux_weight("cl") * ref.method.aux_losses(
        list(ref.routing_context.observations), None)["cl"]  # fmt: skip
    loss.backward()
    got = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    for g in got:
        torch.testing.assert_close(g["cl"], loss.detach() / ref.method.aux_weight("cl"))
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(got[0]["grads"]) == set(want)
    for n, w in want.items():
        mean = (got[0]["grads"][n] + got[1]["grads"][n]) / 2
        torch.testing.assert_close(mean, w, rtol=1e-7, atol=1e-10, msg=n)


def _ep_worker(rank, world, out_dir):
    from tests._dist import ep_rank_forward, save_ep_rank

    model = _model().double()
    blocks, out = ep_rank_forward(model, world, rank)
    assert blocks == 6 * 2
    save_ep_rank(model, out, rank, out_dir, keys=("loss", "cl"))


@pytest.mark.multirank
def test_expert_parallel_equals_replicated(ep_runs):
    """Guards against the per-expert outputs of L_cl (computed through the block's own
    dispatcher) going wrong when experts live on other ranks: with EP = 2 each rank's loss
    (L_cl included) and the gradients equal the replicated model's on that rank's rows. The
    EP run is one of the shared spawn's (tests._dist.EP_CASES)."""
    from tests._dist import check_ep_equals_replicated

    check_ep_equals_replicated(_model().double(), ep_runs / "test_moelora", 4, keys=("loss", "cl"))

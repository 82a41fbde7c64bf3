"""HiMoLE (hmora_ds/methods/himole.py): the hierarchical gates (eq. 4) and the diversity loss
(eq. 7) against hand-computed values, the same equations as a real forward wires them
(tests/test_wiring.py's rule), prompt-only sentence pooling in training and generation, the
method's one-line refusals, and expert parallelism (2 gloo ranks). The registry's invariant
table (tests/test_methods.py) runs HiMoLE through init = base, only adapters train, round
trip, checkpointing and the ZeRO-2 step; tests/test_golden.py pins its outputs.
Tiny random-init Qwen2 models: mechanics only."""

from __future__ import annotations

import math

import pytest
import torch

from hmora_ds.losses import load_balance_loss
from hmora_ds.methods.himole import diversity_loss, group_cosines, hierarchical_gates
from tests.conftest import batch, randomize_adapters, tiny_hmora

NO_DROPOUT = {"adapter.dropout": 0.0, "routing.router_dropout": 0.0}


# ------------------------------------------------------------------ the equations
def test_hierarchical_gates_equal_hand_computed_values():
    """Guards against broadcasting the group scores to the wrong experts (group j % N instead
    of j // M), against a softmax before the product (eq. 2 gives logits) and against a
    renormalisation other than the kept gates' sum: N = 2 groups × M = 2 experts, top-2."""
    sen = torch.tensor([[1.0, -0.5]])  # (B=1, N=2)
    tok = torch.tensor([[[0.2, 1.0, -0.3, 0.4]]])  # (B=1, T=1, N·M=4)
    # By hand: expert j is in group j // 2, so the products are [0.2, 1.0, 0.15, -0.2]; the
    # two largest are experts 1 and 0, renormalised: e^1 / (e^1 + e^0.2), e^0.2 / (…).
    den = math.exp(1.0) + math.exp(0.2)
    want = torch.tensor([[[math.exp(0.2) / den, math.exp(1.0) / den, 0.0, 0.0]]])
    got = hierarchical_gates(sen, tok, experts_per_group=2, top_k=2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    # Group j % N would multiply by [1, −0.5, 1, −0.5]: products [0.2, −0.5, −0.3, −0.2].
    # Random inputs: exactly k non-zero gates per token, summing to 1.
    gen = torch.Generator().manual_seed(0)
    g = hierarchical_gates(torch.randn(3, 4, generator=gen), torch.randn(3, 5, 12, generator=gen),
                           experts_per_group=3, top_k=2)  # fmt: skip
    assert g.shape == (3, 5, 12) and ((g > 0).sum(-1) == 2).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"token_logits: shape \(3, 5, 12\) must be"):
        hierarchical_gates(torch.randn(3, 4), torch.randn(3, 5, 12), experts_per_group=2, top_k=2)


def test_diversity_loss_equals_hand_computed_cosines():
    """Guards against averaging over the wrong pairs (n = n' included, or ordered pairs
    counted with the wrong denominator), against padding tokens in the mean, and against the
    NaN gradient of ‖e‖ at a group with no kept expert (a zero output, common with top-2)."""
    e = torch.tensor(
        [  # (N=3, B=1, T=2, D=2)
            [[[1.0, 0.0], [1.0, 0.0]]],
            [[[0.0, 1.0], [-1.0, 0.0]]],
            [[[1.0, 1.0], [0.0, 0.0]]],
        ],
        requires_grad=True,
    )
    # Token 0: cos = 0, 1/√2, 1/√2 → mean √2/3. Token 1: cos = −1, 0, 0 → mean −1/3.
    t0, t1 = math.sqrt(2) / 3, -1 / 3
    torch.testing.assert_close(group_cosines(e), torch.tensor([[t0, t1]]))
    torch.testing.assert_close(diversity_loss(e), torch.tensor((t0 + t1) / 2))
    loss = diversity_loss(e, torch.tensor([[1, 0]]))  # token 1 is padding
    torch.testing.assert_close(loss, torch.tensor(t0))
    loss.backward()
    assert torch.isfinite(e.grad).all() and e.grad[:, 0, 1].abs().sum() == 0
    with pytest.raises(ValueError, match=r"needs N >= 2 groups"):
        diversity_loss(torch.ones(1, 1, 2, 3))


# ------------------------------------------------------------------ the wiring
def _capture(model, key):
    """The router group's input x, sentence/token logits and gates in the next forward."""
    group, seen = model.routers[key], {}
    group.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach()))
    for name in ("sentence_router", "token_router"):
        getattr(group, name).linear.register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out.detach())
        )
    group.register_forward_hook(lambda _m, _i, out: seen.__setitem__("gates", out.detach()))
    return seen


def test_model_gates_pool_prompt_tokens_and_follow_eq4():
    """Guards against the sentence router reading anything but the site input's mean over
    the prompt's real tokens (targets leaking into routing, padding in the mean, another
    hidden state), and against the model's gates differing from hierarchical_gates of its
    own routers' logits. With the paper's whole-sequence mean (sentence_pool=sequence),
    changing only the target tokens changes the sentence scores: the leak the default
    avoids."""
    model = tiny_hmora("himole", overrides=NO_DROPOUT).eval()
    randomize_adapters(model)
    ids, attn, labels, prompt = batch()  # rows 1 and 2 padded at the end
    seen = _capture(model, "layer03_down")
    with torch.no_grad():
        model(ids, attn, labels, prompt)
    x, sen, tok = seen["x"], seen["sentence_router"], seen["token_router"]
    group = model.routers["layer03_down"]
    w = (prompt * attn).float()
    h_sen = (x * w[..., None]).sum(1) / w.sum(1, keepdim=True)  # by hand
    torch.testing.assert_close(sen, group.sentence_router.linear(h_sen), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["gates"], hierarchical_gates(sen, tok, experts_per_group=4,
                                                                 top_k=2))  # fmt: skip
    changed = ids.clone()
    changed[labels != -100] = 7  # the targets only
    for pool, leaks in (("prompt", False), ("sequence", True)):
        model = tiny_hmora("himole", overrides={**NO_DROPOUT, "options.sentence_pool": pool})
        seen = _capture(model.eval(), "layer03_down")
        with torch.no_grad():
            model(ids, attn, labels, prompt)
            before = seen["sentence_router"]
            model(changed, attn, labels, prompt)
        moved = (before - seen["sentence_router"]).abs().max().item()
        assert moved > 1e-4 if leaks else moved == 0.0, pool


def test_model_aux_losses_equal_recomputation_from_its_experts():
    """Guards against L_balance over the wrong probabilities or over padding, against L_div
    from the wrong gates, groups or layer (the down projection of every div_every-th layer),
    and against exchanging α and β: both recomputed by hand from a real forward's records,
    the down bank's own input, weights and gates (an explicit loop over the experts)."""
    overrides = {**NO_DROPOUT, "options.div_every": 3, "options.div_weight": 0.05}
    model = tiny_hmora("himole", overrides=overrides).eval()
    randomize_adapters(model)
    ids, attn, labels, prompt = batch()
    seen = {layer: _capture(model, f"layer{layer:02d}_down") for layer in (0, 3)}
    with torch.no_grad():
        out = model(ids, attn, labels, prompt)
    token = [r for r in out.routing_records if r.kind == "token"]
    assert len(token) == 6 * 2 and {r.probs.shape for r in token} == {(3, 12, 16)}
    want_balance = sum(load_balance_loss(r.probs, 2, attn) for r in token)
    layers = model.base_model.model.layers
    e = []
    for layer in (0, 3):
        bank, gates = layers[layer].mlp.down_proj, seen[layer]["gates"]
        x = seen[layer]["x"]
        parts = torch.zeros(4, *x.shape[:-1], bank.out_features)
        for j in range(16):
            a, b = bank.lora_A[8 * j : 8 * j + 8], bank.lora_B[:, 8 * j : 8 * j + 8]
            parts[j // 4] += gates[..., j : j + 1] * bank.scaling * (x @ a.T @ b.T)
        e.append(parts)
    want_div = (diversity_loss(e[0], attn) + diversity_loss(e[1], attn)) / 2
    assert out.aux_by_kind.keys() == {"token", "div"}
    torch.testing.assert_close(out.aux_by_kind["token"], want_balance, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux_by_kind["div"], want_div, rtol=1e-5, atol=1e-6)
    assert abs(want_div) > 1e-4
    torch.testing.assert_close(out.aux_weighted, 0.01 * want_balance + 0.05 * want_div)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * want_balance + 0.05 * want_div)


def test_generation_routes_every_step_by_the_prompt():
    """Guards against a decoding step pooling its own new token (or failing) instead of using
    the prompt's sentence representation: greedy generation with the KV cache equals
    teacher-forced full forwards whose prompt mask is the original prompt (left padding)."""
    model = tiny_hmora("himole", overrides={"options.div_every": 1})
    randomize_adapters(model, scale=0.5)
    model.eval()
    ids, attn, _, _ = batch(bsz=3, length=9, left_pad=True, seed=5)
    new = 5
    gen = model.generate(ids, attention_mask=attn, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0)  # fmt: skip
    with torch.no_grad():
        for step in range(new):
            t = 9 + step
            mask = torch.cat([attn, torch.ones(3, step, dtype=attn.dtype)], 1)
            prompt = torch.cat([attn, torch.zeros(3, step, dtype=attn.dtype)], 1)
            logits = model(gen[:, :t], mask, prompt_mask=prompt).logits[:, -1]
            logits[:, 2] = float("-inf")  # eos suppressed, as min_new_tokens does
            chosen = logits.gather(1, gen[:, t : t + 1]).squeeze(1)
            assert (logits.max(-1).values - chosen <= 1e-4).all(), step


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"adapter.num_experts": 8},
         r"^adapter\.num_experts: must equal options\.groups × options\.experts_per_group = 16 "
         r"\(got 8\); set adapter\.num_experts=16 \(method himole\)$"),
        ({"routing.mode": "soft"}, r"^routing\.mode: must be topk"),
        ({"routing.topk_renorm": "paper"}, r"^routing\.topk_renorm: must be sum"),
        ({"adapter.targets": ["gate", "up"]},
         r"^options\.div_weight: needs 'down' among the routed adapter\.targets"),
        ({"options.cluster_candidates": [2, 5]},
         r"^options\.cluster_candidates: each N must be >= 2 with N × options\.experts_per_group"
         r" <= options\.max_experts \(16\)"),
        ({"options.stage1_fraction": 1.0}, r"^options\.stage1_fraction: must lie in \[0, 1\)"),
        ({"routing.top_k": 5},
         r"^routing\.top_k: must be <= options\.experts_per_group \(4\): stage 1 routes each "
         r"sequence among its group's experts only; lower it or set options\.stage1_fraction=0"),
        ({"options.sentence_pool": "mean"}, r"^options\.sentence_pool: "),
        ({"options.groupz": 3}, r"^options\.groupz: unknown for method himole; valid: "),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(overrides, message):
    """Guards against a wrong HiMoLE setting being accepted (or failing later, deep in the
    model): each is one line naming the dotted field and what to do."""
    from hmora_ds.config import load_config
    from tests._method_invariants import build

    with pytest.raises(ValueError, match=message) as err:
        build(load_config("himole", overrides))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ expert parallelism
def _ep_model():
    torch.manual_seed(0)
    model = tiny_hmora("himole", overrides={**NO_DROPOUT, "options.div_every": 2})
    randomize_adapters(model)
    return model.double()


def _ep_worker(rank, world, out_dir):
    from tests._dist import ep_rank_forward, save_ep_rank

    model = _ep_model()
    blocks, out = ep_rank_forward(model, world, rank)
    assert blocks == 3 * 6
    save_ep_rank(model, out, rank, out_dir, keys=("loss", "div"))


@pytest.mark.multirank
def test_expert_parallel_equals_replicated(ep_runs):
    """Guards against the per-group outputs of L_div (computed through the block's own
    dispatcher) or the hierarchical gates going wrong when experts live on other ranks: with
    EP = 2 each rank's loss (L_div included) and the gradients equal the replicated model's.
    The EP run is one of the shared spawn's (tests._dist.EP_CASES)."""
    from tests._dist import check_ep_equals_replicated

    check_ep_equals_replicated(_ep_model(), ep_runs / "test_himole", 8, keys=("loss", "div"))


# ------------------------------------------------------------------ ZeRO-2/3 through the launcher
@pytest.mark.slow
@pytest.mark.multirank
def test_two_stage_zero2_and_zero3_two_ranks_equal_one_process(tiny_run_inputs, tmp_path):
    """Guards against a per-rank L_balance or L_div (each rank's own tokens instead of the
    global batch), against the sentence router's pooling breaking under ZeRO-3's partitioned
    parameters, and against the two stages differing between layouts (a clustering or a
    cluster label per rank, a stage-1 sentence router that ZeRO-3 cannot leave unused): the
    two-stage ``himole`` preset (2 stage-1 steps, 2 stage-2 steps) on 2 ranks (ZeRO-2 and
    ZeRO-3, micro-batch 1) trains the same losses and adapter as one process (micro-batch 2),
    through the real launcher, with L_div on every layer. The losses agree to 1e-5; the
    adapters to 2e-4 (lr = 1e-3): micro-batches of 1 and 2 round the router's GEMMs
    differently, and a top-k near-tie that flips gives one expert a token in one run only,
    which Adam turns into a step of up to ~lr (seen: one expert, 9e-5)."""
    from safetensors.torch import load_file

    from tests._train_helpers import NO_DROPOUT, launch, overrides, summary

    extra = [
        *NO_DROPOUT, "preset=himole", "method.options.div_every=1",
        "train.grad_accum=2", "train.max_steps=4", "eval.every=2", "checkpoint.every=2",
    ]  # fmt: skip
    single, zero2, zero3 = tmp_path / "single", tmp_path / "zero2", tmp_path / "zero3"
    launch("python", "zero2.json",
           overrides(tiny_run_inputs, single, *extra, "train.micro_batch_size=2"))  # fmt: skip
    launch("torchrun", "zero2.json",
           overrides(tiny_run_inputs, zero2, *extra, "train.micro_batch_size=1"))  # fmt: skip
    launch("torchrun", "zero3.json",
           overrides(tiny_run_inputs, zero3, *extra, "train.micro_batch_size=1"))  # fmt: skip
    want = summary(single)
    assert want["clustering"]["stage1_steps"] == 2 and len(want["history"]) == 4
    a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    assert any("sentence_router" in n for n in a)
    for run, stage in ((zero2, 2), (zero3, 3)):
        got = summary(run)
        assert got["zero_stage"] == stage and got["world_size"] == 2
        assert got["clustering"] == want["clustering"]
        torch.testing.assert_close(torch.tensor([h["loss"] for h in got["history"]]),
                                   torch.tensor([h["loss"] for h in want["history"]]),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-4, msg=name)


def test_run_config_takes_method_options():
    """Guards against the run config's ``method.options.<key>`` overrides being refused as
    unknown keys (options are free-form until the method checks them), and against an
    unknown option getting past the method's check that way."""
    from hmora_ds.train.config import load_run_config

    run = load_run_config(None, ["preset=himole", "method.options.div_every=3"])
    assert run.hmora_config().options["div_every"] == 3
    with pytest.raises(ValueError, match=r"^options\.nope: unknown for method himole"):
        load_run_config(None, ["preset=himole", "method.options.nope=3"]).hmora_config()


def test_without_a_diversity_weight_no_diversity_is_computed_and_no_alpha_exists():
    """β = 0 switches L_div off entirely (no ``div`` term, no per-group outputs computed),
    and HiMoLE's routers carry no HMoRA α parameter: its trainable tensors are LoRA A / B and
    the token and sentence routers only. Guards against L_div sites built at β = 0 (wasted
    expert passes) and a learnable α switched on in its router groups."""
    model = tiny_hmora("himole", overrides={**NO_DROPOUT, "options.div_weight": 0.0})
    out = model(*batch())
    assert set(out.aux_by_kind) == {"token"}
    on = tiny_hmora("himole", overrides={**NO_DROPOUT, "options.div_every": 1})
    assert "div" in on(*batch()).aux_by_kind
    components = {on.method.component_of(n) for n, p in on.named_parameters() if p.requires_grad}
    assert components == {"lora A", "lora B", "token routers", "sentence routers"}


# ---------------------------------------------------------------- the router on its own
def _router(diversity=True):
    from hmora_ds.methods.himole import HierarchicalRouter
    from hmora_ds.routing.context import RoutingContext

    torch.manual_seed(0)
    return HierarchicalRouter(1, ("gate", "up"), 8, 2, 3, 2, 0.0, RoutingContext(), diversity)


def test_the_router_is_a_top_k_sum_router_with_a_div_id():
    """KeepTopK with the kept gates summing to 1 (eq. 4), sparse-dispatchable, no task router;
    the L_div observations carry the site's own id."""
    from hmora_ds.routing.context import RouterId

    r = _router()
    assert (r.mode, r.top_k, r.topk_renorm, r.sparse_gates) == ("topk", 2, "sum", True)
    assert r.task_router is None and r.num_experts == 6 and r.groups == 2
    assert r.div_id == RouterId(1, ("gate", "up"), "div")
    model = tiny_hmora("himole")
    for name, module in model.adapted_modules().items():
        router = module.router
        assert router.div_id == RouterId(router.layer, router.targets, "div"), name


def test_sentence_representation_errors_are_exact_lines():
    r = _router()
    ctx = r._ctx
    ctx.cached_tokens = 1  # a decoding step before any prompt forward
    with pytest.raises(RuntimeError) as err:
        r.sentence_repr(torch.zeros(2, 1, 8))
    assert str(err.value) == (
        "HiMoLE router layer01.gate_up: a decoding step without the prompt's sentence "
        "representation; generate through the wrapper model (its forward/generate)"
    )
    ctx.cached_tokens = 0
    with ctx.forward_scope(torch.full((2, 4), 0.25), None, record=True):
        with pytest.raises(RuntimeError) as err:
            r.sentence_repr(torch.zeros(2, 5, 8))
        assert str(err.value) == (
            "HiMoLE router layer01.gate_up: pooling weights for 4 tokens, input of 5"
        )
        r.sentence_repr(torch.zeros(2, 4, 8))
    ctx.cached_tokens = 4
    with ctx.forward_scope(None, None, record=False), pytest.raises(RuntimeError) as err:
        r.sentence_repr(torch.zeros(3, 1, 8))
    assert str(err.value) == (
        "routing context: input batch 3 does not match HiMoLE router layer01.gate_up's "
        "sentence rows of 2"
    )


def test_bf16_inputs_route_in_fp32():
    """A bf16 model's hidden states pooled with fp32 weights, the stage-1 softmax and the
    group cosines: probabilities and cosines come out fp32 (the losses' precision)."""
    r = _router().to(torch.bfloat16)
    x = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    with r._ctx.forward_scope(torch.full((2, 4), 0.25), None, record=True):
        h = r.sentence_repr(x)
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h, x.float().mean(1).to(torch.bfloat16))
    probs = r.stage1_probs(x, torch.tensor([1, 0]))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs[0, :, 3:].sum(-1), torch.ones(4))
    assert (probs[0, :, :3] == 0).all() and (probs[1, :, 3:] == 0).all()
    cos = group_cosines(torch.randn(2, 2, 4, 8, dtype=torch.bfloat16))
    assert cos.dtype == torch.float32


def test_router_tensors_stay_on_the_inputs_device():
    """On ``meta`` (standing in for a GPU in CI) the masks and stage-1 probabilities are
    created on the input's device, in the asked dtype."""
    meta = torch.device("meta")
    r = _router().to(meta)
    masks = r.group_masks(torch.float64, meta)
    assert masks.device == meta and masks.dtype == torch.float64 and masks.shape == (2, 6)
    assert r.group_masks(torch.float32, torch.device("cpu")).tolist() == [
        [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1],
    ]  # fmt: skip
    probs = r.stage1_probs(torch.empty(2, 4, 8, device=meta), torch.ones(2, device=meta))
    assert probs.device == meta and probs.dtype == torch.float32
    seen = []
    with r._ctx.forward_scope(None, None, record=True):
        r._ctx.observe = lambda rid, values, mask, slot=None: seen.append(values)
        r.observe_update(
            torch.empty(2, 4, 8, device=meta), torch.empty(2, 4, 6, device=meta),
            lambda g: g.sum(-1, keepdim=True),
        )  # fmt: skip
    assert seen and seen[0].device == meta


def test_pooling_weights_are_one_over_the_pooled_count():
    """h_sen weights: 1/count on the prompt's real tokens (one token: weight 1), 0 elsewhere."""
    from hmora_ds.config import load_config
    from hmora_ds.methods import build_method
    from hmora_ds.methods.base import RoutingBatch

    method = build_method(load_config("himole"))
    attn = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    prompt = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    w = method.routing_inputs(None, RoutingBatch(torch.zeros(3, 4, 2), attn, prompt))
    assert w.tolist() == [[0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_diversity_loss_is_a_mean_over_the_callers_group(monkeypatch):
    from tests._dist import two_ranks

    torch.manual_seed(0)
    e = torch.randn(3, 4, 5, 6)
    mask = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    got = two_ranks(monkeypatch, diversity_loss, (e[:, :2], mask[:2]), (e[:, 2:], mask[2:]))
    torch.testing.assert_close(got, diversity_loss(e, mask))


def test_aux_losses_are_global_over_the_callers_group(monkeypatch):
    """HiMoLE's L_balance (per router, summed) and L_div (the sites' mean cosine, averaged
    over real tokens) on a simulated second rank equal the whole batch's values."""
    from hmora_ds.config import load_config
    from hmora_ds.losses import masked_mean
    from hmora_ds.methods import build_method
    from hmora_ds.routing.context import RouterId, RoutingRecord
    from tests._dist import two_ranks

    method = build_method(load_config("himole", ["routing.top_k=2"]))
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 1, 1]])

    def records(rows):
        out = []
        for layer in range(2):
            probs = torch.softmax(torch.randn(4, 3, 16, generator=g), -1)
            cos = torch.rand(4, 3, generator=g)
            out += [
                RoutingRecord(RouterId(layer, ("gate", "up"), "token"), probs, mask),
                RoutingRecord(RouterId(layer, ("down",), "div"), cos, mask),
            ]
        return [RoutingRecord(r.id, r.probs[rows], r.mask[rows]) for r in out], out

    mine, whole = records(slice(0, 2))
    other = [RoutingRecord(r.id, r.probs[2:], r.mask[2:]) for r in whole]
    got = two_ranks(monkeypatch, lambda recs, group: method.aux_losses(recs, group),
                    (mine,), (other,))  # fmt: skip
    token = sum(load_balance_loss(r.probs, 2, r.mask) for r in whole if r.id.kind == "token")
    div = masked_mean(torch.stack([r.probs for r in whole if r.id.kind == "div"]).mean(0), mask)
    assert sorted(got) == ["div", "token"]
    torch.testing.assert_close(got["token"], token)
    torch.testing.assert_close(got["div"], div)


def test_sparse_and_dense_compute_agree_with_the_diversity_loss_on():
    """``adapter.compute=sparse`` (each token's kept experts only, the group outputs of L_div
    through the same dispatcher) gives the dense path's loss, L_div and gradients. Guards
    against the per-group updates computed without the token layout the sparse plan needs."""
    runs = {}
    for compute in ("dense", "sparse"):
        model = tiny_hmora("himole", overrides=[f"adapter.compute={compute}",
                                                "adapter.dropout=0.0",
                                                "routing.router_dropout=0.0"])  # fmt: skip
        randomize_adapters(model)
        ids, attn, labels, prompt = batch()
        out = model(input_ids=ids, attention_mask=attn, labels=labels, prompt_mask=prompt)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        runs[compute] = (out.loss.detach(), out.aux_by_kind["div"].detach(), grads)
    (loss, div, grads), (loss_s, div_s, grads_s) = runs["dense"], runs["sparse"]
    torch.testing.assert_close(loss_s, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(div_s, div, rtol=1e-5, atol=1e-6)
    assert grads_s.keys() == grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(grads_s[n], g, rtol=1e-4, atol=1e-6, msg=n)

"""α(l), layer modes, top-k renormalisations, router sharing and the task encoder."""

import math

import pytest
import torch

from hmora_ds.routing import layer_alphas, layer_modes, topk_gates
from hmora_ds.routing.task_encoder import TaskEncoder
from tests.conftest import batch, randomize_adapters, tiny_hmora


@pytest.mark.parametrize(
    ("eps", "mu", "row"),
    [  # Paper table 5 (its "L = 5" means layers l = 0 … 5, i.e. six layers).
        (2, 0, [0.12, 0.23, 0.40, 0.60, 0.77, 0.88]),
        (-2, 0, [0.88, 0.77, 0.60, 0.40, 0.23, 0.12]),
        (10, 0, [0, 0, 0.12, 0.88, 1, 1]),
        (10, 4, [0, 0.12, 0.88, 1, 1, 1]),
        (0, 0, [0.5] * 6),
    ],
)
def test_layer_alphas_reproduce_paper_table5(eps, mu, row):
    assert [round(a, 2) for a in layer_alphas(6, eps, mu)] == row


def test_layer_alphas_span_and_modes_on_qwen2_depth():
    alphas = layer_alphas(28, 4, -2)
    assert alphas[0] == pytest.approx(1 / (1 + math.exp(6)))
    assert alphas[-1] == pytest.approx(1 / (1 + math.exp(-2)))
    modes = layer_modes(28, 4, -2, 0.2, 0.8)
    # α < 0.2 ⇔ l < 15.57; α > 0.8 ⇔ l > 24.93 (hand-solved from eq. 8).
    assert modes == ["token"] * 16 + ["hybrid"] * 9 + ["task"] * 3


def test_topk_both_renormalisations_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    paper = topk_gates(p, 2, "paper")
    s = 1 / (1 + math.exp(-0.2))  # softmax([0.5, 0.3]) = [σ(0.2), σ(−0.2)]
    torch.testing.assert_close(paper, torch.tensor([[s, 1 - s, 0.0, 0.0]]))
    torch.testing.assert_close(topk_gates(p, 2, "sum"), torch.tensor([[0.625, 0.375, 0, 0]]))
    # k = E keeps every entry; the sum runs in sorted order, so equal up to rounding.
    torch.testing.assert_close(topk_gates(p, 4, "sum"), p / p.sum(), rtol=1e-6, atol=0.0)
    with pytest.raises(ValueError, match=r"routing\.topk_renorm"):
        topk_gates(p, 2, "l1")


def _router_calls(model):
    calls = {}
    for key, group in model.routers.items():
        if group.token_router is not None:
            group.token_router.register_forward_hook(
                lambda m, i, o, key=key: calls.__setitem__(key, calls.get(key, 0) + 1)
            )
    return calls


def test_shared_routers_are_computed_once_per_layer_and_forward():
    model = tiny_hmora("hmora_lw")
    keys = sorted(model.routers)
    assert keys[:2] == ["layer00_gate_up", "layer00_q_k_v"]
    # q, k, v of a layer hold one and the same router object.
    mods = model.adapted_modules()
    layer0 = {n.split(".")[-1]: m for n, m in mods.items() if ".layers.0." in n}
    assert layer0["q_proj"].router is layer0["k_proj"].router is layer0["v_proj"].router
    assert layer0["gate_proj"].router is layer0["up_proj"].router
    assert layer0["o_proj"].router is None and layer0["down_proj"].router is None
    calls = _router_calls(model)
    ids, attn, labels, prompt = batch()
    out = model(ids, attn, labels, prompt)
    assert calls and set(calls.values()) == {1}
    # One record per router and forward: no double counting for the shared members.
    assert sorted(out.router_stats) == sorted(set(out.router_stats))
    assert "layer00.q_k_v.token" in out.router_stats
    model(ids, attn, labels, prompt)
    assert set(calls.values()) == {2}


def test_unshared_routers_one_per_target():
    model = tiny_hmora("hmora")
    assert len([k for k in model.routers if k.startswith("layer00_")]) == 7


def _alone_and_batched(encoder, left_pad):
    ids, attn, _, prompt = batch(bsz=3, length=14, left_pad=left_pad, seed=3)
    emb = torch.nn.Embedding(300, 64)
    with torch.no_grad():
        together = encoder(emb(ids), prompt)
        alone = []
        for i in range(3):
            keep = attn[i].bool()
            alone.append(encoder(emb(ids[i : i + 1, keep]), prompt[i : i + 1, keep]))
    return together, torch.cat(alone)


@pytest.mark.parametrize("kind", ["transformer", "mean_pool"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_task_representation_is_padding_invariant(kind, left_pad):
    torch.manual_seed(0)
    enc = TaskEncoder(64, kind=kind, num_heads=16, position_scale=1.0).eval()
    together, alone = _alone_and_batched(enc, left_pad)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_task_representation_ignores_targets_and_sees_prompt():
    model = tiny_hmora("hmora").eval()
    ids, attn, labels, prompt = batch(seed=4)
    base = model.task_representation(ids, attn, prompt)
    changed = ids.clone()
    target = labels != -100
    changed[target] = (changed[target] + 7) % 290 + 3
    torch.testing.assert_close(model.task_representation(changed, attn, prompt), base)
    # ...and the same holds through the full forward's routing (task-router records).
    out_a = model(ids, attn, labels, prompt)
    out_b = model(changed, attn, torch.where(target, changed, -100), prompt)
    for name, stats in out_a.router_stats.items():
        if name.endswith(".task"):
            torch.testing.assert_close(stats["load"], out_b.router_stats[name]["load"])
    changed_prompt = ids.clone()
    changed_prompt[0, 0] = (changed_prompt[0, 0] + 1) % 290 + 3
    assert not torch.allclose(model.task_representation(changed_prompt, attn, prompt)[0], base[0])


def test_positions_are_scaled_to_the_embeddings():
    model = tiny_hmora("hmora")
    weight = model.base_model.get_input_embeddings().weight
    rms = weight.pow(2).mean().sqrt()
    enc = model.task_encoder
    assert enc.position_scale.item() == pytest.approx(rms.item() * math.sqrt(2), rel=1e-5)
    torch.testing.assert_close(enc.task_embedding.detach(), weight[63].detach())


def _encoder_layer_input(enc: TaskEncoder, embeds, mask):
    """What the transformer layers of ``enc`` receive (B, T+1, D)."""
    seen = []
    encode = enc.encode
    enc.encode = lambda x, *args: encode(*seen.append(x) or (x, *args))
    with torch.no_grad():
        enc(embeds, mask)
    del enc.encode
    return seen[0]


@pytest.mark.parametrize("slot_position", [False, True])
def test_e_task_slot_gets_a_position_only_with_task_slot_position(slot_position):
    """Input of the encoder, by hand: prompt token j = embedding + scale·sin/cos(j); the e_task
    slot right after a prompt of length L = e_task (default, the official code) or
    e_task + scale·sin/cos(L) (the earlier behaviour, which writes the length into H_task)."""
    from hmora_ds.routing.task_encoder import sinusoid_positions

    torch.manual_seed(0)
    d, scale = 64, 0.03
    enc = TaskEncoder(64, num_heads=16, position_scale=scale, slot_position=slot_position).eval()
    with torch.no_grad():
        enc.task_embedding.normal_(0, 0.02)
    prompt = torch.zeros(3, 14, dtype=torch.long)
    for i, (start, n) in enumerate(((0, 3), (2, 6), (4, 9))):  # e.g. a wrapper, then the prompt
        prompt[i, start : start + n] = 1
    embeds = torch.randn(3, 14, d) * 0.02
    x = _encoder_layer_input(enc, embeds, prompt)
    table = sinusoid_positions(15, d, torch.device("cpu")) * scale * math.sqrt(2)
    for i in range(3):
        pos = prompt[i].bool()
        n = int(pos.sum())
        torch.testing.assert_close(x[i, :n], embeds[i, pos] + table[:n])
        want_slot = enc.task_embedding + (table[n] if slot_position else 0.0)
        torch.testing.assert_close(x[i, n], want_slot.detach())
    # Rows of different lengths see the same slot input only without the slot position.
    lengths = prompt.sum(1)
    assert len(set(lengths.tolist())) == 3
    slots = torch.stack([x[i, int(lengths[i])] for i in range(3)])
    assert torch.allclose(slots[0], slots[1]) != slot_position


def test_task_slot_position_is_a_config_option_and_off_by_default():
    assert tiny_hmora("hmora").task_encoder.slot_position is False
    model = tiny_hmora("hmora", overrides=["routing.task_slot_position=true"])
    assert model.task_encoder.slot_position is True
    for bad, field in (
        ("routing.task_slot_position=2", "routing.task_slot_position"),
        ("routing.task_input=system", "routing.task_input"),
    ):
        with pytest.raises(ValueError, match=f"^{field}: must"):
            tiny_hmora("hmora", overrides=[bad])


def _two_system_prompts():
    """The same instructions wrapped by two ChatML templates with different system prompts."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "data"))
    from hmora_data_fixtures import CHATML, tiny_chat_tokenizer

    from hmora_ds.data import ChatEncoder, DataCollator

    batches = []
    for system in ("You are terse.", "You are a very helpful assistant, answer in detail."):
        tok = tiny_chat_tokenizer()
        tok.chat_template = "<|im_start|>system\n" + system + "<|im_end|>\n" + CHATML
        enc = ChatEncoder(tok)
        feats = [enc.encode_generation_prompt(s) for s in ("Add 2 and 3.", "Name a colour!")]
        batches.append(DataCollator.from_tokenizer(tok, padding_side="left")(feats))
    return batches


def test_instruction_input_ignores_the_system_prompt():
    """routing.task_input=instruction: same instruction under two system prompts → the same
    H_task (task_representation, forward and generate alike); the whole prompt differs."""
    a, b = _two_system_prompts()
    assert a["input_ids"].shape != b["input_ids"].shape  # the wrappers differ in length
    keys = ("attention_mask", "prompt_mask", "instruction_mask")
    model = tiny_hmora("hmora").eval()
    h_a = model.task_representation(a["input_ids"], **{k: a[k] for k in keys})
    h_b = model.task_representation(b["input_ids"], **{k: b[k] for k in keys})
    torch.testing.assert_close(h_a, h_b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(h_a[0], h_a[1], atol=1e-3)  # the instructions still differ

    # forward and generate bind the same H_task (read from the routing context).
    bound = []
    ctx = model.routing_context
    original = ctx.forward_scope

    def spy(task_repr, *args, **kwargs):
        bound.append(task_repr)
        return original(task_repr, *args, **kwargs)

    ctx.forward_scope = spy
    with torch.no_grad():
        model(a["input_ids"], **{k: a[k] for k in keys})
        model.generate(b["input_ids"], **{k: b[k] for k in keys}, max_new_tokens=2,
                       do_sample=False, pad_token_id=0)  # fmt: skip
    del ctx.forward_scope
    torch.testing.assert_close(bound[0], h_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bound[1], h_a, atol=1e-5, rtol=1e-5)

    prompt_model = tiny_hmora("hmora", overrides=["routing.task_input=prompt"]).eval()
    p_a = prompt_model.task_representation(a["input_ids"], **{k: a[k] for k in keys})
    p_b = prompt_model.task_representation(b["input_ids"], **{k: b[k] for k in keys})
    assert not torch.allclose(p_a, p_b, atol=1e-3)


def test_missing_instruction_mask_falls_back_to_the_prompt_once(caplog):
    a, _ = _two_system_prompts()
    model = tiny_hmora("hmora").eval()
    ids, attn, pmask = a["input_ids"], a["attention_mask"], a["prompt_mask"]
    with caplog.at_level("WARNING", logger="hmora_ds.model"):
        h1 = model.task_representation(ids, attn, pmask)
        h2 = model.task_representation(ids, attn, pmask)
    assert caplog.text.count("no instruction_mask") == 1
    torch.testing.assert_close(h1, h2)
    prompt_model = tiny_hmora("hmora", overrides=["routing.task_input=prompt"]).eval()
    torch.testing.assert_close(h1, prompt_model.task_representation(ids, attn, pmask))
    with pytest.raises(ValueError, match=r"^instruction_mask: shape \(2, 3\) must equal"):
        model.task_representation(ids, attn, pmask, instruction_mask=torch.ones(2, 3))


def test_batch_inputs_are_bound_per_forward_and_expanded_like_the_task_representation():
    """A method's batch input (HiMoLE's stage-1 ``cluster``) reaches routers for the rows
    they see: None when the forward was not given it, the tensor itself for the same batch,
    each row repeated for beams / several returns (``expand_batch``), and a one-line error
    naming the input otherwise. Guards against the input not re-bound per forward or
    expanded in the wrong order (tile instead of repeat_interleave)."""
    from hmora_ds.routing.context import RoutingContext

    ctx = RoutingContext()
    x3, x6 = torch.zeros(3, 4, 2), torch.zeros(6, 4, 2)
    cluster = torch.tensor([2, 0, 1])
    with ctx.forward_scope(None, None, record=True, inputs={"cluster": cluster}):
        assert ctx.batch_input("cluster", x3) is cluster
        assert ctx.batch_input("domain", x3) is None
        with pytest.raises(
            RuntimeError, match=r"input batch 6 does not match batch input 'cluster' of 3$"
        ):
            ctx.batch_input("cluster", x6)
    with ctx.forward_scope(
        None, None, record=False, expand_batch=True, inputs={"cluster": cluster}
    ):
        assert ctx.batch_input("cluster", x6).tolist() == [2, 2, 0, 0, 1, 1]
    with ctx.forward_scope(None, None, record=True):
        assert ctx.batch_input("cluster", x3) is None and ctx.inputs == {}


def test_shared_routers_build_one_sparse_plan_per_forward_and_never_reuse_a_stale_one(
    monkeypatch,
):
    """With the sparse path, the members of a shared router (q, k, v; gate, up) bucket their
    tokens once per forward: one plan per shared router group and forward, one per unshared
    routed site; and a second forward on other tokens gets a new plan, so its outputs equal a
    fresh model's. Guards against the plan memo disabled (a rebuild per member), keyed on the
    wrong entry, or reused across forwards."""
    from hmora_ds.experts import dispatch

    builds = []
    real_build = dispatch.DispatchPlan.build.__func__
    monkeypatch.setattr(
        dispatch.DispatchPlan, "build",
        classmethod(lambda cls, *a, **k: builds.append(1) or real_build(cls, *a, **k)),
    )  # fmt: skip
    overrides = ["adapter.compute=sparse", "routing.router_dropout=0.0"]
    model = tiny_hmora("hmora_lw", overrides=overrides).eval()
    assert model.config.routing.share_routers
    randomize_adapters(model)
    routed_groups = model.routers  # one RouterGroup per shared input (or unshared site)
    first, second = batch(seed=1), batch(seed=2)
    with torch.no_grad():
        model(*first)
        assert len(builds) == len(routed_groups)
        out = model(*second).logits
        assert len(builds) == 2 * len(routed_groups)
        fresh = tiny_hmora("hmora_lw", overrides=overrides).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(out, fresh(*second).logits)


def test_task_token_id_resolution_and_its_errors():
    """e_task starts from the embedding of '?' (spec §3): given explicitly, read from the
    tokenizer, or a one-line error saying what to pass. Guards against the tokenizer being
    ignored and against a multi-token '?' silently taking its first piece."""
    from types import SimpleNamespace

    from hmora_ds.methods.hmora import resolve_task_token_id

    assert resolve_task_token_id(None, 7) == 7
    one = SimpleNamespace(encode=lambda text, add_special_tokens: [42])
    assert resolve_task_token_id(one, None) == 42
    two = SimpleNamespace(encode=lambda text, add_special_tokens: [4, 2])
    with pytest.raises(ValueError, match=r"^tokenizer: '\?' is not a single token \(\[4, 2\]\)$"):
        resolve_task_token_id(two, None)
    with pytest.raises(
        ValueError,
        match=r"^task_token_id: the transformer task encoder initialises e_task from the "
        r"embedding of '\?'; pass tokenizer= or task_token_id=$",
    ):
        resolve_task_token_id(None, None)


# ------------------------------------------------------------- edges, defaults and devices
def test_layer_alphas_at_one_and_two_layers_and_its_error():
    """L = 1 has α = σ(−ε + μ); L = 2 spans exactly [σ(−ε+μ), σ(ε+μ)] (denominator L − 1)."""
    from hmora_ds.routing.gates import _sigmoid

    assert layer_alphas(1, 3.0, 0.5) == [_sigmoid(-2.5)]
    assert layer_alphas(2, 3.0, 0.5) == pytest.approx([_sigmoid(-2.5), _sigmoid(3.5)])
    with pytest.raises(ValueError) as err:
        layer_alphas(0, 3.0, 0.5)
    assert str(err.value) == "num_layers must be >= 1, got 0"


def test_sigmoid_is_exact_and_never_overflows():
    from hmora_ds.routing.gates import _sigmoid

    for x in (-800.0, -30.0, -1.5, 0.0, 0.7, 30.0, 800.0):
        assert _sigmoid(x) == pytest.approx(
            float(torch.sigmoid(torch.tensor(x, dtype=torch.float64)))
        )


def test_layer_modes_thresholds_are_strict():
    """α = β_low exactly is hybrid (token needs α < β_low), α = β_high exactly is hybrid."""
    assert layer_modes(3, 0.0, 0.0, 0.5, 0.9) == ["hybrid"] * 3  # α = 0.5 = β_low
    assert layer_modes(3, 0.0, 0.0, 0.1, 0.5) == ["hybrid"] * 3  # α = 0.5 = β_high
    assert layer_modes(3, 0.0, 0.0, 0.6, 0.9) == ["token"] * 3
    assert layer_modes(3, 0.0, 0.0, 0.1, 0.4) == ["task"] * 3


def test_topk_gates_default_renormalisation_is_the_papers():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    torch.testing.assert_close(topk_gates(p, 2), topk_gates(p, 2, "paper"))
    assert not torch.allclose(topk_gates(p, 2), topk_gates(p, 2, "sum"))


def test_router_probabilities_are_fp32_from_bf16():
    from hmora_ds.routing.gates import Router

    router = Router(8, 4, 0.0).to(torch.bfloat16)
    out = router(torch.randn(2, 3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3))


def test_task_encoder_defaults_are_the_papers():
    """1 layer, 16 heads, FFN 2·D, dropout 0.1, positions at the embeddings' RMS 1, no
    position on the e_task slot; the derived position scale is not saved with the adapter."""
    enc = TaskEncoder(32)
    assert len(enc.encoder.layers) == 1
    layer = enc.encoder.layers[0]
    assert layer.self_attn.num_heads == 16 and layer.linear1.out_features == 64
    assert layer.dropout.p == 0.1
    assert enc.position_scale.item() == pytest.approx(math.sqrt(2.0))
    assert enc.slot_position is False
    assert "position_scale" not in enc.state_dict() and "task_embedding" in enc.state_dict()


def test_mean_pool_encoder_is_the_prompt_tokens_mean_by_hand():
    enc = TaskEncoder(4, kind="mean_pool")
    embeds = torch.arange(24.0).reshape(2, 3, 4)
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    out = enc(embeds, mask)
    torch.testing.assert_close(out[0], (embeds[0, 1] + embeds[0, 2]) / 2)
    torch.testing.assert_close(out[1], embeds[1, 2])  # one prompt token: itself


@pytest.mark.parametrize("longest", [0, 1, 3])
def test_cutting_the_packed_prompts_to_the_longest_gives_the_same_task_vectors(longest):
    """On CPU the encoder runs over the longest prompt's columns only (the rest are padding
    keys): the same output as the full width, with and without an empty prompt."""
    torch.manual_seed(0)
    enc = TaskEncoder(32, num_heads=4).eval()
    with torch.no_grad():
        enc.task_embedding.normal_()
    embeds = torch.randn(3, 6, 32)
    mask = torch.zeros(3, 6, dtype=torch.long)
    mask[0, 2 : 2 + longest] = 1
    mask[1, 4 : 4 + min(longest, 1)] = 1
    outs = []
    for trim in (False, True):
        enc.trim_padding = trim
        with torch.no_grad():
            outs.append(enc(embeds, mask))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_an_empty_prompt_encodes_to_the_task_slot_alone():
    """A row without prompt tokens attends from the e_task slot to the slot itself: a finite
    vector, the encoder of [e_task] alone (padding keys start after the slot)."""
    torch.manual_seed(0)
    enc = TaskEncoder(32, num_heads=4).eval()
    with torch.no_grad():
        enc.task_embedding.normal_()
    embeds = torch.randn(2, 5, 32)
    out = enc(embeds, torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))
    assert torch.isfinite(out).all()
    alone = enc.encoder(enc.task_embedding.view(1, 1, 32))[0, 0]
    torch.testing.assert_close(out[1], alone, atol=1e-5, rtol=1e-5)


def test_routing_math_stays_on_the_inputs_device():
    """On the ``meta`` device every tensor the routing code creates must be created there
    too (a CPU default would fail on a GPU run: CI has no GPU, ``meta`` stands in for it)."""
    from hmora_ds.routing.task_encoder import pack_prompt, sinusoid_positions

    meta = torch.device("meta")
    assert sinusoid_positions(5, 8, meta).device == meta
    packed, lengths = pack_prompt(
        torch.empty(2, 5, 8, device=meta), torch.ones(2, 5, dtype=torch.bool, device=meta)
    )
    assert packed.device == meta and lengths.device == meta
    with meta:
        enc = TaskEncoder(32, num_heads=4)
    out = enc(torch.empty(2, 5, 32, device=meta), torch.ones(2, 5, device=meta))
    assert out.shape == (2, 32) and out.device == meta


def test_a_token_mask_is_none_outside_recording():
    """Generation steps (not recording) route tokens the prompt's mask does not cover: the
    mask is None there, never a shape error."""
    from hmora_ds.routing.context import RoutingContext

    ctx = RoutingContext()
    mask = torch.ones(2, 6)
    with ctx.forward_scope(None, mask, record=False):
        assert ctx.token_mask_for(torch.zeros(2, 1, 4)) is None
    with ctx.forward_scope(None, mask, record=True):
        assert ctx.token_mask_for(torch.zeros(2, 6, 4)) is mask


def test_task_representation_errors_and_row_expansion():
    from hmora_ds.routing.context import RoutingContext

    ctx = RoutingContext()
    with ctx.forward_scope(None, None, record=True), pytest.raises(RuntimeError) as err:
        ctx.task_repr_for(torch.zeros(2, 3, 4))
    assert str(err.value) == (
        "routing context: a task router ran but no task representation is bound; "
        "call the HMoRA wrapper model (its forward/generate), not the inner HF model"
    )
    rep = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    with ctx.forward_scope(rep, None, record=False, expand_batch=True):
        got = ctx.task_repr_for(torch.zeros(4, 3, 4))
    assert got.tolist() == [[1.0, 2.0], [1.0, 2.0], [3.0, 4.0], [3.0, 4.0]]


def test_a_fresh_context_binds_nothing_and_records_nothing():
    """Before any forward: no task representation, no inputs, no token mask, not recording, no
    KV cache, nothing recorded. Guards against state that leaks into the first forward (a
    stale mask or an expanded batch, records collected outside a forward scope)."""
    from hmora_ds.routing.context import RoutingContext

    ctx = RoutingContext()
    x = torch.zeros(2, 3, 4)
    assert ctx.forward_id == 0 and ctx.cached_tokens == 0
    assert ctx.task_repr is None and ctx.inputs == {} and ctx.recording is False
    assert ctx.token_mask_for(x) is None and ctx.batch_input("cluster", x) is None
    assert ctx.observations == []
    with pytest.raises(RuntimeError, match="no task representation is bound"):
        ctx.task_repr_for(x)
    with ctx.forward_scope(None, None, record=True) as records:
        assert ctx.forward_id == 1 and records == []
    with ctx.forward_scope(None, torch.ones(2, 3), record=True), pytest.raises(RuntimeError) as e:
        ctx.token_mask_for(torch.zeros(2, 5, 4))
    assert str(e.value) == (
        "routing context: token mask (2, 3) does not match the routed input (2, 5)"
    )


def test_alpha_is_the_layers_value_even_where_the_sigmoid_saturates():
    """A hybrid layer's α starts at α(l), including α(l) rounded to exactly 1 or 0 (σ far
    from 0), where the logit is infinite; learnable (a (1,) parameter) only on hybrid layers
    with learn_alpha, else a buffer the adapter does not save; routers have biases (h(x) =
    W x + b). Guards against α(l) = 1 reset to 0.5."""
    from hmora_ds.routing.context import RoutingContext
    from hmora_ds.routing.gates import RouterGroup

    def group(mode, alpha, learn):
        return RouterGroup(0, ("q",), 8, 8, mode, alpha, 4, "topk", 2, "paper", 0.0, learn,
                           RoutingContext())  # fmt: skip

    for alpha in (0.25, 0.9, 1.0, 0.0):
        got = group("hybrid", alpha, False).alpha.item()
        assert got == pytest.approx(alpha, abs=1e-6), alpha
    learned = group("hybrid", 0.25, True)
    assert isinstance(learned.alpha_logit, torch.nn.Parameter)
    assert learned.alpha_logit.shape == (1,) and "alpha_logit" in learned.state_dict()
    for mode, learn in (("hybrid", False), ("token", True), ("task", True)):
        g = group(mode, 0.25, learn)
        assert not isinstance(g.alpha_logit, torch.nn.Parameter), mode
        assert "alpha_logit" not in g.state_dict(), mode
    g = group("token", 0.25, False)
    assert g.shared is False and g._memo is None and g._plan is None
    assert g.token_router.linear.bias is not None


@pytest.mark.parametrize("layers", [1, 2])
def test_task_encoder_computes_only_the_slot_of_its_last_layer(layers):
    """The last layer runs for the e_task slot alone: the output and its gradients equal the
    whole encoder's output at the slot (dropout off, so both draw nothing), in training and in
    eval mode, with padded rows of different lengths."""
    torch.manual_seed(0)
    enc = TaskEncoder(32, num_layers=layers, num_heads=4, dropout=0.0)
    embeds = torch.randn(3, 9, 32) * 0.5
    prompt = (torch.arange(9) < torch.tensor([[4], [9], [6]])).long()

    def whole(x, ignore, lengths):  # every position of every layer, then the slot
        return enc.encoder(x, src_key_padding_mask=ignore)[torch.arange(3), lengths]

    probe = torch.randn(3, 32)  # (a layer-normed output's squares sum to a constant)

    for train in (True, False):
        enc.train(train)
        results = []
        for encode in (enc.encode, whole):
            enc.encode = encode
            enc.zero_grad()
            out = enc(embeds, prompt)
            (out * probe).sum().backward()
            results.append((out, {n: p.grad.clone() for n, p in enc.named_parameters()}))
            del enc.encode
        (got, grads), (ref, ref_grads) = results
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        assert len(grads) == 12 * layers + 1  # 12 tensors a layer, and e_task
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)

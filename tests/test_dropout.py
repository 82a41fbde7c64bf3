"""The expert banks' input dropout that keeps no mask (hmora_ds/experts/dropout.py): ordinary
dropout's values and gradients, fewer saved bytes, and checkpointing's recomputation. Tiny
random-init models (mechanics only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hmora_ds.bench.step import _kept_dropout_masks, _SavedBytes, _state_storages
from hmora_ds.experts.dropout import InputDropout
from tests.conftest import batch, randomize_adapters, tiny_hmora


def test_values_and_gradients_are_those_of_dropout_with_the_same_mask():
    torch.manual_seed(0)
    drop = InputDropout(0.3).train()
    x = torch.randn(4, 5, 16, requires_grad=True)
    a = torch.randn(8, 16, requires_grad=True)
    h, scope = drop.recomputable(x)
    with scope:
        y = F.linear(h, a)
    mask = (h / x).detach()  # the mask the forward drew: 0 or 1 / (1 − p)
    kept = mask[mask != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.7))
    assert 0.15 < (mask == 0).float().mean() < 0.45
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a), g)
    ref = torch.autograd.grad(F.linear(x * mask, a), (x, a), g)
    for u, v in zip(got, ref, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_cpu_mask_drops_each_element_independently_with_probability_p(p):
    """The CPU mask takes four 16-bit draws from each 64-bit random number: every lane drops
    with probability p (to 5 standard errors), neighbours independently, a new mask per call
    and the same one for the same seed."""
    drop = InputDropout(p).train()
    x = torch.ones(1024, 257)  # not a multiple of 4 elements

    def dropped() -> torch.Tensor:
        h, _ = drop.recomputable(x)
        kept = h[h != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
        return (h == 0).flatten()

    torch.manual_seed(0)
    first, second = dropped(), dropped()
    torch.manual_seed(0)
    assert torch.equal(dropped(), first)
    assert not torch.equal(first, second)
    for lane in range(4):
        sub = first[lane::4].double()
        assert abs(sub.mean().item() - p) < 5 * (p * (1 - p) / sub.numel()) ** 0.5, lane
    both = (first[:-1] & first[1:]).double().mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / first.numel()) ** 0.5


def test_eval_mode_and_plain_calls_are_ordinary_dropout():
    drop = InputDropout(0.5)
    x = torch.randn(3, 8)
    h, _ = drop.eval().recomputable(x)
    assert torch.equal(h, x)
    assert torch.equal(drop(x), x)  # a module call: nn.Dropout itself


def _kept_bytes(fn, module) -> tuple[torch.Tensor, int]:
    """``fn()`` and the bytes of the tensors autograd keeps for its backward: the benchmark's
    count (``module``'s parameters and buffers excluded; shown what the recomputed dropout
    really keeps)."""
    saved = _SavedBytes(_state_storages(module))
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        out = fn()
    return out, saved.total


def _saved_bytes(model, ids, attn, labels, prompt) -> int:
    return _kept_bytes(lambda: model(ids, attn, labels, prompt), model)[1]


def test_the_step_keeps_fewer_bytes_than_with_nn_dropout():
    """q, k and v (and gate, up) read one input: kept once instead of a mask and a dropped copy
    per adapted linear."""
    model = tiny_hmora("lora_r8").train()
    ids, attn, labels, prompt = batch()
    ours = _saved_bytes(model, ids, attn, labels, prompt)
    with _kept_dropout_masks(model):  # the plain dropout of every other framework
        plain = _saved_bytes(model, ids, attn, labels, prompt)
    assert ours < 0.8 * plain, (ours, plain)


@pytest.mark.parametrize("preset", ["lora_r8", "hmora_lw"])
def test_checkpointing_recomputes_the_same_masks(preset):
    """Activation checkpointing restores the host generator, so the recomputation draws the
    forward's seeds: loss and gradients equal the run without checkpointing, dropout on."""
    models = [tiny_hmora(preset) for _ in range(2)]
    randomize_adapters(models[0])
    models[1].load_state_dict(models[0].state_dict())
    models[1].gradient_checkpointing_enable()
    ids, attn, labels, prompt = batch()
    results = []
    for model in models:
        model.train()
        torch.manual_seed(7)
        out = model(ids, attn, labels, prompt)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss, grads))
    (loss, grads), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_an_input_changed_in_place_after_the_forward_is_a_clear_error():
    drop = InputDropout(0.5).train()
    x = torch.randn(4, 8, requires_grad=True)
    inp = x * 1.0
    a = torch.randn(3, 8, requires_grad=True)
    h, scope = drop.recomputable(inp)
    with scope:
        y = F.linear(h, a)
    with torch.no_grad():
        inp.add_(1.0)
    with pytest.raises(RuntimeError, match=r"input was modified in place after the forward"):
        y.sum().backward()


def _router_mask(router, x: torch.Tensor) -> torch.Tensor:
    """The mask a router's last draw used, read from its Jacobian: d logits_0 / d x_i is
    mask_i / (1 − p) · W_0i (the seed of the draw is replayed)."""
    torch.manual_seed(7)
    (grad,) = torch.autograd.grad(router.logits(x)[..., 0].sum(), x)
    return grad / router.linear.weight[0].detach()


def test_router_dropout_keeps_the_input_and_a_boolean_mask():
    """The routers' input dropout (router_dropout, 0.1 in the paper's settings) and linear are
    one autograd node: ordinary dropout's values and gradients, and for the backward only the
    layer input (which the layer keeps anyway) and a 1-byte mask instead of an fp32 mask and an
    fp32 dropped copy; the linear is still called as a module (ZeRO-3 gathers it in a hook)."""
    from hmora_ds.routing.gates import Router

    torch.manual_seed(0)
    router = Router(16, 4, dropout=0.3).train()
    x = torch.randn(6, 5, 16, requires_grad=True)
    calls = []
    router.linear.register_forward_pre_hook(lambda _m, args: calls.append(args[0]))
    mask = _router_mask(router, x)  # 0 or 1 / (1 − p)
    assert len(calls) == 1 and calls[0] is x
    torch.testing.assert_close(mask[mask != 0], torch.full_like(mask[mask != 0], 1 / 0.7))
    assert 0.15 < (mask == 0).float().mean() < 0.45
    torch.manual_seed(7)
    logits, kept = _kept_bytes(lambda: router.logits(x), router)
    assert kept == x.numel() * (4 + 1)  # x (fp32) and the mask (1 byte)
    g = torch.randn_like(logits)
    params = (router.linear.weight, router.linear.bias)
    got = torch.autograd.grad(logits, (x, *params), g)
    ref_logits = F.linear(x * mask, *params)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    ref = torch.autograd.grad(ref_logits, (x, *params), g)
    for u, v in zip(got, ref, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)
    # what it was, nn.Dropout before the linear: an fp32 mask (on CPU) and a dropped copy
    _, plain = _kept_bytes(lambda: router.linear(F.dropout(x, 0.3, training=True)), router)
    assert plain == x.numel() * (4 + 4)


def test_task_encoder_is_recomputed_in_the_backward_with_the_same_gradients(monkeypatch):
    """A task encoder of several layers runs under activation checkpointing in training: its
    attention, FFN and dropout activations are not kept, and the backward's recomputation
    redraws the same dropout masks, so gradients equal those of the encoder whose activations
    are kept. One layer (the default) is not checkpointed: computing only the e_task slot, it
    keeps less than the whole layer's activations would, without recomputing anything."""
    from hmora_ds.routing.task_encoder import TaskEncoder

    embeds = torch.randn(3, 12, 32)
    prompt = (torch.arange(12) < torch.tensor([[5], [9], [12]])).long()
    probe = torch.randn(3, 32)  # (a layer-normed output's squares sum to a constant)

    def run(enc):
        torch.manual_seed(3)
        enc.zero_grad()
        out, kept = _kept_bytes(lambda: enc(embeds, prompt), enc)
        (out * probe).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}, kept

    torch.manual_seed(0)
    enc = TaskEncoder(32, num_layers=2, num_heads=4, dropout=0.2).train()
    torch.manual_seed(0)
    single = TaskEncoder(32, num_layers=1, num_heads=4, dropout=0.2).train()
    out, grads, kept = run(enc)
    _, _, kept_single = run(single)
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: calls.append(
        fn) or fn(*a, **{key: v for key, v in k.items() if key != "use_reentrant"}))  # fmt: skip
    out_kept, grads_kept, kept_all = run(enc)
    _, _, kept_single_again = run(single)
    assert len(calls) == 1  # the 2-layer encoder's forward, not the 1-layer one's
    torch.testing.assert_close(out, out_kept, rtol=0, atol=0)
    assert grads.keys() == grads_kept.keys() and len(grads) > 4
    for name, g in grads_kept.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-6, msg=name)
    assert kept < 0.25 * kept_all, (kept, kept_all)
    # one layer, kept: less than the first of two layers, which keeps every position
    assert kept_single == kept_single_again < 0.6 * (kept_all - kept_single), (
        kept_single,
        kept_all,
    )
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)


@pytest.mark.parametrize("bias", [False, True])
def test_the_one_node_projection_applies_its_factor_and_bias(bias):
    """``project(x, W, b, alpha)`` is ``alpha · dropout(x) · Wᵀ + b`` (the banks pass the LoRA
    scaling as alpha, the routers their bias) with the gradients of x, W and b."""
    drop = InputDropout(0.25).train()
    x = torch.randn(3, 7, 12, requires_grad=True)
    w = torch.randn(5, 12, requires_grad=True)
    b = torch.randn(5, requires_grad=True) if bias else None
    torch.manual_seed(2)
    y = drop.project(x, w, b, alpha=2.5)
    torch.manual_seed(2)
    unscaled = drop.project(x, w)
    # the mask from the unscaled projection's Jacobian (as for the router above)
    (jac,) = torch.autograd.grad(unscaled[..., 0].sum(), x)
    mask = jac / w[0].detach()
    ref = 2.5 * F.linear(x * mask, w) + (b if bias else 0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    inputs = (x, w, b) if bias else (x, w)
    g = torch.randn_like(y)
    for u, v in zip(
        torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True
    ):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_a_scope_inside_another_scope_keeps_only_the_input_and_two_masks():
    """A recomputable dropout called inside another one's scope (a router whose linear is a
    plain ``nn.Linear``, inside its experts' scope) looks through the outer scope: both dropped
    inputs are rebuilt from the one kept input and two boolean masks."""
    torch.manual_seed(0)
    experts, inner = InputDropout(0.3).train(), InputDropout(0.3).train()
    x = torch.randn(6, 5, 16, requires_grad=True)
    a = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    seen = []

    def block():
        h, scope = experts.recomputable(x)
        seen.append(h.detach())
        with scope:
            h2, scope2 = inner.recomputable(x)
            seen.append(h2.detach())
            with scope2:
                return F.linear(h, a).sum(-1, keepdim=True) + F.linear(h2, w)

    out, kept = _kept_bytes(block, experts)
    assert kept == x.numel() * (4 + 1 + 1) + (a.numel() + w.numel()) * 4  # x, two masks, A, W
    m_experts, m_inner = seen[0] / x.detach(), seen[1] / x.detach()
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, a, w), g)
    ref_out = F.linear(x * m_experts, a).sum(-1, keepdim=True) + F.linear(x * m_inner, w)
    ref = torch.autograd.grad(ref_out, (x, a, w), g)
    for u, v in zip(got, ref, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_dropout_module_keeps_a_boolean_mask_with_dropouts_values_and_gradients():
    """``Dropout`` (the task encoder's residual and FFN dropout): ``nn.Dropout``'s values and
    gradients for the mask it drew, a 1-byte mask kept instead of nn.Dropout's fp32 one on the
    CPU, and the identity in eval mode."""
    from hmora_ds.experts.dropout import Dropout
    from hmora_ds.routing.task_encoder import TaskEncoder

    torch.manual_seed(0)
    drop = Dropout(0.25).train()
    x = torch.randn(64, 48, requires_grad=True)
    h, kept = _kept_bytes(lambda: drop(x), drop)
    mask = (h / x).detach()
    kept_values = mask[mask != 0]
    torch.testing.assert_close(kept_values, torch.full_like(kept_values, 1 / 0.75))
    assert 0.18 < (mask == 0).float().mean() < 0.32
    assert kept == x.numel()  # booleans
    _, plain = _kept_bytes(lambda: F.dropout(x, 0.25, training=True), drop)
    assert plain == 4 * x.numel()
    g = torch.randn_like(h)
    (got,) = torch.autograd.grad(h, x, g)
    torch.testing.assert_close(got, g * mask)
    assert torch.equal(drop.eval()(x), x)
    layer = TaskEncoder(32, num_heads=4, dropout=0.2).encoder.layers[0]
    assert all(type(getattr(layer, n)) is Dropout for n in ("dropout", "dropout1", "dropout2"))


@pytest.mark.parametrize("autocast", [False, True])
def test_dropout_and_projection_as_one_node_equal_the_recomputable_scope(autocast):
    """``InputDropout.project`` (the banks' common path: dropout and the A projection as one
    autograd node, no saved-tensor hooks): the same mask for the same seed, the same output and
    gradients as the recomputable scope around ``F.linear``, and the same saved tensors (x and a
    1-byte mask; A is a parameter). Under bf16 autocast it computes in bf16, as F.linear does,
    and returns each gradient in its input's dtype (fp32 for the fp32 adapter)."""
    drop = InputDropout(0.3).train()
    # under autocast the input is the bf16 base model's hidden state, the adapter fp32
    x = torch.randn(6, 5, 16, dtype=torch.bfloat16 if autocast else None, requires_grad=True)
    lin = torch.nn.Linear(16, 8, bias=False)
    a = lin.weight
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)

    def fused():
        with ac:
            return drop.project(x, a)

    def scoped():
        h, scope = drop.recomputable(x)
        with scope, ac:
            return F.linear(h, a)

    results = []
    for fn in (fused, scoped):
        torch.manual_seed(5)
        y, kept = _kept_bytes(fn, lin)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(11)).to(y.dtype)
        results.append((y, kept, torch.autograd.grad(y, (x, a), g)))
    (y, kept, grads), (y_ref, kept_ref, grads_ref) = results
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
    # x and the mask (the scope under autocast also keeps F.linear's bf16 copy of A)
    assert kept == x.numel() * (x.element_size() + 1)
    assert kept_ref == kept + (a.numel() * 2 if autocast else 0)

    def close(got, ref):
        # bf16: the scope rounds the scaled dropped input to bf16 before the product, the one
        # node applies 1 / (1 − p) inside the product's fp32 accumulation: up to 2 bf16 ulps
        # of the largest value apart.
        tol = 2**-6 * float(ref.detach().abs().max()) if autocast else 1e-6
        torch.testing.assert_close(got, ref, rtol=0 if autocast else 1e-6, atol=tol)

    close(y, y_ref)
    for got, ref, inp in zip(grads, grads_ref, (x, a), strict=True):
        assert got.dtype == inp.dtype
        close(got, ref)


@pytest.mark.parametrize("bool_mask", [True, False])
def test_task_encoder_attention_dropout_is_the_fast_draw_over_exact_attention(
    monkeypatch, bool_mask
):
    """The task encoder's self-attention in CPU training: the attention weights are softmax(q
    kᵀ / √d) over the unpadded keys (nn.MultiheadAttention's, which it equals in eval mode),
    dropped by the 1-byte-mask draw at rate p, then · v and the output projection; gradients
    are those of that computation. Its parameters are the ones ``nn.TransformerEncoderLayer``
    draws for the seed (rebuilding the module draws no random numbers)."""
    import hmora_ds.routing.task_encoder as te

    torch.manual_seed(0)
    enc = te.TaskEncoder(32, num_heads=4, dropout=0.3).train()
    attn = enc.encoder.layers[0].self_attn
    assert type(attn) is te.SelfAttention
    torch.manual_seed(0)
    plain = torch.nn.TransformerEncoderLayer(32, 4, 64, 0.3, batch_first=True)
    for name, value in plain.self_attn.state_dict().items():
        torch.testing.assert_close(attn.state_dict()[name], value, rtol=0, atol=0)

    x = torch.randn(3, 6, 32, requires_grad=True)
    pad = torch.tensor([[0, 0, 0, 0, 1, 1], [0] * 6, [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    mask_arg = pad if bool_mask else torch.zeros(3, 6).masked_fill(pad, float("-inf"))
    seen = []
    real = te.drop
    monkeypatch.setattr(te, "drop", lambda w, p: seen.append((w, real(w, p), p)) or seen[-1][1])
    y, _ = attn(x, x, x, key_padding_mask=mask_arg, need_weights=False)
    ((weights, dropped, p),) = seen
    assert p == 0.3
    with torch.no_grad():  # the weights are nn.MultiheadAttention's
        _, ref_w = attn.eval()(x, x, x, key_padding_mask=pad, average_attn_weights=False)
        attn.train()
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-6)
    keep = dropped.detach() / weights.detach().clamp_min(1e-30)
    live = weights.detach() > 0
    torch.testing.assert_close(
        keep[live & (keep > 0)], torch.full_like(keep[live & (keep > 0)], 1 / 0.7)
    )
    assert 0.15 < (keep[live] == 0).float().mean() < 0.45

    def reference(x):  # exact attention with the drawn mask, written out
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.view(3, 6, 4, 8).transpose(1, 2)  # noqa: E731
        s = split(q) @ split(k).transpose(-2, -1) / 8**0.5
        w = torch.softmax(s.masked_fill(pad[:, None, None, :], float("-inf")), dim=-1) * keep
        out = (w @ split(v)).transpose(1, 2).reshape(3, 6, 32)
        return attn.out_proj(out)

    ref = reference(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    params = (x, attn.in_proj_weight, attn.out_proj.weight)
    for u, v in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_plain_lora_dense_experts_and_routers_take_the_one_node_path():
    """In training, each adapted linear of a plain LoRA and of HMoRA's dense experts, and each
    of HMoRA's routers, projects through the one-node dropout; in eval mode none does."""
    from hmora_ds.routing.gates import Router

    for preset in ("lora_r8", "hmora_lw"):
        model = tiny_hmora(preset).train()
        ids, attn, labels, prompt = batch()
        out = model(ids, attn, labels, prompt)
        names, todo, seen = [], [out.loss.grad_fn], set()
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            names.append(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
        layers = model.base_model.config.num_hidden_layers
        routers = sum(isinstance(m, Router) for m in model.modules())
        assert (routers > 0) == (preset == "hmora_lw")
        # 7 adapted linears per layer; each (shared) router is called once per forward
        assert names.count("_DropoutLinearBackward") == 7 * layers + routers, preset
        with torch.no_grad():
            model.eval()
            assert model(ids, attn, labels, prompt).loss.grad_fn is None


def test_a_scope_over_an_input_without_gradient_shows_its_mask_to_the_counter():
    """The first layer's input needs no gradient when the base is frozen: the dropout node then
    keeps nothing, and the scope alone keeps the mask, which an observing counter is shown."""
    drop = InputDropout(0.3).train()
    x = torch.randn(6, 5, 16)
    lin = torch.nn.Linear(16, 8, bias=False)

    def fn():
        h, scope = drop.recomputable(x)
        with scope:
            return F.linear(h, lin.weight)

    _, kept = _kept_bytes(fn, lin)
    assert kept == x.numel() * (4 + 1)  # x (fp32) and the mask (1 byte)


@pytest.mark.parametrize("preset", ["lora_r8", "hmora_lw"])
def test_base_product_accumulated_into_the_update_equals_the_module_call(preset):
    """In training with dropout, a bank over a hook-free ``nn.Linear`` computes the base
    product itself and adds its update into it (``u = x Wᵀ + b; u += s h Bᵀ``) instead of
    copying the base output into the update's ``addmm``: the same loss and gradients (to
    float32 rounding) for the same masks as calling the base layer, which a hook on it forces
    (and the hook runs), as a weight ZeRO-3 partitions does. q, k and v have biases (Qwen2);
    HMoRA w LW's hydra experts are gated by routers."""
    from hmora_ds.experts import MoRALinear

    model = tiny_hmora(preset, layers=2)
    randomize_adapters(model)
    model.train()
    ids, attn, labels, prompt = batch()
    banks = [m for m in model.modules() if isinstance(m, MoRALinear)]
    with torch.no_grad():  # HF initialises biases to 0: give them values that count
        for b in banks:
            if b.base_layer.bias is not None:
                b.base_layer.bias.normal_(0.0, 0.5)
    assert any(b.base_layer.bias is not None for b in banks)
    assert all(b._base_into_update(torch.zeros(1, b.in_features)) for b in banks)
    weight = banks[0].base_layer.weight
    weight.ds_id = 0  # what ZeRO-3 marks its partitioned parameters with
    assert not banks[0]._base_into_update(torch.zeros(1, banks[0].in_features))
    del weight.ds_id

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout masks in both runs
        loss = model(ids, attn, labels, prompt).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    loss, grads = run()
    calls = []
    handles = [b.base_layer.register_forward_hook(lambda *a: calls.append(1)) for b in banks]
    try:
        assert not any(b._base_into_update(torch.zeros(1, b.in_features)) for b in banks)
        loss_ref, grads_ref = run()
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == len(banks)  # every base layer was called, its hook ran
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)

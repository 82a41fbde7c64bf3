"""The expert banks' input dropout that keeps no mask (hmora_ds/experts/dropout.py): ordinary
dropout's values and gradients, fewer saved bytes, and checkpointing's recomputation. Tiny
random-init models (mechanics only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hmora_ds.experts.dropout import OBSERVER, InputDropout
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


def test_eval_mode_and_plain_calls_are_ordinary_dropout():
    drop = InputDropout(0.5)
    x = torch.randn(3, 8)
    h, _ = drop.eval().recomputable(x)
    assert torch.equal(h, x)
    assert torch.equal(drop(x), x)  # a module call: nn.Dropout itself


def _saved_bytes(model, ids, attn, labels, prompt) -> int:
    seen: dict[int, int] = {}
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in state:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    setattr(pack, OBSERVER, True)  # shown what the recomputed dropout really keeps

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, attn, labels, prompt)
    return sum(seen.values())


def test_the_step_keeps_fewer_bytes_than_with_nn_dropout():
    """q, k and v (and gate, up) read one input: kept once instead of a mask and a dropped copy
    per adapted linear."""
    model = tiny_hmora("lora_r8").train()
    ids, attn, labels, prompt = batch()
    ours = _saved_bytes(model, ids, attn, labels, prompt)
    for module in model.modules():
        if isinstance(module, InputDropout):
            module.__class__ = torch.nn.Dropout  # the plain dropout of every other framework
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

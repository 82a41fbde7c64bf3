"""The chunked LM-head cross-entropy (hmora_ds/lm_head.py) against the full-logits loss, and in
the model's training forward. Tiny random-init models (mechanics only)."""

from __future__ import annotations

import pytest
import torch

from hmora_ds.lm_head import chunked_lm_loss_sum
from hmora_ds.model import lm_loss_sum
from tests.conftest import batch, randomize_adapters, tiny_hmora


def _case(seed: int = 0, b: int = 3, t: int = 11, d: int = 16, v: int = 50):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=gen, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, requires_grad=True)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[:, :4] = -100  # prompts
    labels[2, 8:] = -100  # padding
    labels[1] = -100  # a row without any target
    return hidden, weight, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(smoothing, chunk):
    hidden, weight, labels = _case()
    total, n = chunked_lm_loss_sum(hidden, weight, labels, chunk, smoothing)
    grads = torch.autograd.grad(total * 1.7, (hidden, weight))  # a scaled loss, as in training
    ref, n_ref = lm_loss_sum(hidden @ weight.t(), labels, smoothing)
    ref_grads = torch.autograd.grad(ref * 1.7, (hidden, weight))
    assert n.item() == n_ref.item() == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_a_frozen_head_gets_no_gradient_and_bf16_hidden_states_keep_their_dtype():
    hidden, weight, labels = _case()
    h16 = hidden.detach().bfloat16().requires_grad_(True)
    total, _ = chunked_lm_loss_sum(h16, weight.detach().bfloat16(), labels, 4)
    (g,) = torch.autograd.grad(total, (h16,))
    assert total.dtype == torch.float32 and g.dtype == torch.bfloat16
    ref, _ = lm_loss_sum(h16 @ weight.detach().bfloat16().t(), labels)
    torch.testing.assert_close(total, ref, rtol=2e-2, atol=0.5)


def test_no_vocabulary_wide_tensor_is_kept_for_the_backward():
    """Only the hidden states' gradient (tokens × hidden) is kept, with a frozen head (adapter
    training); the logits path keeps (tokens × vocabulary)."""
    hidden, weight, labels = _case(t=40, v=500)
    weight = weight.detach()
    widest = []

    def pack(t):
        widest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_lm_loss_sum(hidden, weight, labels, 8)[0].backward()
    chunked = max(widest)
    widest.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss_sum(hidden @ weight.t(), labels)[0].backward()
    assert chunked <= hidden.numel() < 500 * 3 * 39 <= max(widest)


def test_a_bad_chunk_size_names_the_setting():
    hidden, weight, labels = _case()
    with pytest.raises(ValueError, match=r"^train\.ce_chunk_tokens: must be >= 1 here, got 0$"):
        chunked_lm_loss_sum(hidden, weight, labels, 0)


@pytest.mark.parametrize("preset", ["hmora_lw", "lora_r8"])
def test_the_training_forward_equals_the_logits_path_and_skips_the_logits(preset):
    overrides = ["adapter.dropout=0", "routing.router_dropout=0", "routing.encoder_dropout=0"]
    models = [tiny_hmora(preset, overrides=overrides) for _ in range(2)]
    randomize_adapters(models[0])
    models[1].load_state_dict(models[0].state_dict())
    models[1].ce_chunk_tokens = 5
    ids, attn, labels, prompt = batch()
    results = []
    for model in models:
        model.train()
        out = model(ids, attn, labels, prompt)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (plain, grads), (chunked, grads_c) = results
    assert plain.logits is not None and chunked.logits is None
    assert chunked.num_target_tokens.item() == plain.num_target_tokens.item()
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-6, msg=name)
    model = models[1].eval()  # evaluation keeps the logits (benchmarks score them)
    with torch.no_grad():
        assert model(ids, attn, labels, prompt).logits is not None

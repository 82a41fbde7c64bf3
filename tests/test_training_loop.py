"""A plain PyTorch loop on real sentences lowers the LM loss (tiny random base: mechanics)."""

from pathlib import Path

import torch

from hmora_ds.optim import lora_plus_param_groups
from tests.conftest import tiny_hmora

SENTENCES = Path(__file__).parent / "fixtures" / "sentences.txt"


def encode(lines, length=96):
    """Byte-level ids (3 … 258; 0 pad): the prompt is the question, the target the answer."""
    ids = torch.zeros(len(lines), length, dtype=torch.long)
    attn, labels, prompt = torch.zeros_like(ids), torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, line in enumerate(lines):
        q, a = line.split(" Answer: ")
        pq, pa = [b + 3 for b in (q + " Answer:").encode()], [b + 3 for b in (" " + a).encode()]
        seq = (pq + pa)[:length]
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        prompt[i, : len(pq)] = 1
        labels[i, len(pq) : len(seq)] = ids[i, len(pq) : len(seq)]
    return ids, attn, labels, prompt


def test_hmora_lw_training_lowers_lm_loss():
    lines = SENTENCES.read_text().strip().splitlines()
    assert len(lines) >= 40
    # With HF's default init (std 0.02) a tiny tied lm_head bounds the logits to about ±1, so
    # no adapter could lower the loss much; a wider init gives the frozen base some range.
    model = tiny_hmora("hmora_lw", init_range=0.2)
    model.train()
    opt = torch.optim.AdamW(lora_plus_param_groups(model, lr=3e-3, weight_decay=0.01))
    gen = torch.Generator().manual_seed(0)
    data = encode(lines)
    losses = []
    for _ in range(40):
        pick = torch.randperm(len(lines), generator=gen)[:8]
        out = model(*(t[pick] for t in data))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"LM loss did not fall enough: {first:.3f} → {last:.3f}"
    assert torch.isfinite(out.aux_loss)

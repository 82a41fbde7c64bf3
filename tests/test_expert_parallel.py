"""Expert parallelism (CPU, gloo, 2 ranks with timeouts): EP = 2 equals the replicated block."""

from __future__ import annotations

import pytest
import torch

from hmora_ds.parallel.expert_parallel import validate_expert_parallel
from tests._dist import ep_gradients, run_ranks
from tests.conftest import batch, randomize_adapters, tiny_hmora

pytestmark = pytest.mark.multirank


def _ep_setup(world):
    import deepspeed
    from deepspeed.utils import groups

    from hmora_ds.runtime.dist import skip_cpu_shm_build

    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # wraps the live group
    groups._create_expert_and_data_parallel(world)
    return groups._get_expert_parallel_group(f"ep_size_{world}")


def _block_worker(rank, world, hydra, out_dir):
    from hmora_ds.parallel.expert_parallel import expert_parallel_blocks, to_expert_parallel

    torch.manual_seed(0)
    overrides = {"adapter.dropout": 0.0, "routing.router_dropout": 0.0,
                 "routing.encoder_dropout": 0.0, "adapter.hydra": hydra}  # fmt: skip
    ref = tiny_hmora("hmora", overrides=overrides)
    randomize_adapters(ref)
    # Skew one router so that expert 0 gets no token at all in layer 0's q block.
    with torch.no_grad():
        ref.routers["layer00_q"].token_router.linear.bias[0] = -50.0
    model = tiny_hmora("hmora", overrides=overrides)
    model.load_state_dict(ref.state_dict())
    model.double()  # float64: the comparison is about the dispatch, not fp32 summation order
    n = to_expert_parallel(model, world, rank)
    assert n == 7 * 6
    group = _ep_setup(world)
    for block in expert_parallel_blocks(model).values():
        block.bind_group(group)
    ids, attn, labels, prompt = batch(bsz=4, seed=7)
    mine = slice(2 * rank, 2 * rank + 2)
    out = model(ids[mine], attn[mine], labels[mine], prompt[mine])
    # The loss of this rank's half; summed over ranks it is the full batch's loss.
    w = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(rank)).double()
    ((out.logits * w).sum() + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"logits": out.logits.detach(), "grads": grads}, out_dir / f"r{rank}.pt")


@pytest.mark.parametrize("hydra", [False, True])
def test_ep2_model_equals_replicated(tmp_path, hydra):
    run_ranks(_block_worker, 2, tmp_path, hydra, tmp_path, timeout=120)
    overrides = {"adapter.dropout": 0.0, "routing.router_dropout": 0.0,
                 "routing.encoder_dropout": 0.0, "adapter.hydra": hydra}  # fmt: skip
    torch.manual_seed(0)
    ref = tiny_hmora("hmora", overrides=overrides)
    randomize_adapters(ref)
    with torch.no_grad():
        ref.routers["layer00_q"].token_router.linear.bias[0] = -50.0
    ref.double()
    ids, attn, labels, prompt = batch(bsz=4, seed=7)
    total = 0
    logits = []
    for rank in range(2):
        mine = slice(2 * rank, 2 * rank + 2)
        out = ref(ids[mine], attn[mine], labels[mine], prompt[mine])
        w = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(rank)).double()
        total = total + (out.logits * w).sum() + out.aux_loss
        logits.append(out.logits.detach())
    total.backward()
    got = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    for r in range(2):
        torch.testing.assert_close(got[r]["logits"], logits[r], rtol=1e-6, atol=1e-6)
    # Replicated parameters: the sum over ranks equals the reference gradient. Experts: rank r
    # holds experts 4r … 4r+3 with the gradient of every token routed to them.
    std = ep_gradients([g["grads"] for g in got], experts_per_rank=4)
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert std.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(std[n], ref_grads[n], rtol=1e-6, atol=1e-6, msg=n)
    # The skewed expert 0 of layer 0 / q received no token, yet its weights got a (zero) grad.
    q0 = "base_model.model.layers.0.self_attn.q_proj.lora_B"
    assert std[q0][:, :8].abs().sum() == 0 and std[q0][:, 8:].abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(ep_size=3, num_experts=8, world_size=6),
            r"parallel\.ep_size \(3\) must divide adapter\.num_experts \(8\)",
        ),
        (
            dict(ep_size=4, num_experts=8, world_size=2),
            r"must divide the data-parallel world size \(2\)",
        ),
        (dict(ep_size=2, zero_stage=3), r"ZeRO stage 3 is not supported.*zero2_ep\.json"),
        (dict(ep_size=2, routing_mode="soft"), r"needs routing\.mode=topk"),
        (dict(ep_size=2, has_mixture=False), r"no mixture of experts"),
    ],
)
def test_refusals(kwargs, message):
    args = dict(ep_size=2, num_experts=8, world_size=2, zero_stage=2, routing_mode="topk",
                has_mixture=True) | kwargs  # fmt: skip
    with pytest.raises(ValueError, match=message):
        validate_expert_parallel(**args)
    validate_expert_parallel(1, 8, 1, 3, "soft", False)  # ep_size 1: everything is allowed


def test_per_site_expert_counts_are_checked_before_any_block_changes():
    from hmora_ds.experts import MoRALinear
    from hmora_ds.parallel.expert_parallel import to_expert_parallel

    model = tiny_hmora("hmora", overrides={"adapter.num_experts": 4})
    last = model.base_model.model.layers[5].mlp.down_proj
    last.num_experts = 3  # as a method with its own count at this site would build it
    with pytest.raises(ValueError, match=r"parallel\.ep_size \(2\) must divide the 3 experts of "):
        to_expert_parallel(model, 2, 0)
    assert all(isinstance(m, MoRALinear) for m in model.adapted_modules().values())

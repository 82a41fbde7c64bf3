"""Length-grouped sampler: determinism, rank slicing, length grouping, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmora_ds.data import DataCollator, LengthGroupedSampler

N = 103
LENGTHS = np.random.default_rng(0).integers(5, 500, size=N)


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


def _epoch(sampler: LengthGroupedSampler) -> list[list[int]]:
    return list(iter(sampler))


def test_deterministic_by_seed_and_epoch():
    a = _epoch(LengthGroupedSampler(LENGTHS, 4, seed=1))
    b = _epoch(LengthGroupedSampler(LENGTHS, 4, seed=1))
    assert a == b
    assert a != _epoch(LengthGroupedSampler(LENGTHS, 4, seed=2))
    s = LengthGroupedSampler(LENGTHS, 4, seed=1)
    s.set_epoch(1)
    assert _epoch(s) != a
    # Exhausting an epoch moves on to the next one.
    s2 = LengthGroupedSampler(LENGTHS, 4, seed=1)
    _epoch(s2)
    assert s2.epoch == 1 and _epoch(s2) == _epoch(_at_epoch(1))


def _at_epoch(epoch: int, **kw) -> LengthGroupedSampler:
    s = LengthGroupedSampler(LENGTHS, 4, seed=1, **kw)
    s.set_epoch(epoch)
    return s


@pytest.mark.parametrize("group", [True, False])
def test_ranks_get_disjoint_slices_of_every_global_batch(group):
    world, bs = 3, 4
    per_rank = [
        _epoch(
            LengthGroupedSampler(
                LENGTHS, bs, seed=5, rank=r, world_size=world, group_by_length=group
            )
        )
        for r in range(world)
    ]
    ref = LengthGroupedSampler(LENGTHS, bs, seed=5, world_size=world, group_by_length=group)
    globals_ = ref.global_batches(0)
    assert all(len(p) == len(ref) == N // (bs * world) for p in per_rank)
    seen: list[int] = []
    for step, gb in enumerate(globals_):
        parts = [per_rank[r][step] for r in range(world)]
        assert all(len(p) == bs for p in parts)
        assert sorted(_flat(parts)) == sorted(gb.tolist())
        seen += _flat(parts)
    assert len(seen) == len(set(seen)) == len(ref) * bs * world  # no index twice in an epoch


def test_length_grouping_reduces_padding():
    def padding(batches):
        return sum(max(LENGTHS[b]) * len(b) - sum(LENGTHS[b]) for b in batches)

    grouped = _epoch(LengthGroupedSampler(LENGTHS, 8, seed=0, mega_batch_mult=50))
    plain = _epoch(LengthGroupedSampler(LENGTHS, 8, seed=0, group_by_length=False))
    assert padding(grouped) < 0.5 * padding(plain)
    # Batch order is still shuffled, not sorted by length.
    maxima = [max(LENGTHS[b]) for b in grouped]
    assert maxima != sorted(maxima, reverse=True)


@pytest.mark.parametrize("stop", [0, 3, 11])
def test_resume_from_position_yields_the_same_remaining_order(stop):
    full = _epoch(_at_epoch(2, rank=1, world_size=2))
    s = _at_epoch(2, rank=1, world_size=2)
    it = iter(s)
    consumed = [next(it) for _ in range(stop)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["position"] == stop
    resumed = LengthGroupedSampler(LENGTHS, 4, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop calling set_epoch for the same epoch keeps the position
    assert consumed + _epoch(resumed) == full


def test_resume_through_a_dataloader_with_prefetch():
    data = [{"input_ids": list(range(n)), "prompt_len": 1} for n in LENGTHS.tolist()]
    collate = DataCollator(pad_token_id=0)

    def loader(s):
        return torch.utils.data.DataLoader(data, batch_sampler=s, collate_fn=collate)

    full = [b["input_ids"] for b in loader(_at_epoch(0))]
    s = _at_epoch(0)
    consumed = 0
    got = []
    for b in loader(s):
        got.append(b["input_ids"])
        consumed += 1
        if consumed == 5:
            break
    state = s.state_dict(consumed=consumed)  # what training used, whatever was prefetched
    s2 = _at_epoch(0)
    s2.load_state_dict(state)
    got += [b["input_ids"] for b in loader(s2)]
    assert len(got) == len(full) and all(torch.equal(x, y) for x, y in zip(got, full, strict=True))


def test_drop_last_false_fills_the_last_batch():
    s = LengthGroupedSampler(LENGTHS, 10, seed=0, drop_last=False)
    batches = _epoch(s)
    assert len(batches) == len(s) == 11 and all(len(b) == 10 for b in batches)
    assert set(_flat(batches)) == set(range(N))


def test_state_mismatch_and_bad_arguments():
    s = LengthGroupedSampler(LENGTHS, 4, seed=1)
    with pytest.raises(ValueError, match="does not match"):
        LengthGroupedSampler(LENGTHS, 4, seed=2).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        LengthGroupedSampler(LENGTHS, 4, seed=1, world_size=2).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({**s.state_dict(), "position": 10_000})
    with pytest.raises(ValueError, match="rank"):
        LengthGroupedSampler(LENGTHS, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="global batch"):
        LengthGroupedSampler(LENGTHS[:3], 4)


def test_state_from_other_lengths_is_refused():
    state = LengthGroupedSampler(LENGTHS, 4, seed=1).state_dict()
    other = LENGTHS.copy()
    other[0] += 1  # e.g. another tokenizer: same size, different order
    with pytest.raises(ValueError, match="lengths_hash"):
        LengthGroupedSampler(other, 4, seed=1).load_state_dict(state)

"""Questions sharded over the ranks, predictions gathered exactly once.

Questions are dealt round-robin (rank ``r`` of ``W`` takes questions ``r, r+W, ...``); every rank
scores its shard with the same number of forwards (:meth:`Scorer.run` pads with dummy batches:
ZeRO-3 gathers parameters inside forward, so all ranks must step together); the per-rank
``{id: prediction}`` dicts are all-gathered with ``all_gather_object`` and merged, and a question
seen twice or missing is an error. Works with a DeepSpeed engine or plain torch.distributed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from hmora_ds.eval.benchmarks import EvalError, Question
from hmora_ds.eval.prompts import ShotSampler
from hmora_ds.eval.scoring import Scorer


def world_info(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group`` (``(0, 1)`` without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def score_questions(
    model: Any,
    scorer: Scorer,
    questions: Sequence[Question],
    device: torch.device,
    *,
    shots: ShotSampler | None = None,
    autocast_dtype: torch.dtype | None = None,
    group: Any = None,
) -> dict[str, int]:
    """Predictions ``{question id: option index}`` for all ``questions`` (on every rank).

    Every rank of ``group`` (default: the world, if initialised) must call this with the same
    question list; each scores its round-robin shard, then the shards are all-gathered.
    """
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise EvalError("duplicate question ids in one scoring call")
    rank, world = world_info(group)
    shard = list(questions[rank::world])
    items = scorer.items(shard, shots)
    raw = scorer.run(model, items, device, autocast_dtype, group)
    local = {q.id: p for q, p in zip(shard, scorer.predict(shard, items, raw), strict=True)}
    if world == 1:
        return local
    gathered: list[dict[str, int] | None] = [None] * world
    dist.all_gather_object(gathered, local, group=group)
    merged: dict[str, int] = {}
    for part in gathered:
        for qid, pred in (part or {}).items():
            if qid in merged:
                raise EvalError(f"question {qid!r} was scored on two ranks")
            merged[qid] = pred
    if set(merged) != set(ids):
        raise EvalError(f"gathered {len(merged)} predictions for {len(ids)} questions")
    return merged

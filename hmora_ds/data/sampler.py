"""Deterministic, resumable, length-grouped batch sampling across data-parallel ranks.

Every rank builds the same list of *global batches* (``batch_size * world_size`` indices)
for an epoch from ``(seed, epoch)`` alone, and takes its own contiguous slice of each, so
the ranks' micro-batches are disjoint and together form the global batch.

Length grouping (``group_by_length=True``): the epoch's permutation is cut into
mega-batches of ``mega_batch_mult`` global batches, each mega-batch is sorted by length
(longest first) and cut into global batches, and the global batches are shuffled. Padding
waste drops while the order stays random at the batch level.

Resuming: :meth:`LengthGroupedSampler.state_dict` records the epoch and how many global
batches of it were consumed; after :meth:`~LengthGroupedSampler.load_state_dict` the
iteration yields exactly the remaining batches of that epoch, in the same order.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


class LengthGroupedSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding this rank's micro-batches (lists of dataset indices).

    Use as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)``.

    Args:
        lengths: Token length of every example, ``(N,)``.
        batch_size: Micro-batch size per rank.
        seed: Base seed; the order of epoch ``e`` depends only on ``(seed, e)``.
        rank: This process's data-parallel rank.
        world_size: Number of data-parallel ranks.
        group_by_length: Group similar lengths into batches (see module docstring).
        mega_batch_mult: Global batches per mega-batch when grouping by length.
        drop_last: Drop the last incomplete global batch; otherwise fill it with indices
            from the start of the epoch's permutation (every rank gets a full batch).
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        group_by_length: bool = True,
        mega_batch_mult: int = 50,
        drop_last: bool = True,
    ) -> None:
        if batch_size <= 0 or world_size <= 0 or mega_batch_mult <= 0:
            raise ValueError("batch_size, world_size and mega_batch_mult must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) < batch_size * world_size and drop_last:
            raise ValueError(
                f"{len(self.lengths)} examples cannot fill one global batch of "
                f"{batch_size} x {world_size} with drop_last=True"
            )
        if len(self.lengths) == 0:
            raise ValueError("no examples to sample from")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.group_by_length = group_by_length
        self.mega_batch_mult = mega_batch_mult
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # global batches of `epoch` already yielded / consumed
        self._cache: tuple[int, list[np.ndarray]] | None = None

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer micro-step over all ranks."""
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Global batches (= this rank's micro-batches) in one epoch."""
        n, g = len(self.lengths), self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a new epoch starts at position 0."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches (index arrays of ``global_batch_size``), cached."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        g = self.global_batch_size
        perm = rng.permutation(len(self.lengths))
        usable = len(self) * g
        if usable <= len(perm):
            perm = perm[:usable]
        else:  # not drop_last: wrap around to fill the last global batch
            perm = np.concatenate([perm, np.resize(perm, usable - len(perm))])
        if self.group_by_length:
            mega = g * self.mega_batch_mult
            parts = []
            for s in range(0, usable, mega):
                chunk = perm[s : s + mega]
                parts.append(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
            perm = np.concatenate(parts)
        batches = [perm[s : s + g] for s in range(0, usable, g)]
        if self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch[lo:hi].tolist()
        # Epoch finished: the next iteration continues with the next epoch.
        self.epoch += 1
        self.position = 0

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Where the iteration stands.

        Args:
            consumed: Global batches of the current epoch that training actually used.
                Pass it when a ``DataLoader`` prefetches (the sampler has then yielded more
                batches than were consumed); by default the yielded count is used.
        """
        return {
            "epoch": self.epoch,
            "position": self.position if consumed is None else int(consumed),
            "seed": self.seed,
            "num_examples": len(self.lengths),
            # The order depends on the lengths: a different tokenizer or data changes it.
            "lengths_hash": hashlib.blake2b(self.lengths.tobytes(), digest_size=8).hexdigest(),
            "global_batch_size": self.global_batch_size,
            "group_by_length": self.group_by_length,
            "mega_batch_mult": self.mega_batch_mult,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s epoch and position.

        Raises:
            ValueError: If the state was saved with a different order definition (seed,
                dataset size or lengths, global batch size, grouping), so the remaining
                order would not be the same.
        """
        mine = self.state_dict()
        keys = (
            "seed",
            "num_examples",
            "lengths_hash",
            "global_batch_size",
            "group_by_length",
            "mega_batch_mult",
            "drop_last",
        )
        diff = {k: (state.get(k), mine[k]) for k in keys if state.get(k) != mine[k]}
        if diff:
            raise ValueError(f"sampler state does not match this sampler (saved, current): {diff}")
        if not 0 <= int(state["position"]) <= len(self):
            raise ValueError(f"position {state['position']} outside [0, {len(self)}]")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

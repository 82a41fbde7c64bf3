"""Routing statistics accumulated over micro-steps and ranks (paper figure 3, table 13).

Balance Ĥ(M) is not linear in the batch, so statistics of several micro-batches (gradient
accumulation) or ranks cannot be averaged after the fact. :class:`RouterStatsAccumulator`
keeps the raw moments per router — Σ p, Σ H(p), Σ top-k selections and the count — and turns
them into statistics once, with a single all-reduce for all routers together.

A router whose tokens use a variable number of experts (AdaMoLE's thresholds) also records the
experts each token uses, as a record of kind :data:`ACTIVE_KIND` whose ``probs`` are the 0/1
indicator (N…, E) of the active experts instead of probabilities. Those records add
``active_experts`` (the mean number of active experts per token) and ``active_share`` (E,) (the
fraction of tokens each expert is active for) to the statistics of the router's ``token``
entry; they are not routers of their own. Routers without such records get exactly the
statistics they had before.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hmora_ds.losses import entropy
from hmora_ds.routing.context import RouterId, RoutingRecord

#: The record kind of the active-expert indicators (see the module docstring).
ACTIVE_KIND = "active"


class RouterStatsAccumulator:
    """Σ-moments of every router's probabilities; :meth:`finalize` gives the statistics.

    Args:
        k: top-k used for the expert-load shares (None: load = mean probability).
    """

    def __init__(self, k: int | None = None) -> None:
        self.k = k
        self._sums: dict[str, torch.Tensor] = {}
        self._active: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._sums)

    @torch.no_grad()
    def add(self, records: list[RoutingRecord]) -> None:
        """Accumulate the (detached) probabilities of one forward's routing records."""
        for rec in records:
            e = rec.probs.shape[-1]
            p = rec.probs.detach().float().reshape(-1, e)
            m = (
                torch.ones(p.shape[0], device=p.device)
                if rec.mask is None
                else rec.mask.reshape(-1).to(p.dtype)
            )
            mp = p * m.unsqueeze(-1)
            if rec.kind == ACTIVE_KIND:  # Σ active indicator (E,) and the token count
                name = str(RouterId(rec.id.layer, rec.id.targets, "token"))
                row = torch.cat([mp.sum(0), m.sum().reshape(1)])
                prev = self._active.get(name)
                self._active[name] = row if prev is None else prev + row
                continue
            parts = [mp.sum(0), (entropy(p) * m).sum().reshape(1), m.sum().reshape(1)]
            if self.k is not None:
                chosen = torch.zeros_like(p).scatter(-1, p.topk(min(self.k, e), -1).indices, 1.0)
                parts.append((chosen * m.unsqueeze(-1)).sum(0))
            row = torch.cat(parts)
            prev = self._sums.get(rec.name)
            self._sums[rec.name] = row if prev is None else prev + row

    @torch.no_grad()
    def finalize(self, group: Any = None) -> dict[str, dict[str, torch.Tensor]]:
        """Statistics per router (all ranks of ``group`` get the global values); then resets.

        Returns:
            router name → ``balance`` Ĥ(M), ``certainty`` mean Ĥ(p), ``load`` (E,), ``count``;
            with :data:`ACTIVE_KIND` records also ``active_experts`` and ``active_share`` (E,).
        """
        if not self._sums and not self._active:
            return {}
        names = sorted(self._sums)  # the same order on every rank
        active = sorted(self._active)
        flat = torch.cat([self._sums[n] for n in names] + [self._active[n] for n in active])
        if group is not None:
            torch.distributed.all_reduce(flat, group=group)
        out: dict[str, dict[str, torch.Tensor]] = {}
        offset = sum(self._sums[n].numel() for n in names)
        for name in active:
            row = flat[offset : offset + self._active[name].numel()]
            offset += row.numel()
            share = row[:-1] / row[-1].clamp_min(1.0)
            out[name] = {"active_experts": share.sum(), "active_share": share}
        offset = 0
        for name in names:
            row = flat[offset : offset + self._sums[name].numel()]
            offset += row.numel()
            e = (row.numel() - 2) // (2 if self.k is not None else 1)
            count = row[e + 1].clamp_min(1.0)
            mean_p = row[:e] / count
            log_e = math.log(e)
            out[name] = {
                "balance": entropy(mean_p) / log_e,
                "certainty": row[e] / count / log_e,
                "load": row[e + 2 :] / (self.k * count) if self.k is not None else mean_p,
                "count": row[e + 1],
                **out.get(name, {}),
            }
        self._sums.clear()
        self._active.clear()
        return out


def routing_statistics(
    probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    k: int | None = None,
    group: Any = None,
) -> dict[str, torch.Tensor]:
    """Statistics of one router's probabilities (N…, E) with mask (N…); see the accumulator."""
    acc = RouterStatsAccumulator(k)
    rid = RouterId(0, ("x",), "router")
    acc.add([RoutingRecord(rid, probs, mask)])
    return acc.finalize(group)[str(rid)]

"""Rank functions of the two-rank LoraHub search tests, in a module light enough to import in
every spawned rank (numpy, torch and the search only: no model, no transformers)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from hmora_ds.methods.lorahub import l1_penalty, search


def wavy(w: np.ndarray) -> float:
    return float(np.sum((w - 0.6) ** 2) + 0.1 * np.sin(5 * w).sum()) + l1_penalty(w)


def two_rank_search(rank, world, out):
    res = search(wavy, 3, budget=7, seed=0)
    Path(out, f"r{rank}.json").write_text(
        json.dumps({"w": res.weights.tolist(), "evals": res.evaluations, "pid": os.getpid()})
    )


def dying_rank(rank, world, init_file, out):
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=10))  # fmt: skip
    calls = []

    def objective(w):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os._exit(0)  # the rank dies in the middle of the search
        return wavy(w)

    t0 = time.monotonic()
    try:
        search(objective, 3, budget=20, seed=0)
        outcome = "finished"
    except Exception as err:
        outcome = f"raised {type(err).__name__}"
    Path(out, f"r{rank}.txt").write_text(f"{outcome} {time.monotonic() - t0:.1f}")
    os._exit(0)  # no teardown with a dead peer

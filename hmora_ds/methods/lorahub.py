"""LoraHub: a gradient-free weighted sum of a library's LoRAs for a task seen only in examples.

Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition"
(COLM 2024). Given N LoRAs ``(A_i, B_i)`` of one base model and a few examples of a new task,
LoraHub composes one LoRA (paper eq. 1, per adapted linear)::

    A = Σ_i w_i A_i,   B = Σ_i w_i B_i          (so  B A = Σ_i Σ_j w_i w_j B_i A_j)

and chooses ``w ∈ [-1.5, 1.5]^N`` by a gradient-free search (nevergrad's NGOpt, from ``w = 0``)
minimising the examples' cross-entropy plus ``0.05 · mean_i |w_i|`` (paper eq. 2; the official
code's ``default_l1_regularization``). The result is an ordinary plain-LoRA adapter.

LoraHub is not a training method (nothing is trained by gradient): it is not registered with
:mod:`hmora_ds.methods`; ``python -m hmora_ds.library lorahub`` runs it
(:mod:`hmora_ds.library.hub`: loading, examples, the adapter written; docs/methods.md).

* :func:`compose` — the weighted sum of one site's A and B matrices.
* :class:`Composer` — one plain-LoRA :class:`~hmora_ds.model.HMoRAModel` whose ``lora_A`` /
  ``lora_B`` tensors are overwritten with the composition of a candidate ``w`` (no model is
  rebuilt per candidate).
* :func:`cross_entropy` — the mean cross-entropy over every target token of the examples'
  batches (:func:`hmora_ds.library.hub.example_batches` tokenises and collates them as training
  batches).
* :func:`search` — the NGOpt ask/tell loop, candidates split over the ranks of a process group.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("hmora_ds.lorahub")

#: The official code's search settings (``lorahub/algorithm.py``, ``lorahub_learning``).
BOUND = 1.5
L1_WEIGHT = 0.05
DEFAULT_BUDGET = 40
#: What a candidate whose loss is not finite is told to the optimiser (it must stay a number).
NONFINITE = 1e6
PREFIX = "base_model."


class LoraHubError(ValueError):
    """A LoraHub input that cannot be used; one line naming the option and the fix."""


def compose(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = Σ_i w_i A_i`` and ``B = Σ_i w_i B_i`` (paper eq. 1).

    Args:
        As: N tensors of one shape (a site's ``(r, in)`` A matrices).
        Bs: N tensors of one shape (its ``(out, r)`` B matrices).
        weights: ``(N,)``.

    Raises:
        ValueError: empty lists, lengths that differ, shapes that differ, or weights that are
            not a 1-D tensor of N values.
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1:
        raise ValueError(f"compose: weights must be a 1-D tensor, got {_describe(weights)}")
    n = weights.shape[0]
    if len(As) == 0 or len(As) != len(Bs) or len(As) != n:
        raise ValueError(
            f"compose: need as many A matrices, B matrices and weights, got {len(As)} A, "
            f"{len(Bs)} B and {n} weights (and at least one)"
        )
    for name, mats in (("A", As), ("B", Bs)):
        shapes = [tuple(m.shape) for m in mats]
        if len(set(shapes)) != 1:
            raise ValueError(f"compose: the {name} matrices differ in shape: {shapes}")
    w = weights.to(device=As[0].device, dtype=As[0].dtype)
    A = torch.einsum("n,n...->...", w, torch.stack(list(As)))
    B = torch.einsum("n,n...->...", w.to(Bs[0].dtype), torch.stack(list(Bs)))
    return A, B


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def l1_penalty(weights: Sequence[float] | np.ndarray) -> float:
    """``0.05 · mean_i |w_i|`` (the official ``default_l1_regularization``)."""
    w = np.asarray(weights, dtype=np.float64)
    return float(L1_WEIGHT * np.abs(w).mean())


class Composer:
    """A plain-LoRA model whose LoRA tensors are set to the composition of N library LoRAs.

    Args:
        model: a plain LoRA (``method=lora``, one expert) of the library's rank and targets,
            e.g. ``load_adapter(base, library.entries[0].adapter)``.
        loras: N × :func:`hmora_ds.library.load_lora` of the same sites.
    """

    def __init__(self, model: Any, loras: Sequence[dict[str, Any]]) -> None:
        from hmora_ds.methods import adapter_parameters

        if not loras:
            raise LoraHubError("lorahub: no LoRA to compose")
        self.model = model
        self.n = len(loras)
        self.sites: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        params = adapter_parameters(model)
        for name in params:
            if not name.endswith((".lora_A", ".lora_B")):
                raise LoraHubError(f"lorahub: the model has {name}; it must be a plain LoRA")
            if name.endswith(".lora_A"):
                key = name[: -len(".lora_A")].removeprefix(PREFIX)
                self.sites[key] = (params[name], params[name[: -len("A")] + "B"])
        for i, lora in enumerate(loras):
            if set(lora) != set(self.sites):
                missing = sorted(set(self.sites) - set(lora))[:3]
                extra = sorted(set(lora) - set(self.sites))[:3]
                raise LoraHubError(
                    f"lorahub: LoRA {i} adapts other layers than the model (missing {missing}, "
                    f"extra {extra}); every LoRA of a library must share its targets"
                )
        self.As = {k: [lora[k].A for lora in loras] for k in self.sites}
        self.Bs = {k: [lora[k].B for lora in loras] for k in self.sites}
        for k, (pa, pb) in self.sites.items():
            if tuple(self.As[k][0].shape) != tuple(pa.shape):
                raise LoraHubError(
                    f"lorahub: {k}: LoRA A of shape {tuple(self.As[k][0].shape)}, the model "
                    f"expects {tuple(pa.shape)}; every LoRA of a library must share its rank"
                )
            if tuple(self.Bs[k][0].shape) != tuple(pb.shape):
                raise LoraHubError(
                    f"lorahub: {k}: LoRA B of shape {tuple(self.Bs[k][0].shape)},"
                    f" the model expects {tuple(pb.shape)}"
                )

    @torch.no_grad()
    def set_weights(self, weights: Sequence[float] | np.ndarray | torch.Tensor) -> None:
        """Overwrite every site's ``lora_A`` / ``lora_B`` with the composition for ``weights``."""
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32)
        if w.shape != (self.n,):
            raise ValueError(f"set_weights: expected {self.n} weights, got shape {tuple(w.shape)}")
        for k, (pa, pb) in self.sites.items():
            A, B = compose(self.As[k], self.Bs[k], w)
            pa.copy_(A.to(device=pa.device, dtype=pa.dtype))
            pb.copy_(B.to(device=pb.device, dtype=pb.dtype))


@torch.no_grad()
def cross_entropy(model: Any, batches: list[dict[str, torch.Tensor]], device: Any = "cpu") -> float:
    """Mean next-token cross-entropy over every target token of ``batches``, without the label
    smoothing a training config may set (the official objective is the plain LM loss)."""
    import torch.nn.functional as F

    total = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")[:, 1:]
        logits = model(**batch, return_router_stats=False).logits[:, :-1].float()
        total += (
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            .double()
            .cpu()
        )
        tokens += (labels != -100).sum().double().cpu()
    return float(total / tokens.clamp_min(1))


@dataclass
class SearchResult:
    """What :func:`search` found.

    Attributes:
        weights: the best evaluated ``w`` (lowest objective; the first such on a tie).
        objective: its objective (loss + L1 term).
        start_objective: the objective at the start ``w = 0`` (always evaluated first).
        evaluations: every evaluated ``(w, objective)``, in the order they were asked.
        optimizer: the optimiser NGOpt chose.
    """

    weights: np.ndarray
    objective: float
    start_objective: float
    evaluations: list[tuple[list[float], float]] = field(default_factory=list)
    optimizer: str = ""
    seconds: float = 0.0


def search(
    objective: Callable[[np.ndarray], float],
    n: int,
    budget: int = DEFAULT_BUDGET,
    seed: int = 0,
    *,
    group: Any = None,
    progress: bool = False,
) -> SearchResult:
    """Minimise ``objective(w)`` over ``w ∈ [-1.5, 1.5]^n`` with nevergrad's NGOpt.

    ``w = 0`` (the official starting point) is the first candidate, so the result is never
    worse than the start. With a process group of W > 1 ranks (``torch.distributed``
    initialised), rank 0 asks W candidates at a time (``num_workers=W``), broadcasts them,
    rank r evaluates the r-th, the objectives are all-reduced and rank 0 tells them; every
    rank returns the same result. A rank that dies makes the others' collective fail after the
    process group's timeout instead of waiting forever.
    """
    import nevergrad as ng
    import torch.distributed as dist

    if budget < 1:
        raise LoraHubError(f"--budget: must be >= 1, got {budget}")
    if n < 1:
        raise LoraHubError("lorahub: no LoRA to compose")
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    start = np.zeros(n)
    opt = None
    if rank == 0:
        param = ng.p.Array(init=start, lower=np.full(n, -BOUND), upper=np.full(n, BOUND))
        param.random_state = np.random.RandomState(seed)
        opt = ng.optimizers.NGOpt(parametrization=param, budget=budget, num_workers=world)
    evaluations: list[tuple[list[float], float]] = []
    pending: list[Any] = []  # asked by the optimiser, not evaluated yet
    t0 = time.time()
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=budget, desc="lorahub", unit="cand", disable=None)
    try:
        while len(evaluations) < budget:
            k = min(world, budget - len(evaluations))
            cands: list[Any] = []
            W = torch.zeros(k, n, dtype=torch.float64)
            if rank == 0:
                if not evaluations:
                    # The start first: NGOpt's own first candidate when it is w = 0 (as with
                    # one worker), else w = 0 told unasked and that candidate kept for later.
                    first = opt.ask()
                    if np.allclose(first.value, start):
                        cands.append(first)
                    else:
                        cands.append(opt.parametrization.spawn_child(new_value=start))
                        pending.append(first)
                while len(cands) < k:
                    cands.append(pending.pop(0) if pending else opt.ask())
                for i, c in enumerate(cands):
                    W[i] = torch.as_tensor(c.value, dtype=torch.float64)
            if world > 1:
                dist.broadcast(W, 0, group=group)
            vals = torch.zeros(k, dtype=torch.float64)
            if rank < k:
                v = float(objective(W[rank].numpy().copy()))
                vals[rank] = v if math.isfinite(v) else NONFINITE
            if world > 1:
                dist.all_reduce(vals, group=group)
            for i in range(k):
                if rank == 0:
                    opt.tell(cands[i], float(vals[i]))
                evaluations.append((W[i].tolist(), float(vals[i])))
            if bar is not None:
                best = min(v for _, v in evaluations)
                bar.set_postfix(best=f"{best:.4f}", refresh=False)
                bar.update(k)
    finally:
        if bar is not None:
            bar.close()
    best_i = min(range(len(evaluations)), key=lambda i: evaluations[i][1])
    name = ""
    if opt is not None:
        name = getattr(getattr(opt, "optim", None), "name", "") or type(opt).__name__
    return SearchResult(
        weights=np.asarray(evaluations[best_i][0]),
        objective=evaluations[best_i][1],
        start_objective=evaluations[0][1],
        evaluations=evaluations,
        optimizer=name,
        seconds=time.time() - t0,
    )


def few_shot_objective(
    composer: Composer, batches: list[dict[str, torch.Tensor]], device: Any = "cpu"
) -> Callable[[np.ndarray], float]:
    """``w ↦ cross-entropy of the composed LoRA on the examples + 0.05 · mean|w|``."""

    def objective(w: np.ndarray) -> float:
        composer.set_weights(w)
        return cross_entropy(composer.model, batches, device) + l1_penalty(w)

    return objective


__all__ = [
    "BOUND",
    "DEFAULT_BUDGET",
    "L1_WEIGHT",
    "Composer",
    "LoraHubError",
    "SearchResult",
    "compose",
    "cross_entropy",
    "few_shot_objective",
    "l1_penalty",
    "search",
]

"""Routing statistics of the paper's analysis as pure functions (appendix E.4, E.8; spec §9).

Shapes: ``N`` routing decisions (tokens of a token router, sequences of a task router), ``E``
experts, ``K`` the top-k of the routing.

* balance ``Ĥ(M)`` and certainty ``mean Ĥ(p)`` (figure 3) and expert activation shares (table 13)
  come from :mod:`hmora_ds.metrics`, the same code that logs them during training;
* the *main expert pair* (MEP) of a task and its share, and the recognition rate (tables 14-16);
* the t-SNE embedding of task-router gates (figure 4).

The MEP, as the paper defines it (appendix E.8): top-2 routing activates two experts per sample,
an *expert pair*; "for each task, we identified the most frequently activated expert pair from
the 100 samples as the main expert pair", and its share is the fraction of the task's samples
that activate exactly that pair. Points the paper leaves open, resolved here:

* a pair is an **unordered set** of the K experts with the largest probability (written
  ascending, as the paper's "(3, 6)"); equal probabilities are broken towards the lower expert
  index, so the result does not depend on ``torch.topk``'s order for ties;
* several pairs can be equally frequent: the MEP is then the smallest of them in ascending
  (lexicographic) order. The share, and so recognition, is the same whichever is chosen;
* with K ≠ 2 the same definition applies to K-sets ("main expert set");
* a task is *recognised* at threshold t when its MEP share ≥ t (the paper's "exceeds", read as
  ≥ because its own table has a column "≥ 1").
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hmora_ds.metrics import routing_statistics

logger = logging.getLogger(__name__)

#: Thresholds of the paper's table 14; a task is "recognisable" at 0.8.
RECOGNITION_THRESHOLDS = (0.7, 0.8, 0.9, 1.0)
RECOGNISED_AT = 0.8


def balance_certainty(probs: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """Balance ``Ĥ(M)`` and certainty ``mean Ĥ(p)`` of a probability table (N…, E).

    Balance is 1 when the mean distribution is uniform and 0 when every decision picks the
    same expert; certainty (mean normalised entropy) is 1 for uniform rows and 0 for one-hot
    rows, so *lower* certainty values mean *more certain* routing (the paper's figure 3).
    """
    stats = routing_statistics(probs, mask)
    return float(stats["balance"]), float(stats["certainty"])


def activation_shares(probs: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> list[float]:
    """Share of the top-k selections that go to each expert (table 13); sums to 1.

    Every decision activates ``k`` experts, so one expert's share is at most ``1/k``.
    """
    e = probs.shape[-1]
    if not 1 <= k <= e:
        raise ValueError(f"top_k: must lie in [1, {e}] for {e} experts, got {k}")
    return [float(x) for x in routing_statistics(probs, mask, k=k)["load"]]


def expert_sets(probs: torch.Tensor, k: int) -> list[tuple[int, ...]]:
    """The ascending tuple of the ``k`` most probable experts of each row of ``probs`` (N, E).

    Ties go to the lower expert index (a stable sort), whatever ``torch.topk`` would do.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs: expected (N, E), got shape {tuple(probs.shape)}")
    e = probs.shape[-1]
    if not 1 <= k <= e:
        raise ValueError(f"top_k: must lie in [1, {e}] for {e} experts, got {k}")
    order = torch.sort(probs.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return [tuple(sorted(row)) for row in order.tolist()]


@dataclass(frozen=True)
class MainExpertPair:
    """The MEP of one task.

    Attributes:
        n: number of samples of the task.
        pair: the main expert pair (ascending expert indices; K of them).
        share: fraction of the task's samples whose top-k set is exactly ``pair``.
        tied: other pairs exactly as frequent as ``pair`` (usually empty).
    """

    n: int
    pair: tuple[int, ...]
    share: float
    tied: tuple[tuple[int, ...], ...] = ()


def main_expert_pairs(
    tasks: Sequence[str], probs: torch.Tensor, k: int = 2
) -> dict[str, MainExpertPair]:
    """Per task, the main expert pair and its share (appendix E.8; see the module docstring).

    Args:
        tasks: the task of each sample (length N).
        probs: (N, E) the task router's probabilities of each sample.
        k: experts per decision (the routing's top-k; the paper: 2).

    Returns:
        task → :class:`MainExpertPair`, tasks in sorted order.
    """
    if len(tasks) != probs.shape[0]:
        raise ValueError(f"tasks: {len(tasks)} labels for {probs.shape[0]} rows of probabilities")
    per_task: dict[str, Counter] = {}
    for task, pair in zip(tasks, expert_sets(probs, k), strict=True):
        per_task.setdefault(task, Counter())[pair] += 1
    out = {}
    for task in sorted(per_task):
        counts = per_task[task]
        n = sum(counts.values())
        top = max(counts.values())
        best = sorted(p for p, c in counts.items() if c == top)
        out[task] = MainExpertPair(n=n, pair=best[0], share=top / n, tied=tuple(best[1:]))
    return out


def recognition_rates(
    meps: Mapping[str, MainExpertPair] | Iterable[MainExpertPair],
    thresholds: Sequence[float] = RECOGNITION_THRESHOLDS,
) -> dict[str, float]:
    """Fraction of tasks whose MEP share is ≥ each threshold (table 14), keyed ``"0.8"`` etc."""
    values = list(meps.values()) if isinstance(meps, Mapping) else list(meps)
    if not values:
        raise ValueError("recognition_rates: no tasks")
    # count/n compared with the literal threshold is exact for the paper's thresholds (7/10 is
    # the same double as 0.7); multiplying the threshold by n instead is not (0.7·10 > 7).
    return {_threshold_key(t): sum(m.share >= t for m in values) / len(values) for t in thresholds}


def _threshold_key(t: float) -> str:
    return f"{t:.1f}" if round(t, 1) == t else str(t)


def tsne_embedding(
    gates: np.ndarray | torch.Tensor, *, seed: int = 0, perplexity: float = 30.0
) -> tuple[np.ndarray, list[str]]:
    """2-D t-SNE of task-router gates (N, E) with a fixed seed (figure 4).

    The perplexity must stay below the sample count (scikit-learn refuses ``perplexity ≥ N``,
    and its Barnes-Hut search looks at ``3·perplexity`` neighbours): it is clamped to
    ``max((N − 1) / 3, 1)`` with a note. The paper's 57 × 100 samples never need it; a small
    analysis does.

    Returns:
        ((N, 2) embedding, notes).

    Raises:
        ValueError: fewer than 3 samples (t-SNE has nothing to arrange).
    """
    from sklearn.manifold import TSNE

    x = gates.detach().float().cpu().numpy() if isinstance(gates, torch.Tensor) else gates
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"t-SNE: needs at least 3 samples, got {n}")
    notes = []
    limit = max((n - 1) / 3, 1.0)
    if perplexity > limit:
        clamped = round(limit, 2)
        notes.append(f"t-SNE perplexity clamped from {perplexity:g} to {clamped:g} ({n} samples)")
        logger.info(notes[-1])
        perplexity = clamped
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(x), notes


#: Below this mean squared distance of the rows from their mean, rows count as equal: fp32
#: probabilities round at ~1e-7 (squared ~1e-14), and a collapsed router's gates differ by that
#: rounding only, whose split is meaningless; a real, small spread (1e-5 → 1e-10) is kept.
CONSTANT_ROWS = 1e-12


def between_task_share(x: np.ndarray, tasks: Sequence[str]) -> float:
    """Share of the total variance of the rows of ``x`` (N, D) that lies between tasks:
    Σ_t n_t ‖μ_t − μ‖² / Σ_i ‖x_i − μ‖² (1 = every task a single point, 0 = tasks alike;
    NaN when the rows are equal up to :data:`CONSTANT_ROWS`)."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(list(tasks))
    if x.ndim != 2 or len(labels) != x.shape[0]:
        raise ValueError(f"between_task_share: need (N, D) rows and N tasks, got {x.shape}")
    mu = x.mean(axis=0)
    total = ((x - mu) ** 2).sum()
    between = sum(
        (labels == t).sum() * ((x[labels == t].mean(axis=0) - mu) ** 2).sum()
        for t in np.unique(labels)
    )
    if total <= CONSTANT_ROWS * len(x):
        return float("nan")
    return float(between / total)

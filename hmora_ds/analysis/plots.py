"""The paper's routing figures, drawn headless (matplotlib's Agg backend).

* :func:`plot_routing_entropy` — figure 3: balance ``Ĥ(M)`` (dotted) and certainty
  ``mean Ĥ(p)`` (solid) of every router across layers, one colour per dense-layer group, one
  panel per router kind;
* :func:`plot_task_tsne` — figure 4: t-SNE of the final task router's gates, one colour per task.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: More tasks than this: no legend (it would cover the figure); a note says so.
MAX_LEGEND_TASKS = 60
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines or CI
    import matplotlib.pyplot as plt

    return plt


def plot_routing_entropy(routers: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Figure 3 from ``routing.json``'s ``routers``; writes a PNG and returns its path."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    kinds = [k for k in ("token", "task") if any(r["kind"] == k for r in routers.values())]
    fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(6.5 * max(len(kinds), 1), 4.5))
    axes = np.atleast_1d(axes)
    if not kinds:
        axes[0].text(0.5, 0.5, "no routers in this adapter", ha="center", va="center")
        axes[0].set_axis_off()
    types = sorted({r["layer_type"] for r in routers.values()})
    colours = dict(zip(types, plt.get_cmap("tab10").colors, strict=False))
    for ax, kind in zip(axes, kinds, strict=False):
        for layer_type in types:
            rows = sorted(
                (r["layer"], r["balance"], r["certainty"])
                for r in routers.values()
                if r["kind"] == kind and r["layer_type"] == layer_type
            )
            if not rows:
                continue
            layers, balance, certainty = zip(*rows, strict=True)
            c = colours.get(layer_type)
            ax.plot(layers, balance, ":", marker=".", color=c, label=f"{layer_type} balance")
            ax.plot(layers, certainty, "-", marker=".", color=c, label=f"{layer_type} certainty")
        ax.set_title(f"{kind} routers")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("normalised entropy Ĥ")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        "Balance Ĥ(M) (dotted, higher = more balanced) and "
        "certainty mean Ĥ(p) (solid, lower = more certain)",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_task_tsne(
    embedding: np.ndarray, tasks: Sequence[str], path: str | Path, *, title: str
) -> tuple[Path, list[str]]:
    """Figure 4: the (N, 2) embedding coloured by task; returns the PNG path and notes."""
    plt = _pyplot()
    names = sorted(set(tasks))
    notes = []
    # Enough distinct colours for MMLU's 57 subjects: an evenly sampled cyclic map, with the
    # marker shape changing too so that neighbouring hues stay distinguishable.
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "gist_rainbow")
    labels = np.asarray(tasks)
    legend = len(names) <= MAX_LEGEND_TASKS
    fig, ax = plt.subplots(figsize=(11 if legend and len(names) > 10 else 8, 7))
    for i, name in enumerate(names):
        pts = embedding[labels == name]
        colour = cmap(i if len(names) <= 10 else i / len(names))
        marker = _MARKERS[i % len(_MARKERS)] if len(names) > 10 else "o"
        ax.scatter(pts[:, 0], pts[:, 1], s=14, color=colour, marker=marker, label=name, alpha=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend:
        ncol = 1 if len(names) <= 20 else 2
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=6 if ncol > 1 else 8,
            ncol=ncol,
            frameon=False,
            markerscale=1.2,
        )
    else:
        notes.append(f"t-SNE legend omitted: {len(names)} tasks (more than {MAX_LEGEND_TASKS})")
        logger.info(notes[-1])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path, notes

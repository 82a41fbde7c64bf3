"""``routing.md``: the analysis document as Markdown tables in the paper's layouts.

Table 13 (expert activation shares per router), table 14 (recognition rates), tables 15/16
(main expert pairs: tasks per MEP and how many are recognised), the per-task MEP list, and the
balance / certainty numbers behind figure 3. Everything is read from the ``routing.json``
document, so the Markdown never disagrees with the JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hmora_ds.analysis.stats import RECOGNISED_AT


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _pair(p: list[int] | None) -> str:
    return "–" if p is None else "(" + ", ".join(str(i) for i in p) + ")"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _activation_table(doc: Mapping[str, Any]) -> list[str]:
    routers = doc["routers"]
    if not routers:
        return ["No routers in this adapter."]
    e = len(next(iter(routers.values()))["load"])
    mep = doc["meta"].get("mep_router")
    # Task routers first (the paper's table 13 is about the task router), the MEP one on top.
    names = sorted(routers, key=lambda n: (n != mep, routers[n]["kind"] != "task"))
    rows = []
    for name in names:
        r = routers[name]
        label = f"**{name}** (MEP)" if name == mep else name
        rows.append([label, *(f"{100 * x:.2f}" for x in r["load"])])
    return _table(["Router \\ expert", *(str(i) for i in range(e))], rows)


def _entropy_table(doc: Mapping[str, Any]) -> list[str]:
    rows = [
        [
            name,
            r["kind"],
            str(r["layer"]),
            r["layer_type"],
            _num(r["balance"]),
            _num(r["certainty"]),
        ]
        for name, r in doc["routers"].items()
    ]
    return _table(["Router", "kind", "layer", "type", "balance Ĥ(M)", "certainty mean Ĥ(p)"], rows)


def _mep_tables(doc: Mapping[str, Any]) -> list[str]:
    tasks = doc["tasks"]
    groups: dict[tuple[int, ...], list[float]] = {}
    for t in tasks.values():
        groups.setdefault(tuple(t["mep"]), []).append(t["share"])
    order = sorted(groups, key=lambda p: (-len(groups[p]), p))
    cols = [*order, None]

    def recognised(shares: list[float]) -> int:
        return sum(s >= RECOGNISED_AT for s in shares)

    all_shares = [t["share"] for t in tasks.values()]
    counts = [groups[p] if p is not None else all_shares for p in cols]
    header = ["Main expert pair", *(_pair(list(p)) if p else "All" for p in cols)]
    rows = [
        ["All tasks", *(str(len(s)) for s in counts)],
        [f"MEP share ≥ {RECOGNISED_AT}", *(str(recognised(s)) for s in counts)],
        ["Ratio", *(_pct(recognised(s) / len(s)) for s in counts)],
    ]
    per_task = [
        [
            name,
            str(t["n"]),
            _pair(t["mep"]),
            _pct(t["share"]),
            "yes" if t["share"] >= RECOGNISED_AT else "no",
        ]
        for name, t in sorted(tasks.items(), key=lambda kv: (-kv[1]["share"], kv[0]))
    ]
    return [
        *_table(header, rows),
        "",
        "Per task (most consistent first):",
        "",
        *_table(["Task", "n", "MEP", "share", f"recognised (≥ {RECOGNISED_AT})"], per_task),
    ]


def routing_markdown(doc: Mapping[str, Any], figures: Mapping[str, str] | None = None) -> str:
    """The Markdown report of a ``routing.json`` document (``figures``: caption → file name)."""
    meta, summary = doc["meta"], doc["summary"]
    lines = [
        "# Routing analysis",
        "",
        f"- model: `{meta.get('model')}`, adapter: `{meta.get('adapter')}`",
        f"- data: `{meta.get('data')}`: "
        f"{meta['num_examples']} examples of {meta['num_tasks']} tasks"
        + (
            f" ({meta['skipped_examples']} too long, skipped)"
            if meta.get("skipped_examples")
            else ""
        ),
        f"- routing: {meta.get('routing_mode')}, top-k {meta['top_k']}; MEP / t-SNE router: "
        f"`{meta.get('mep_router')}`",
        "",
        "## Summary",
        "",
        *_table(
            ["", "balance Ĥ(M) (1 = balanced)", "certainty mean Ĥ(p) (0 = certain)"],
            [
                [
                    "token routers (mean)",
                    _num(summary["token_balance"]),
                    _num(summary["token_certainty"]),
                ],
                [
                    "task routers (mean)",
                    _num(summary["task_balance"]),
                    _num(summary["task_certainty"]),
                ],
            ],
        ),
        "",
        "## Recognition (table 14)",
        "",
    ]
    rec = summary["recognition"]
    if rec is None:
        lines.append("No task routers: nothing to recognise.")
    else:
        lines += _table(
            ["Proportion threshold", *(f"≥ {k}" for k in rec)],
            [["tasks whose MEP share reaches it", *(_pct(v) for v in rec.values())]],
        )
        share = summary.get("task_gate_between_share")
        if share is not None:
            lines += [
                "",
                f"Distinct main expert pairs: {summary.get('distinct_meps')}. Share of the "
                f"MEP router's gate variance between tasks: {_num(share)} (1 = every task "
                "routed alike within itself, 0 = tasks indistinguishable).",
            ]
        lines += ["", "## Main expert pairs (tables 15 and 16)", "", *_mep_tables(doc)]
    lines += [
        "",
        "## Expert activation shares (table 13), % of top-k selections",
        "",
        *_activation_table(doc),
        "",
        "## Balance and certainty per router (figure 3)",
        "",
        *_entropy_table(doc),
    ]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"- {caption}: ![{caption}]({name})" for caption, name in figures.items()]
    if meta.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in meta["notes"])]
    return "\n".join(lines) + "\n"

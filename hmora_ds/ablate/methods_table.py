"""The ``methods`` study's tables: every registered method trained alike, side by side.

Per row: the trainable share (TP), the training step time (training seconds / optimizer steps,
on the row's own launcher and cores: compare rows of one run, not across machines), the best
held-out LM loss that chose the checkpoint, each benchmark's accuracy and their average with a
95 % confidence interval, the average's difference to the reference row (LoRA), and the routing
statistics of the row's analysis (token-router certainty and balance; the mean number of
experts a token uses where a method routes to a variable number).

Intervals as in the ``ood`` study (:mod:`hmora_ds.ablate.ood_table`): with one seed over the
questions (:mod:`hmora_ds.eval.compare`, the average treating its benchmarks as independent,
the difference paired per question), with several seeds Student t over the seeds.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from hmora_ds.ablate.ood_table import Estimate, RowStats, reference_results, row_stats
from hmora_ds.ablate.studies import METHODS_REFERENCE, Study
from hmora_ds.ablate.table import TableRow, ci95_half_width
from hmora_ds.eval.benchmarks import DISPLAY
from hmora_ds.eval.ood import Split

#: Routing columns: (csv name, header, key in the analysis summary, digits).
ROUTING = (
    ("token_certainty", "Tok. cert.", "token_certainty", 3),
    ("token_balance", "Tok. bal.", "token_balance", 3),
    ("active_experts", "Experts/token", "active_experts", 2),
)


def _mean_ci(values: list[float]) -> tuple[float, float | None] | None:
    """Mean over seeds and the t half-width (None with one seed); None without values."""
    import statistics

    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, ci95_half_width(statistics.stdev(values), len(values))


def _fmt(mc: tuple[float, float | None] | None, digits: int) -> str:
    if mc is None:
        return "—"
    mean, half = mc
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def train_numbers(records: list[dict[str, Any]]) -> dict[str, tuple[float, float | None] | None]:
    """Seconds per optimizer step and the best validation loss, over the row's seeds."""
    step_s, val = [], []
    for rec in records:
        tr = rec.get("stages", {}).get("train", {})
        if tr.get("steps") and tr.get("train_seconds") is not None:
            step_s.append(tr["train_seconds"] / tr["steps"])
        best = tr.get("best") or {}
        if best.get("metric") == "val_loss" and best.get("value") is not None:
            val.append(best["value"])
        elif tr.get("val_loss") is not None:  # a library LoRA: its own run's best loss
            val.append(tr["val_loss"])
    return {"step_s": _mean_ci(step_s), "val_loss": _mean_ci(val)}


def routing_numbers(records: list[dict[str, Any]]) -> dict[str, tuple[float, float | None] | None]:
    """The analysis summary's routing statistics over the row's seeds (None where absent)."""
    out = {}
    for key, _, field, _ in ROUTING:
        values = [
            rec["metrics"]["routing"][field]
            for rec in records
            if isinstance(rec.get("metrics", {}).get("routing", {}).get(field), (int, float))
        ]
        out[key] = _mean_ci(values)
    return out


def _split(rows: list[TableRow]) -> Split:
    """Every evaluated benchmark, in evaluation order, as one group (``ID`` = the average)."""
    from hmora_ds.ablate.ood_table import read_results

    order: list[str] = []
    for tr in rows:
        for rec in tr.records:
            for b in read_results(rec) or {}:
                if b not in order:
                    order.append(b)
    return Split(tuple(order), ())


def _tp(tr: TableRow) -> float | None:
    return next(
        (r["tp_percent"] for r in tr.records if r.get("tp_percent") is not None), tr.tp_percent
    )


def markdown(study: Study, rows: list[TableRow], setting: str) -> str:
    """``table.md`` of the ``methods`` study."""
    split = _split(rows)
    ref_name = study.reference or METHODS_REFERENCE
    ref_row, reference = reference_results(rows, ref_name)
    ref_label = ref_row.row.labels.get("Method", ref_name) if ref_row else ref_name
    computed: list[tuple[TableRow, RowStats | None]] = [
        (tr, row_stats(tr.records, reference, split)) for tr in rows
    ]
    ns = {s.accuracy["ID"].n for _, s in computed if s and "ID" in s.accuracy}
    n_avg = ns.pop() if len(ns) == 1 else None
    head = [*study.columns, "TP", "s/step", "Val. loss",
            "Avg" + (f" (n = {n_avg})" if n_avg else ""), f"Δ Avg vs {ref_label}",
            *(h for _, h, _, _ in ROUTING), "Seeds"]  # fmt: skip
    lines = [
        f"## {study.title}",
        "",
        "Accuracy %, [95 % CI]; Δ in points, paired per question with the reference row. "
        "s/step: training seconds per optimizer step (same launcher and cores for every row).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    notes: list[str] = []
    for tr, s in computed:
        cells = [tr.row.labels.get(c, "") for c in study.columns]
        tp = _tp(tr)
        cells.append("—" if tp is None else f"{tp:.2f}%")
        train = train_numbers(tr.records)
        cells += [_fmt(train["step_s"], 1), _fmt(train["val_loss"], 3)]
        avg: Estimate | None = s.accuracy.get("ID") if s else None
        cells.append("—" if avg is None else avg.cell())
        if tr.row.name == ref_name:
            cells.append("(reference)")
        else:
            d = s.delta.get("ID") if s else None
            cells.append("—" if d is None else d.cell(signed=True))
        routing = routing_numbers(tr.records)
        cells += [_fmt(routing[key], digits) for key, _, _, digits in ROUTING]
        cells.append(",".join(str(x) for x in s.seeds) if s else "—")
        lines.append("| " + " | ".join(cells) + " |")
        for seed, why in sorted(tr.missing.items()):
            notes.append(f"- {tr.row.name} seed {seed}: {why}")
    benches = [b for b in split.id if any(s and b in s.accuracy for _, s in computed)]
    if benches:
        lines += ["", "### Per benchmark", "",
                  "| " + " | ".join([*study.columns, *(DISPLAY[b] for b in benches)]) + " |",
                  "|" + "---|" * (len(study.columns) + len(benches))]  # fmt: skip
        for tr, s in computed:
            cells = [tr.row.labels.get(c, "") for c in study.columns]
            cells += ["—" if not s or b not in s.accuracy else s.accuracy[b].cell()
                      for b in benches]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", setting]
    lines.append(
        "CI: one seed — normal interval over the questions (hmora_ds.eval.compare; the average "
        "treats its benchmarks as independent); several seeds — Student t over the seeds. Δ is "
        "paired per question (— where the questions differ or the reference row is missing). "
        "Routing: the analysis of the row's adapter (— for rows without routers)."
    )
    if notes:
        lines += ["", "Not in the table:", *notes]
    return "\n".join(lines) + "\n"


def csv_text(study: Study, rows: list[TableRow]) -> str:
    """``table.csv``: per row, TP, step time, validation loss, every accuracy with its interval
    and n, the difference to the reference, and the routing statistics."""
    split = _split(rows)
    _, reference = reference_results(rows, study.reference or METHODS_REFERENCE)
    keys = [*split.id, "ID"]
    head = ["row", *study.columns, "seeds", "tp_percent", "step_s", "val_loss"]
    for k in keys:
        name = "average" if k == "ID" else k
        head += [f"{name}_acc", f"{name}_low", f"{name}_high", f"{name}_n"]
    head += ["average_delta", "average_delta_low", "average_delta_high"]
    head += [key for key, _, _, _ in ROUTING]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)

    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.6f}"

    for tr in rows:
        s = row_stats(tr.records, reference, split)
        train, routing = train_numbers(tr.records), routing_numbers(tr.records)
        line: list[Any] = [tr.row.name, *(tr.row.labels.get(c, "") for c in study.columns)]
        line.append(" ".join(str(x) for x in s.seeds) if s else "")
        line += [fmt(_tp(tr))] + [fmt(train[k][0] if train[k] else None)
                                  for k in ("step_s", "val_loss")]  # fmt: skip
        for k in keys:
            e = s.accuracy.get(k) if s else None
            line += ["", "", "", ""] if e is None else [fmt(e.value), fmt(e.low), fmt(e.high), e.n]
        d = s.delta.get("ID") if s else None
        line += ["", "", ""] if d is None else [fmt(d.value), fmt(d.low), fmt(d.high)]
        line += [fmt(routing[key][0] if routing[key] else None) for key, _, _, _ in ROUTING]
        writer.writerow(line)
    return buf.getvalue()


def write_methods_tables(out: Path, study: Study, rows: list[TableRow], setting: str) -> Path:
    """Write ``table.md`` and ``table.csv`` into ``out``; returns the markdown path."""
    md = out / "table.md"
    md.write_text(markdown(study, rows, setting))
    (out / "table.csv").write_text(csv_text(study, rows))
    return md

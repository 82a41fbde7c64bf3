"""``table.md`` and ``table.csv``: one line per grid point, in the paper's layout.

Columns: the study's label columns (``RM``, ``γ_c``, ``Method`` …), TP %, the evaluated
benchmarks in the paper's order (accuracy %), their average, and, when the rows were analysed,
token-router certainty and balance (normalised entropies, mean over routers) and the share of
MMLU subjects recognised by the task routers at 0.8, the number of distinct main expert pairs
and the share of the task router's gate variance that lies between tasks. With several seeds a
cell is ``mean ± h``, h the half-width of the 95 % confidence interval of the mean over seeds
(Student t, n − 1 degrees of freedom), and the seeds are listed; the CSV has the mean, the
sample standard deviation and h.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmora_ds.ablate.studies import Row, Study
from hmora_ds.eval.benchmarks import BENCHMARKS, DISPLAY

#: Routing-analysis columns: (csv name, header, path in routing.json's summary, format).
#: Rec@0.8 alone can mislead: a task router that sends every task to the same pair
#: "recognises" all of them, hence the number of distinct main expert pairs beside it.
ROUTING_COLUMNS = (
    ("token_certainty", "Tok. cert.", ("token_certainty",), "fraction"),
    ("token_balance", "Tok. bal.", ("token_balance",), "fraction"),
    ("recognition_0.8", "Rec@0.8 %", ("recognition", "0.8"), "percent"),
    ("distinct_meps", "MEPs", ("distinct_meps",), "count"),
    ("task_gate_between_share", "Gate var. between", ("task_gate_between_share",), "fraction"),
)
_FORMATS = {"fraction": (1.0, 3), "percent": (100.0, 1), "count": (1.0, 1)}
#: Also in the CSV (not in the markdown, to keep it the paper's width).
ROUTING_CSV_ONLY = (
    ("task_certainty", ("task_certainty",)),
    ("task_balance", ("task_balance",)),
)


@dataclass
class TableRow:
    """A grid point with its finished records (one per seed) and why any are missing."""

    row: Row
    records: list[dict[str, Any]]
    missing: dict[int, str]
    tp_percent: float | None = None  # from the meta-device count, for rows not run yet


#: Student t 0.975 quantiles for 1…30 degrees of freedom (written out: SciPy is only an
#: optional dependency, and a table of the 30 values a study can need is exact enough).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def ci95_half_width(std: float, n: int) -> float:
    """Half-width of the 95 % t confidence interval of a mean of ``n`` >= 2 values."""
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return t * std / n**0.5


def _stats(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "—"
    mean, std = _stats([v * scale for v in values])
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {ci95_half_width(std, len(values)):.{digits}f}"


def _dig(doc: Any, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return float(doc) if isinstance(doc, (int, float)) else None


def _collect(records: Iterable[dict[str, Any]], fn) -> list[float]:
    return [v for v in (fn(r) for r in records) if v is not None]


def _columns(rows: list[TableRow]) -> tuple[list[str], bool, dict[str, str]]:
    """Benchmarks to show (paper order), whether routing metrics exist, stand-ins."""
    recs = [r for tr in rows for r in tr.records]
    seen = {b for r in recs for b in r["metrics"].get("accuracy", {})}
    seen |= {b for r in recs for b in r["metrics"].get("unavailable", [])}
    stand_in = {b: s for r in recs for b, s in r["metrics"].get("stand_in", {}).items()}
    routed = any(r["metrics"].get("routing") for r in recs)
    return [b for b in BENCHMARKS if b in seen], routed, stand_in


def _tp_value(tr: TableRow) -> float | None:
    values = _collect(tr.records, lambda r: r.get("tp_percent"))
    return values[0] if values else tr.tp_percent


def _tp(tr: TableRow) -> str:
    value = _tp_value(tr)
    return "—" if value is None else f"{value:.2f}%"


def markdown(study: Study, rows: list[TableRow], setting: str) -> str:
    benches, routed, stand_in = _columns(rows)
    head = [*study.columns, "TP"]
    head += [DISPLAY[b] + ("†" if b in stand_in else "") for b in benches] + ["Avg"]
    if routed:
        head += [h for _, h, _, _ in ROUTING_COLUMNS]
    head.append("Seeds")
    lines = [f"## {study.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    for tr in rows:
        cells = [tr.row.labels.get(c, "") for c in study.columns] + [_tp(tr)]
        for b in benches:
            acc = _collect(tr.records, lambda r, b=b: r["metrics"].get("accuracy", {}).get(b))
            na = tr.records and all(b in r["metrics"].get("unavailable", []) for r in tr.records)
            cells.append("n/a" if na else _cell(acc))
        cells.append(_cell(_collect(tr.records, lambda r: r["metrics"].get("average"))))
        if routed:
            for _, _, path, fmt in ROUTING_COLUMNS:
                vals = _collect(tr.records, lambda r, p=path: _dig(r["metrics"].get("routing"), p))
                cells.append(_cell(vals, *_FORMATS[fmt]))
        cells.append(",".join(str(r["seed"]) for r in tr.records) or "—")
        lines.append("| " + " | ".join(cells) + " |")
        for seed, why in sorted(tr.missing.items()):
            notes.append(f"- {tr.row.name} seed {seed}: {why}")
    lines += ["", setting]
    if benches and len(benches) < len(BENCHMARKS):
        shown = ", ".join(DISPLAY[b] for b in benches)
        lines.append(
            f"Avg is over the evaluated benchmarks ({shown}), not the paper's seven: "
            "compare rows with each other, not with the paper's numbers."
        )
    for b, s in stand_in.items():
        lines.append(f"† {DISPLAY[b]}: {s}.")
    if routed:
        lines.append(
            "Tok. cert. / Tok. bal.: mean normalised entropy of the token routers' gates (lower "
            "= more certain) and of their mean gate (higher = more balanced); Rec@0.8: share of "
            "the analysed tasks (MMLU subjects unless the study analyses other data) whose main "
            "expert pair takes ≥ 0.8 of the task router's activations; MEPs: how many distinct "
            "main expert pairs the tasks have (1 = every task routed alike, so a high Rec@0.8 "
            "is then no recognition); Gate var. between: share of the task router's gate "
            "variance between tasks (— where the router gives every prompt the same gates)."
        )
    if notes:
        lines += ["", "Not in the table:", *notes]
    return "\n".join(lines) + "\n"


def csv_text(study: Study, rows: list[TableRow]) -> str:
    benches, _, _ = _columns(rows)
    metrics: list[tuple[str, Any]] = [
        (b, lambda r, b=b: r["metrics"].get("accuracy", {}).get(b)) for b in benches
    ]
    metrics.append(("avg", lambda r: r["metrics"].get("average")))
    for name, _, path, _ in ROUTING_COLUMNS:
        metrics.append((name, lambda r, p=path: _dig(r["metrics"].get("routing"), p)))
    for name, path in ROUTING_CSV_ONLY:
        metrics.append((name, lambda r, p=path: _dig(r["metrics"].get("routing"), p)))
    head = ["row", *study.columns, "tp_percent", "n_seeds", "seeds"]
    for name, _ in metrics:
        head += [f"{name}_mean", f"{name}_std", f"{name}_ci95"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    for tr in rows:
        tp = _tp_value(tr)
        line = [tr.row.name, *(tr.row.labels.get(c, "") for c in study.columns)]
        line += ["" if tp is None else f"{tp:.4f}", len(tr.records)]
        line.append(" ".join(str(r["seed"]) for r in tr.records))
        for _, fn in metrics:
            vals = _collect(tr.records, fn)
            mean, std = _stats(vals) if vals else (None, None)
            half = None if std is None else ci95_half_width(std, len(vals))
            line += ["" if mean is None else f"{mean:.6f}", "" if std is None else f"{std:.6f}",
                     "" if half is None else f"{half:.6f}"]  # fmt: skip
        writer.writerow(line)
    return buf.getvalue()


def write_tables(out: Path, study: Study, rows: list[TableRow], setting: str) -> Path:
    """Write ``table.md`` and ``table.csv`` into ``out``; returns the markdown path."""
    md = out / "table.md"
    md.write_text(markdown(study, rows, setting))
    (out / "table.csv").write_text(csv_text(study, rows))
    return md

"""The ``ood`` study's tables: accuracy in and out of distribution, the difference to the
reference row (LoRA r = 8), and routing per task.

Every accuracy comes from the row's ``eval/results.json`` (per-question ``correct``), so each
number carries its question count n and a 95 % confidence interval:

* one seed: the interval of :mod:`hmora_ds.eval.compare` over the questions — a benchmark's
  accuracy is ``Σ w_i c_i`` (weights ``1/n``; MMLU's macro accuracy ``1 / (S · n_s)``) with
  variance ``s² Σ w_i²`` (``s²`` the sample variance of the ``c_i``), a mean over benchmarks
  has ``Var = Σ_b Var_b / B²`` (independent question sets), and the interval is the normal
  ``± z_0.975 · √Var``. The difference to the reference row is paired per question (the same
  ids), so the questions both rows answer alike add no noise;
* several seeds: the mean over seeds ± the half-width of the Student t interval over the seeds
  (as every other study's table), the difference paired seed by seed.

``ID`` is the mean over the in-distribution benchmarks (held-out questions of the training
tasks), ``OOD`` over the out-of-distribution ones (tasks never trained); which is which follows
from the run's ``data.tasks`` (:mod:`hmora_ds.eval.ood`).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmora_ds.ablate.studies import OOD_REFERENCE, Study
from hmora_ds.ablate.table import TableRow, ci95_half_width
from hmora_ds.eval.benchmarks import DISPLAY, MACRO
from hmora_ds.eval.compare import PairedDelta, average_delta, paired_delta
from hmora_ds.eval.ood import Split

GROUPS = ("ID", "OOD")


@dataclass(frozen=True)
class Estimate:
    """A value (a fraction) with its 95 % interval and the questions behind it.

    ``low`` / ``high`` are None when no interval exists (one question, or one seed missing).
    """

    value: float
    low: float | None
    high: float | None
    n: int

    def cell(self, signed: bool = False) -> str:
        v = f"{100 * self.value:+.1f}" if signed else f"{100 * self.value:.1f}"
        if self.low is None:
            return v
        fmt = "{:+.1f}" if signed else "{:.1f}"
        return f"{v} [{fmt.format(100 * self.low)}, {fmt.format(100 * self.high)}]"


def _from_delta(d: PairedDelta) -> Estimate:
    return Estimate(d.delta, d.low, d.high, d.n)


def _over_seeds(values: list[float], n: int) -> Estimate:
    """Mean over seeds with the t interval over seeds (one seed: no interval)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Estimate(mean, None, None, n)
    half = ci95_half_width(statistics.stdev(values), len(values))
    return Estimate(mean, mean - half, mean + half, n)


def read_results(record: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The scored benchmarks of a record's ``results.json`` (None when it cannot be read)."""
    path = record.get("stages", {}).get("eval", {}).get("results")
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, TypeError, ValueError):
        return None
    return {b: r for b, r in doc.get("benchmarks", {}).items() if r.get("status") == "ok"}


def _subjects(res: dict[str, Any], bench: str) -> dict[str, str] | None:
    return res.get("subjects") if bench in MACRO else None


def accuracy_of(res: dict[str, Any], bench: str) -> PairedDelta:
    """A benchmark's accuracy and its variance over the questions: the paired difference to
    a model that answers nothing right (the same weights as the accuracy, micro or macro)."""
    correct = res["correct"]
    return paired_delta(dict.fromkeys(correct, False), correct, _subjects(res, bench))


@dataclass
class RowStats:
    """One row's estimates: per benchmark and per group (``ID`` / ``OOD``), accuracy and the
    difference to the reference row (None where it cannot be paired)."""

    accuracy: dict[str, Estimate]
    delta: dict[str, Estimate | None]
    seeds: list[int]


def row_stats(
    records: list[dict[str, Any]],
    reference: dict[int, dict[str, dict[str, Any]]],
    split: Split,
) -> RowStats | None:
    """Estimates of one row from its seeds' records; ``reference`` holds the reference row's
    results by seed. None when no record's results can be read."""
    per_seed: list[tuple[int, dict[str, dict[str, Any]]]] = []
    for rec in records:
        res = read_results(rec)
        if res is not None:
            per_seed.append((rec["seed"], res))
    if not per_seed:
        return None
    benches = [b for b in (*split.id, *split.ood) if all(b in r for _, r in per_seed)]
    groups = {
        "ID": [b for b in split.id if b in benches],
        "OOD": [b for b in split.ood if b in benches],
    }

    def estimates(pairs: list[tuple[int, dict]], fn) -> dict[str, Estimate | None]:
        """``fn(seed, results, bench)`` → PairedDelta (or None) for every bench and group."""
        out: dict[str, Estimate | None] = {}
        seed_values: dict[str, list[PairedDelta]] = {k: [] for k in [*benches, *GROUPS]}
        for seed, res in pairs:
            per_bench = {b: fn(seed, res, b) for b in benches}
            for b, d in per_bench.items():
                if d is not None:
                    seed_values[b].append(d)
            for g, members in groups.items():
                ds = [per_bench[b] for b in members]
                if members and all(d is not None for d in ds):
                    seed_values[g].append(average_delta(ds))
        for key, ds in seed_values.items():
            if len(ds) != len(pairs) or not ds:
                out[key] = None
            elif len(ds) == 1:
                out[key] = _from_delta(ds[0])
            else:
                out[key] = _over_seeds([d.delta for d in ds], ds[0].n)
        return out

    def acc(seed, res, b):
        return accuracy_of(res[b], b)

    def delta(seed, res, b):
        ref = reference.get(seed, {}).get(b)
        if ref is None or set(ref["correct"]) != set(res[b]["correct"]):
            return None  # not the same questions: no paired difference
        return paired_delta(ref["correct"], res[b]["correct"], _subjects(ref, b))

    accuracy = {k: v for k, v in estimates(per_seed, acc).items() if v is not None}
    return RowStats(accuracy, estimates(per_seed, delta), [s for s, _ in per_seed])


def reference_results(
    rows: list[TableRow], name: str = OOD_REFERENCE
) -> tuple[TableRow | None, dict[int, dict[str, dict]]]:
    """The reference row (named ``name``) and its results by seed."""
    ref = next((tr for tr in rows if tr.row.name == name), None)
    by_seed: dict[int, dict[str, dict]] = {}
    for rec in ref.records if ref else []:
        res = read_results(rec)
        if res is not None:
            by_seed[rec["seed"]] = res
    return ref, by_seed


def _label(study: Study, tr: TableRow) -> str:
    return " ".join(tr.row.labels.get(c, "") for c in study.columns).strip() or tr.row.name


def _n(stats: list[RowStats], key: str) -> int | None:
    ns = {s.accuracy[key].n for s in stats if key in s.accuracy}
    return ns.pop() if len(ns) == 1 else None


def _task_routing_lines(study: Study, rows: list[TableRow], split: Split,
                        group_sizes: dict[str, int]) -> list[str]:  # fmt: skip
    """Per analysed row and seed: each task's own routing (``--per-task`` of the analysis)."""
    lines: list[str] = []
    for tr in rows:
        for rec in tr.records:
            path = rec.get("stages", {}).get("analyze", {}).get("routing")
            try:
                doc = json.loads(Path(path).read_text())
            except (OSError, TypeError, ValueError):
                continue
            tasks = doc.get("tasks", {})
            if not any("routing" in t for t in tasks.values()):
                continue
            routers = doc.get("meta", {}).get("per_task_routers", {})
            m = group_sizes.get(tr.row.name)
            unit = f"groups of {m}" if m else "experts"
            lines += [
                "",
                f"**{_label(study, tr)}**, seed {rec['seed']}: shares of the top-k selections "
                f"of `{routers.get('token')}` (the last token router) by {unit}"
                + (f"; MEP of `{routers['task']}`" if routers.get("task") else ""),
                "",
                "| Task | | n | Tok. cert. | Tok. bal. | Shares (%, largest first) | MEP (share) |",
                "|---|---|---|---|---|---|---|",
            ]
            order = [b for b in (*split.id, *split.ood) if b in tasks]
            order += sorted(t for t in tasks if t not in order)
            for task in order:
                t = tasks[task]
                r = t.get("routing") or {}
                kind = split.of(task) if task in (*split.id, *split.ood) else ""
                lines.append(
                    f"| {DISPLAY.get(task, task)} | {kind} | {t.get('n')} | "
                    f"{_num(r.get('token_certainty'))} | {_num(r.get('token_balance'))} | "
                    f"{_shares(r.get('token_load'), m)} | {_mep(t)} |"
                )
    if lines:
        lines = [
            "",
            "### Routing per task",
            "",
            "Each task's questions routed alone (the first evaluated questions of each "
            "benchmark). Tok. cert. / Tok. bal.: mean over the token routers of the normalised "
            "entropy of the gates (lower = more certain) and of their mean over the task's "
            "tokens (lower = the task concentrates on fewer experts).",
            *lines,
        ]
    return lines


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _shares(load: list[float] | None, group: int | None) -> str:
    if not load:
        return "—"
    if group:  # experts j·M … j·M + M − 1 form group j
        load = [sum(load[i : i + group]) for i in range(0, len(load), group)]
        tag = "g"
    else:
        tag = "e"
    ranked = sorted(range(len(load)), key=lambda i: (-load[i], i))
    return " · ".join(f"{tag}{i} {100 * load[i]:.0f}" for i in ranked[:4])


def _mep(task: dict[str, Any]) -> str:
    if not task.get("mep"):
        return "—"
    return f"({', '.join(map(str, task['mep']))}) {100 * task['share']:.0f}%"


def markdown(study: Study, rows: list[TableRow], split: Split, setting: str,
             group_sizes: dict[str, int] | None = None) -> str:  # fmt: skip
    """``table.md`` of the ``ood`` study."""
    ref_row, reference = reference_results(rows)
    ref_label = _label(study, ref_row) if ref_row else OOD_REFERENCE
    computed = [(tr, row_stats(tr.records, reference, split)) for tr in rows]
    stats = [s for _, s in computed if s is not None]
    stand_in = {b: why for tr in rows for r in tr.records
                for b, why in r.get("metrics", {}).get("stand_in", {}).items()}  # fmt: skip

    def name(b: str) -> str:
        return DISPLAY[b] + ("†" if b in stand_in else "")

    def show(b: str) -> str:
        n = _n(stats, b)
        return f"{name(b)} ({split.of(b)}" + (f", n = {n})" if n else ")")

    trained = ", ".join(name(b) for b in split.id)
    held = ", ".join(name(b) for b in split.ood)
    head = [*study.columns, "TP", f"ID (n = {_n(stats, 'ID') or '…'})",
            f"OOD (n = {_n(stats, 'OOD') or '…'})", f"Δ ID vs {ref_label}",
            f"Δ OOD vs {ref_label}", "Seeds"]  # fmt: skip
    lines = [
        f"## {study.title}",
        "",
        f"ID: {trained} (held-out questions of trained tasks). OOD: {held} (tasks never "
        "trained). Accuracy %, mean over the group's benchmarks, [95 % CI]; Δ in points, paired "
        "per question with the reference row.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    notes: list[str] = []
    for tr, s in computed:
        cells = [tr.row.labels.get(c, "") for c in study.columns]
        tp = next((r["tp_percent"] for r in tr.records if r.get("tp_percent") is not None),
                  tr.tp_percent)  # fmt: skip
        cells.append("—" if tp is None else f"{tp:.2f}%")
        for key in GROUPS:
            e = s.accuracy.get(key) if s else None
            cells.append("—" if e is None else e.cell() + _n_mismatch(stats, key, e))
        for key in GROUPS:
            d = s.delta.get(key) if s else None
            if tr.row.name == OOD_REFERENCE:
                cells.append("(reference)")
            else:
                cells.append("—" if d is None else d.cell(signed=True))
        cells.append(",".join(str(x) for x in s.seeds) if s else "—")
        lines.append("| " + " | ".join(cells) + " |")
        for seed, why in sorted(tr.missing.items()):
            notes.append(f"- {tr.row.name} seed {seed}: {why}")
        if tr.records and s is None:
            notes.append(f"- {tr.row.name}: done, but its results.json cannot be read")
    benches = [b for b in (*split.id, *split.ood) if any(b in s.accuracy for s in stats)]
    if benches:
        lines += ["", "### Per benchmark", "", "| " + " | ".join(
            [*study.columns, *(show(b) for b in benches)]) + " |",
            "|" + "---|" * (len(study.columns) + len(benches))]  # fmt: skip
        for tr, s in computed:
            cells = [tr.row.labels.get(c, "") for c in study.columns]
            cells += [
                "—" if not s or b not in s.accuracy else s.accuracy[b].cell() for b in benches
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Δ vs {ref_label} per benchmark (points, paired per question):", "",
                  "| " + " | ".join([*study.columns, *(show(b) for b in benches)]) + " |",
                  "|" + "---|" * (len(study.columns) + len(benches))]  # fmt: skip
        for tr, s in computed:
            if tr.row.name == OOD_REFERENCE:
                continue
            cells = [tr.row.labels.get(c, "") for c in study.columns]
            cells += ["—" if not s or s.delta.get(b) is None else s.delta[b].cell(signed=True)
                      for b in benches]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines += _task_routing_lines(study, rows, split, group_sizes or {})
    lines += ["", setting]
    lines.append(
        "CI: one seed — normal interval over the questions (hmora_ds.eval.compare; the average "
        "of a group treats its benchmarks as independent); several seeds — Student t over the "
        "seeds. Δ is paired per question (the same question ids in both rows; — where they "
        "differ or the reference row is missing)."
    )
    lines += [f"† {DISPLAY[b]}: {why}." for b, why in stand_in.items()]
    lines += [f"Note: {n}." for n in split.notes]
    if notes:
        lines += ["", "Not in the table:", *notes]
    return "\n".join(lines) + "\n"


def _n_mismatch(stats: list[RowStats], key: str, e: Estimate) -> str:
    """The row's own n when it differs from the header's."""
    return "" if _n(stats, key) == e.n else f" (n = {e.n})"


def csv_text(study: Study, rows: list[TableRow], split: Split) -> str:
    """``table.csv``: per row, value / low / high / n of every benchmark, ID, OOD and Δ."""
    _, reference = reference_results(rows)
    keys = [*split.id, *split.ood, *GROUPS]
    head = ["row", *study.columns, "seeds"]
    for k in keys:
        head += [f"{k}_acc", f"{k}_low", f"{k}_high", f"{k}_n"]
    for k in keys:
        head += [f"{k}_delta", f"{k}_delta_low", f"{k}_delta_high"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)

    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.6f}"

    for tr in rows:
        s = row_stats(tr.records, reference, split)
        line: list[Any] = [tr.row.name, *(tr.row.labels.get(c, "") for c in study.columns)]
        line.append(" ".join(str(x) for x in s.seeds) if s else "")
        for k in keys:
            e = s.accuracy.get(k) if s else None
            line += ["", "", "", ""] if e is None else [fmt(e.value), fmt(e.low), fmt(e.high), e.n]
        for k in keys:
            d = s.delta.get(k) if s else None
            line += ["", "", ""] if d is None else [fmt(d.value), fmt(d.low), fmt(d.high)]
        writer.writerow(line)
    return buf.getvalue()


def write_ood_tables(out: Path, study: Study, rows: list[TableRow], split: Split, setting: str,
                     group_sizes: dict[str, int] | None = None) -> Path:  # fmt: skip
    """Write ``table.md`` and ``table.csv`` into ``out``; returns the markdown path."""
    md = out / "table.md"
    md.write_text(markdown(study, rows, split, setting, group_sizes))
    (out / "table.csv").write_text(csv_text(study, rows, split))
    return md

"""The paper's results table: MMLU, MMLU-Pro, ARC-C, ARC-E, OpenBook, SWAG, Comm, Avg.

Accuracies in percent. A benchmark with no data is ``n/a`` (unavailable in the source) or
``—`` (not run), with a footnote; the average is over the scored benchmarks only and is
starred with a footnote naming the missing ones whenever it is not over all seven. A stand-in
(HellaSwag for SWAG) is marked with ``†`` and named in a footnote.
"""

from __future__ import annotations

from typing import Any

from hmora_ds.eval.benchmarks import BENCHMARKS, DISPLAY


def _cell(res: dict[str, Any] | None) -> str:
    if res is None:
        return "—"
    if res.get("status") != "ok":
        return "n/a"
    cell = f"{100 * res['accuracy']:.2f}"
    return cell + ("†" if res.get("stand_in") else "")


def markdown_table(doc: dict[str, Any], label: str = "model") -> str:
    """A markdown table (one row) with footnotes, from a ``results.json`` document."""
    results = doc["benchmarks"]
    avg = doc["average"]
    head = [DISPLAY[b] for b in BENCHMARKS] + ["Avg"]
    cells = [_cell(results.get(b)) for b in BENCHMARKS]
    if avg["value"] is None:
        cells.append("n/a")
    else:
        cells.append(f"{100 * avg['value']:.2f}" + ("" if avg["complete"] else "*"))
    lines = [
        "| " + " | ".join(["", *head]) + " |",
        "|" + "---|" * (len(head) + 1),
        "| " + " | ".join([label, *cells]) + " |",
        "",
    ]
    shots = doc.get("shots", 0)
    setting = (
        f"{doc.get('mode', 'letter')} scoring, {shots}-shot"
        if shots
        else (f"{doc.get('mode', 'letter')} scoring, zero-shot")
    )
    lines.append(
        f"Split: {doc.get('split')} subsets (spec §7), source: {doc.get('source')}, {setting}; "
        "MMLU and MMLU-Pro: macro accuracy over subjects, others: accuracy (%)."
    )
    for b in BENCHMARKS:
        res = results.get(b)
        if res and res.get("stand_in"):
            lines.append(f"† {DISPLAY[b]}: {res['stand_in']}; not SWAG itself.")
    for b in BENCHMARKS:
        res = results.get(b)
        if res is None:
            lines.append(f"— {DISPLAY[b]}: not run.")
        elif res.get("status") != "ok":
            lines.append(f"n/a {DISPLAY[b]}: unavailable ({res.get('reason')}).")
    if avg["value"] is not None and not avg["complete"]:
        over = ", ".join(DISPLAY[b] for b in avg["over"])
        miss = ", ".join(DISPLAY[b] for b in avg["missing"])
        lines.append(
            f"* Average over {len(avg['over'])} of 7 benchmarks ({over}); missing: {miss}. "
            "Not comparable with the paper's seven-benchmark average."
        )
    return "\n".join(lines) + "\n"

"""Side-by-side table of two evaluations (e.g. the base model and a fine-tuned adapter).

    python -m hmora_ds.eval.compare runs/default/eval_base/results.json \
        runs/default/eval_adapter/results.json [--labels base fine-tuned]

Both files must cover the same split, scoring mode and questions (their manifests); the last
row is the difference in accuracy points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hmora_ds.eval.benchmarks import BENCHMARKS, DISPLAY


def _acc(doc: dict[str, Any], bench: str) -> float | None:
    res = doc["benchmarks"].get(bench)
    return res["accuracy"] if res and res.get("status") == "ok" else None


def compare_table(docs: list[dict[str, Any]], labels: list[str]) -> str:
    """Markdown: one row per document, then Δ (last − first) in accuracy points."""
    for key in ("split", "mode", "shots"):
        values = {d.get(key) for d in docs}
        if len(values) > 1:
            raise ValueError(
                f"compare: the evaluations differ in {key} ({sorted(map(str, values))})"
            )
    benches = [b for b in BENCHMARKS if any(_acc(d, b) is not None for d in docs)]
    head = [DISPLAY[b] for b in benches] + ["Avg"]
    lines = ["| | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    rows = []
    for doc, label in zip(docs, labels, strict=True):
        accs = [_acc(doc, b) for b in benches]
        scored = [a for a in accs if a is not None]
        rows.append([*accs, sum(scored) / len(scored) if scored else None])
        lines.append(f"| {label} | " + " | ".join(_fmt(a) for a in rows[-1]) + " |")
    delta = [
        None if a is None or b is None else b - a for a, b in zip(rows[0], rows[-1], strict=True)
    ]
    lines.append("| Δ | " + " | ".join(_fmt(d, signed=True) for d in delta) + " |")
    first = docs[0]
    lines.append(
        f"\n{first.get('split')} subsets, {first.get('mode')} scoring, "
        f"{first.get('shots', 0)}-shot; accuracy (%)."
    )
    return "\n".join(lines)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hmora_ds.eval.compare")
    parser.add_argument("results", nargs="+", type=Path, help="results.json files")
    parser.add_argument("--labels", nargs="+", default=None)
    args = parser.parse_args(argv)
    labels = args.labels or [p.parent.name for p in args.results]
    try:
        if len(labels) != len(args.results):
            raise ValueError("compare: give one --labels entry per results file")
        docs = [json.loads(p.read_text()) for p in args.results]
        print(compare_table(docs, labels))
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

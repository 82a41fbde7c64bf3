"""Side-by-side table of two evaluations (e.g. the base model and a fine-tuned adapter), with
the uncertainty of their difference.

    python -m hmora_ds.eval.compare runs/default/eval_base/results.json \
        runs/default/eval_adapter/results.json [--labels base fine-tuned]

Both files must cover the same split, scoring mode, benchmarks and questions (evaluate the
second with ``--manifest`` of the first to be sure). Below one row per evaluation come Δ (last
− first, accuracy points), its 95 % confidence interval and the number of questions, then a
verdict in words: better, worse, or no difference detectable at this sample size.

The interval is paired: both evaluations scored the same questions, so the per-question
differences ``d_i = correct_last,i − correct_first,i`` (−1, 0 or 1, from ``correct`` in
``results.json``) carry the comparison, and the questions both got right or both got wrong add
no noise. A benchmark's Δ is ``Σ_i w_i d_i`` with the weights of its accuracy (``1/n``; macro
accuracy over subjects: ``1 / (S · n_s)``), its variance ``s² Σ_i w_i²`` with ``s²`` the sample
variance of its ``d_i`` (for ``1/n`` weights the usual ``s² / n``), and the average's Δ the mean
over benchmarks, whose question sets are independent: ``Var = Σ_b Var_b / B²``. The interval is
``Δ ± z_0.975 · √Var`` (normal approximation; the quantile comes from the standard library,
since SciPy is not a dependency of hmora-ds). It covers the sampling of questions only, not
the spread over training seeds.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

from hmora_ds.cli import Parser, prog_name
from hmora_ds.eval.benchmarks import BENCHMARKS, DISPLAY, MACRO

#: Two-sided 95 % normal quantile, 1.959964…
Z95 = NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class PairedDelta:
    """Δ accuracy (a fraction) of two evaluations on the same questions, with its 95 % CI.

    ``low`` / ``high`` are None when there are fewer than two questions (no variance).
    """

    delta: float
    variance: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.variance is None else self.delta - Z95 * math.sqrt(self.variance)

    @property
    def high(self) -> float | None:
        return None if self.variance is None else self.delta + Z95 * math.sqrt(self.variance)


def paired_delta(
    first: dict[str, bool], last: dict[str, bool], subjects: dict[str, str] | None = None
) -> PairedDelta:
    """Δ = accuracy(last) − accuracy(first) on the same questions, and its variance.

    Args:
        first / last: correctness by question id (the same ids in both).
        subjects: subject by question id for macro accuracy (MMLU, MMLU-Pro); None = micro.
    """
    ids = sorted(first)
    n = len(ids)
    if n == 0:
        raise ValueError("compare: no questions to compare")
    if subjects is None:
        weights = dict.fromkeys(ids, 1.0 / n)
    else:
        sizes: dict[str, int] = {}
        for i in ids:
            sizes[subjects[i]] = sizes.get(subjects[i], 0) + 1
        weights = {i: 1.0 / (len(sizes) * sizes[subjects[i]]) for i in ids}
    d = {i: float(last[i]) - float(first[i]) for i in ids}
    delta = sum(weights[i] * d[i] for i in ids)
    if n < 2:
        return PairedDelta(delta, None, n)
    mean = sum(d.values()) / n
    s2 = sum((x - mean) ** 2 for x in d.values()) / (n - 1)
    return PairedDelta(delta, s2 * sum(w * w for w in weights.values()), n)


def average_delta(deltas: list[PairedDelta]) -> PairedDelta:
    """Δ of the mean accuracy over benchmarks (independent question sets)."""
    b = len(deltas)
    delta = sum(x.delta for x in deltas) / b
    if any(x.variance is None for x in deltas):
        return PairedDelta(delta, None, sum(x.n for x in deltas))
    return PairedDelta(delta, sum(x.variance for x in deltas) / b**2, sum(x.n for x in deltas))


def verdict(avg: PairedDelta, first: str, last: str) -> str:
    """One line in words: is ``last`` better, worse, or not distinguishable from ``first``?"""
    head = f"Δ avg {_pts(avg.delta)} points"
    if avg.low is None:
        return f"{head} on {avg.n} paired question(s): too few questions for a confidence interval."
    head += f", 95 % CI [{_pts(avg.low)}, {_pts(avg.high)}] on {avg.n} paired questions: "
    if avg.low > 0:
        return head + f"{last} is better than {first}."
    if avg.high < 0:
        return head + f"{last} is worse than {first}."
    return head + "no difference detectable at this sample size."


def _ok(doc: dict[str, Any], bench: str) -> dict[str, Any] | None:
    res = doc["benchmarks"].get(bench)
    return res if res and res.get("status") == "ok" else None


def _correct(doc: dict[str, Any], bench: str, label: str) -> dict[str, bool]:
    res = _ok(doc, bench)
    if "correct" not in res:
        raise ValueError(
            f"compare: {label}: benchmarks.{bench}.correct (per-question correctness) is "
            "missing; re-run launchers/eval.py, which writes it"
        )
    return res["correct"]


def _check_same_questions(docs: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """The benchmarks every evaluation scored; an error unless all scored the same questions."""
    scored = [[b for b in BENCHMARKS if _ok(d, b)] for d in docs]
    for doc_scored, label in zip(scored[1:], labels[1:], strict=True):
        if doc_scored != scored[0]:
            only = sorted(set(doc_scored) ^ set(scored[0]))
            raise ValueError(
                f"compare: {labels[0]} and {label} scored different benchmarks "
                f"({', '.join(DISPLAY[b] for b in only)} in one only); evaluate both with "
                "the same --benchmarks and source"
            )
    for bench in scored[0]:
        ref = set(_correct(docs[0], bench, labels[0]))
        for doc, label in zip(docs[1:], labels[1:], strict=True):
            ids = set(_correct(doc, bench, label))
            if ids != ref:
                raise ValueError(
                    f"compare: {DISPLAY[bench]}: {labels[0]} and {label} scored different "
                    f"questions ({len(ref - ids)} only in {labels[0]}, {len(ids - ref)} only "
                    f"in {label}); evaluate the second with --manifest of the first"
                )
    return scored[0]


def compare_table(docs: list[dict[str, Any]], labels: list[str]) -> str:
    """Markdown: one row per document, then Δ (last − first) with its paired 95 % CI and the
    number of questions, and a closing verdict line."""
    if len(docs) < 2:
        raise ValueError("compare: give at least two results.json files")
    for key in ("split", "mode", "shots"):
        values = {d.get(key) for d in docs}
        if len(values) > 1:
            raise ValueError(
                f"compare: the evaluations differ in {key} ({sorted(map(str, values))})"
            )
    benches = _check_same_questions(docs, labels)
    if not benches:
        raise ValueError("compare: no benchmark was scored in these evaluations")
    head = [DISPLAY[b] for b in benches] + ["Avg"]
    lines = ["| | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for doc, label in zip(docs, labels, strict=True):
        accs = [_ok(doc, b)["accuracy"] for b in benches]
        row = [*accs, sum(accs) / len(accs)]
        lines.append(f"| {label} | " + " | ".join(f"{100 * a:.1f}" for a in row) + " |")
    first, last = docs[0], docs[-1]
    deltas = []
    for b in benches:
        subjects = _ok(first, b).get("subjects") if b in MACRO else None
        if b in MACRO and subjects is None:
            raise ValueError(
                f"compare: {labels[0]}: benchmarks.{b}.subjects (for its macro accuracy) is "
                "missing; re-run launchers/eval.py, which writes it"
            )
        deltas.append(
            paired_delta(_correct(first, b, labels[0]), _correct(last, b, labels[-1]), subjects)
        )
    cols = [*deltas, average_delta(deltas)]
    lines.append("| Δ | " + " | ".join(_pts(c.delta) for c in cols) + " |")
    lines.append("| 95 % CI | " + " | ".join(_interval(c) for c in cols) + " |")
    lines.append("| questions | " + " | ".join(str(c.n) for c in cols) + " |")
    lines.append(
        f"\n{first.get('split')} subsets, {first.get('mode')} scoring, "
        f"{first.get('shots', 0)}-shot; accuracy (%), Δ = {labels[-1]} − {labels[0]} in points; "
        "CI: paired over the same questions (normal approximation), question sampling only."
    )
    lines.append(verdict(cols[-1], labels[0], labels[-1]))
    return "\n".join(lines)


def _pts(value: float) -> str:
    return f"{100 * value:+.1f}"


def _interval(delta: PairedDelta) -> str:
    if delta.low is None:
        return "—"
    return f"[{_pts(delta.low)}, {_pts(delta.high)}]"


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=prog_name("hmora_ds.eval.compare"))
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

"""The before/after table: paired Δ with its 95 % CI, question counts, the verdict line, and
refusal of evaluations that did not score the same questions."""

from __future__ import annotations

import json
import math

import pytest

from hmora_ds.eval.compare import Z95, average_delta, compare_table, main, paired_delta


def _doc(benches: dict[str, list[bool]], subjects: dict[str, list[str]] | None = None):
    """A results.json document: per benchmark the correctness of questions q0, q1, …"""
    out = {}
    for bench, correct in benches.items():
        res = {
            "status": "ok",
            "accuracy": sum(correct) / len(correct),
            "num_questions": len(correct),
            "correct": {f"q{i}": c for i, c in enumerate(correct)},
        }
        if subjects and bench in subjects:
            res["subjects"] = {f"q{i}": s for i, s in enumerate(subjects[bench])}
            by: dict[str, list[bool]] = {}
            for c, s in zip(correct, subjects[bench], strict=True):
                by.setdefault(s, []).append(c)
            res["accuracy"] = sum(sum(v) / len(v) for v in by.values()) / len(by)
        out[bench] = res
    out["mmlu_pro"] = {"status": "unavailable", "reason": "no offline source"}
    return {"split": "validation", "mode": "loglik", "shots": 0, "benchmarks": out}


FIRST = [True, False, True, False, True]
LAST = [True, True, False, True, True]  # differences d = 0, +1, -1, +1, 0


def test_paired_interval_matches_a_hand_computation():
    first = {f"q{i}": c for i, c in enumerate(FIRST)}
    last = {f"q{i}": c for i, c in enumerate(LAST)}
    # By hand: mean d = 0.2; Σ (d - 0.2)² = 0.04 + 0.64 + 1.44 + 0.64 + 0.04 = 2.8;
    # s² = 2.8 / 4 = 0.7; Var(Δ) = 0.7 / 5 = 0.14; half-width 1.959964 · √0.14 = 0.733351.
    micro = paired_delta(first, last)
    assert abs(Z95 - 1.959964) < 1e-6
    assert (micro.delta, micro.variance, micro.n) == (pytest.approx(0.2), pytest.approx(0.14), 5)
    assert micro.low == pytest.approx(0.2 - 0.733351, abs=1e-6)
    assert micro.high == pytest.approx(0.2 + 0.733351, abs=1e-6)
    # Macro over subjects a = {q0, q1}, b = {q2, q3, q4}: weights 1/(2·2) and 1/(2·3).
    # Δ = (0 + 1)/4 + (-1 + 1 + 0)/6 = 0.25 (= 1.0 - 0.5 on a, 2/3 - 2/3 on b, halved);
    # Var = 0.7 · (2/16 + 3/36) = 0.7 · 0.208333 = 0.145833.
    subjects = dict(zip(first, ["a", "a", "b", "b", "b"], strict=True))
    macro = paired_delta(first, last, subjects)
    assert macro.delta == pytest.approx(0.25) and macro.variance == pytest.approx(0.145833, 1e-5)
    # The average of two benchmarks: Δ the mean, Var the sum over 2² (independent questions).
    avg = average_delta([micro, macro])
    assert avg.delta == pytest.approx(0.225) and avg.n == 10
    assert avg.variance == pytest.approx((0.14 + 0.145833) / 4, rel=1e-5)
    assert avg.high - avg.low == pytest.approx(2 * 1.959964 * math.sqrt(0.0714583), rel=1e-5)
    # No change on any question: a zero-width interval at 0.
    same = paired_delta(first, first)
    assert (same.delta, same.low, same.high) == (0.0, 0.0, 0.0)


def test_table_shows_counts_interval_and_delta_of_the_accuracies():
    subjects = {"mmlu": ["a", "a", "b", "b", "b"]}
    base = _doc({"arc_easy": FIRST, "mmlu": FIRST}, subjects)
    tuned = _doc({"arc_easy": LAST, "mmlu": LAST}, subjects)
    lines = compare_table([base, tuned], ["base", "tuned"]).splitlines()
    assert lines[0] == "| | MMLU | ARC-E | Avg |"
    assert lines[2] == "| base | 58.3 | 60.0 | 59.2 |"
    assert lines[3] == "| tuned | 83.3 | 80.0 | 81.7 |"
    assert lines[4] == "| Δ | +25.0 | +20.0 | +22.5 |"
    assert lines[5] == "| 95 % CI | [-49.8, +99.8] | [-53.3, +93.3] | [-29.9, +74.9] |"
    assert lines[6] == "| questions | 5 | 5 | 10 |"
    assert lines[-1] == (
        "Δ avg +22.5 points, 95 % CI [-29.9, +74.9] on 10 paired questions: "
        "no difference detectable at this sample size."
    )


def _one_benchmark(gained: int, lost: int, n: int = 100):
    """Two evaluations of n questions: ``gained`` go wrong → right, ``lost`` right → wrong."""
    first = [False] * gained + [True] * lost + [True] * ((n - gained - lost) // 2)
    first += [False] * (n - len(first))
    last = [True] * gained + [False] * lost + first[gained + lost :]
    return _doc({"arc_easy": first}), _doc({"arc_easy": last})


def test_verdict_says_better_worse_or_not_detectable():
    # 40 of 100 gained: d has 40 ones; s² = (40 · 0.36 + 60 · 0.16) / 99 = 24 / 99;
    # half-width 1.959964 · √(24 / 99 / 100) = 0.096502.
    better = compare_table(list(_one_benchmark(40, 0)), ["base", "tuned"]).splitlines()[-1]
    assert better == (
        "Δ avg +40.0 points, 95 % CI [+30.3, +49.7] on 100 paired questions: "
        "tuned is better than base."
    )
    worse = compare_table(list(_one_benchmark(0, 40)), ["base", "tuned"]).splitlines()[-1]
    assert worse == (
        "Δ avg -40.0 points, 95 % CI [-49.7, -30.3] on 100 paired questions: "
        "tuned is worse than base."
    )
    # 10 gained, 10 lost: Δ 0; s² = 20 / 99, half-width 1.959964 · √(20 / 99 / 100) = 0.088.
    even = compare_table(list(_one_benchmark(10, 10)), ["base", "tuned"]).splitlines()[-1]
    assert even == (
        "Δ avg +0.0 points, 95 % CI [-8.8, +8.8] on 100 paired questions: "
        "no difference detectable at this sample size."
    )


def test_refuses_evaluations_of_different_questions(tmp_path, capsys):
    base = _doc({"arc_easy": FIRST})
    other = _doc({"arc_easy": LAST})
    other["benchmarks"]["arc_easy"]["correct"]["q9"] = other["benchmarks"]["arc_easy"][
        "correct"
    ].pop("q0")
    with pytest.raises(ValueError) as err:
        compare_table([base, other], ["base", "tuned"])
    assert str(err.value) == (
        "compare: ARC-E: base and tuned scored different questions (1 only in base, 1 only in "
        "tuned); evaluate the second with --manifest of the first"
    )
    with pytest.raises(ValueError, match=r"^compare: base and tuned scored different benchmarks"):
        compare_table([base, _doc({"arc_easy": LAST, "openbookqa": LAST})], ["base", "tuned"])
    old = _doc({"arc_easy": LAST})
    del old["benchmarks"]["arc_easy"]["correct"]
    with pytest.raises(ValueError, match=r"^compare: old: benchmarks\.arc_easy\.correct .* re-run"):
        compare_table([base, old], ["base", "old"])
    with pytest.raises(ValueError, match="differ in mode"):
        compare_table([base, {**base, "mode": "letter"}], ["a", "b"])
    # The command line: exit code 2 and the one-line error.
    for name, doc in (("a", base), ("b", other)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(doc))
    assert main([str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: compare: ARC-E: a and b")

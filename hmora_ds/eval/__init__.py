"""Evaluation on the paper's seven benchmarks (spec §7): loaders, subsets, scoring, tables.

See ``docs/eval.md``. Entry point: ``launchers/eval.py``; training uses
:class:`hmora_ds.eval.evaluator.BenchmarkEvaluator`.
"""

from hmora_ds.eval.benchmarks import (
    BENCHMARKS,
    BenchmarkData,
    BenchmarkUnavailable,
    EvalError,
    Question,
    load_benchmark,
    parse_benchmarks,
)
from hmora_ds.eval.distributed import score_questions
from hmora_ds.eval.scoring import ScoreConfig, Scorer, accuracy
from hmora_ds.eval.subsets import PAPER_SUBSETS, select_subset
from hmora_ds.eval.suite import SuiteConfig, prepare_suite, run_suite

__all__ = [
    "BENCHMARKS",
    "PAPER_SUBSETS",
    "BenchmarkData",
    "BenchmarkUnavailable",
    "EvalError",
    "Question",
    "ScoreConfig",
    "Scorer",
    "SuiteConfig",
    "accuracy",
    "load_benchmark",
    "parse_benchmarks",
    "prepare_suite",
    "run_suite",
    "score_questions",
    "select_subset",
]

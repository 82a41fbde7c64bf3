"""Benchmark validation during training (the paper's model selection).

Every ``eval.every`` steps the trainer calls :meth:`BenchmarkEvaluator.evaluate` on every rank:
the validation subsets (spec §7) are scored (sharded, all ranks stepping together), and the
mean accuracy over the scored benchmarks (``mean_acc``, higher is better) drives early stopping
and best-checkpoint selection; ``acc_<benchmark>`` go to TensorBoard as ``eval/acc_<benchmark>``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from hmora_ds.eval.benchmarks import EvalError
from hmora_ds.eval.scoring import ScoreConfig, Scorer
from hmora_ds.eval.suite import SuiteConfig, average, prepare_suite, run_suite

logger = logging.getLogger(__name__)


class BenchmarkEvaluator:
    """Mean validation accuracy over benchmarks (the trainer's :class:`Evaluator` protocol).

    Args:
        tokenizer: The training tokenizer (its chat template builds the prompts).
        suite: Which benchmarks / subsets (``split`` is normally ``validation``).
        score: How to score them.
        device: This rank's device.
        autocast_dtype: bf16 autocast on GPU (None: off).

    Raises:
        EvalError: If no selected benchmark is available in the source.
    """

    metric = "mean_acc"
    mode = "max"

    def __init__(
        self,
        tokenizer: Any,
        suite: SuiteConfig,
        score: ScoreConfig,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        progress: str = "auto",
    ) -> None:
        self.progress = progress  # how run_suite shows its progress (log.progress)
        self.prepared = prepare_suite(suite, score.shots, score.seed)
        if all(p.unavailable for p in self.prepared.values()):
            raise EvalError(f"no selected benchmark is available from source {suite.source!r}")
        self.scorer = Scorer(tokenizer, score)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.last_results: dict[str, dict[str, Any]] = {}

    def evaluate(self, model: Any, step: int) -> dict[str, float]:
        results = run_suite(
            model,
            self.scorer,
            self.prepared,
            self.device,
            self.autocast_dtype,
            progress=self.progress,
        )
        self.last_results = results
        avg = average(results)
        out = {self.metric: float(avg["value"])}
        for bench, res in results.items():
            if res["status"] == "ok":
                out[f"acc_{bench}"] = float(res["accuracy"])
        logger.info(
            "step %d: mean validation accuracy %.2f%% over %s",
            step,
            100 * out[self.metric],
            ", ".join(avg["over"]),
        )
        return out

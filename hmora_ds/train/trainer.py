"""The DeepSpeed training loop: forward → total loss → ``engine.backward`` → ``engine.step``.

Global batch (spec §5): one optimizer step consumes ``grad_accum`` micro-batches on each of the
``world`` ranks. The LM loss is the summed cross-entropy over *all* of them divided by the
global number of target tokens (counted before the step and all-reduced), so with N ranks each
holding 1/N of a batch the loss value and update equal one process holding the whole batch.
DeepSpeed divides the gradient by ``grad_accum`` and averages it over ranks; the LM term is
scaled by ``world · grad_accum`` to undo exactly that. Router statistics of the auxiliary
losses are all-reduced inside the model over the data-parallel group (a differentiable
all-reduce), per micro-step; the logged routing statistics accumulate over micro-steps.

Non-finite loss or gradient: DeepSpeed skips the update (its grad-norm check) and we count it;
``train.max_nonfinite_steps`` in a row stop the run.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from hmora_ds.adapter_io import adapter_metadata, save_adapter
from hmora_ds.metrics import RouterStatsAccumulator
from hmora_ds.train import checkpoint as ckpt
from hmora_ds.train.config import RunConfig
from hmora_ds.train.data import RunData, build_run_data, prepare_records
from hmora_ds.train.deepspeed_config import zero_stage
from hmora_ds.train.dist import DistInfo, rank0_first
from hmora_ds.train.engine import build_engine, plan_engine, resolve_base, seed_everything
from hmora_ds.train.evaluate import Evaluator, ValidationLoss, improved
from hmora_ds.train.sinks import Sinks, build_summary, log_eval_result, log_nonfinite
from hmora_ds.train.step import StepMetrics, train_step, window_metrics

logger = logging.getLogger(__name__)


class Trainer:
    """One training run.

    Args:
        run: the run config.
        ds_config: the parsed DeepSpeed JSON (its "auto" fields are filled from ``run``).
        info: this process's rank / device.
        resume: a checkpoint dir / tag dir to resume from, ``"auto"`` (the run's latest if
            any) or None.
        evaluator: overrides the default held-out-loss evaluator.
    """

    def __init__(
        self,
        run: RunConfig,
        ds_config: dict[str, Any],
        info: DistInfo,
        resume: str | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        self.run = run
        self.info = info
        self.out_dir = Path(run.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.plan = plan_engine(run, ds_config, info)  # fails before anything is loaded
        self.ds_config, self.method = self.plan.ds_config, self.plan.method
        self.precision, self.autocast_dtype = self.plan.precision, self.plan.autocast_dtype
        self._setup_model_and_data()
        # A per-rank stream for dropout from here on.
        seed_everything(run.train.seed + info.rank)
        self.evaluator: Evaluator | None = evaluator
        if evaluator is None and run.eval.kind == "benchmarks":
            self.evaluator = self._on_rank0_first(self._benchmark_evaluator)
        elif evaluator is None:
            val = self.data.val_batches(run.eval.batch_size, run.eval.max_batches)
            if val:
                self.evaluator = ValidationLoss(val, info.device, self.autocast_dtype)
            else:
                logger.warning(
                    "no validation records (data.val_fraction=%s, data.val_path=%s): validation, "
                    "best-checkpoint selection and early stopping are off",
                    run.data.val_fraction,
                    run.data.val_path,
                )
        self.step = 0
        self.best: dict[str, Any] = {"value": None, "tag": None, "step": None}
        self.evals_without_improvement = 0
        self.nonfinite_in_row = 0
        self.history: list[dict[str, float]] = []
        self._resume_from(resume)

    def _benchmark_evaluator(self) -> Evaluator:
        from hmora_ds.eval.evaluator import BenchmarkEvaluator
        from hmora_ds.eval.scoring import ScoreConfig
        from hmora_ds.eval.suite import SuiteConfig

        e = self.run.eval
        suite = SuiteConfig(
            benchmarks=[e.benchmarks],
            split="validation",
            source=e.source,
            local_dir=Path(e.local_dir) if e.local_dir else None,
            seed=e.seed,
            max_questions=e.max_questions,
        )
        score = ScoreConfig(
            mode=e.mode,
            shots=e.shots,
            batch_size=e.batch_size,
            max_input_tokens=self.run.data.max_input_tokens,
            seed=e.seed,
        )
        return BenchmarkEvaluator(
            self.tokenizer, suite, score, self.info.device, self.autocast_dtype
        )

    # ----------------------------------------------------------------- setup
    def _setup_model_and_data(self) -> None:
        run, info = self.run, self.info
        checkpoint, self.tokenizer = resolve_base(run, info.rank)
        # The offline mixture is built once (rank 0) before every rank reads it.
        self._on_rank0_first(lambda: prepare_records(run))
        self.data: RunData = build_run_data(run, self.tokenizer, info.rank, info.world_size)
        built = build_engine(run, self.plan, info, checkpoint, self.tokenizer)
        self.engine, self.model = built.engine, built.model
        self.report, self.dp_group = built.report, built.dp_group

    def _on_rank0_first(self, fn):
        return rank0_first(fn, self.info.rank)

    def _resume_from(self, resume: str | None) -> None:
        if resume is None:
            return
        if resume == "auto":
            if not (self.ckpt_dir / ckpt.LATEST).is_file():
                logger.info("resume=auto: no checkpoint in %s, starting fresh", self.ckpt_dir)
                return
            resume = str(self.ckpt_dir)
        ckpt_dir, tag = ckpt.find_checkpoint(resume)
        state = ckpt.load_checkpoint(self.engine, ckpt_dir, tag, self.info.rank)
        self.step = int(state["step"])
        self.data.sampler.load_state_dict(state["sampler"])
        self.best = state["best"]
        self.evals_without_improvement = int(state["evals_without_improvement"])
        self.nonfinite_in_row = int(state["nonfinite_in_row"])
        logger.info("resumed from %s/%s at step %d", ckpt_dir, tag, self.step)

    # ----------------------------------------------------------------- one step
    def train_step(self, batches, stats: RouterStatsAccumulator | None) -> StepMetrics:
        """One optimizer step over ``grad_accum`` micro-batches of every rank
        (:func:`hmora_ds.train.step.train_step` with this run's settings)."""
        return train_step(
            self.engine,
            batches,
            stats,
            grad_accum=self.run.train.grad_accum,
            world=self.info.world_size,
            device=self.info.device,
            aux_weight=self.method.loss.aux_weight,
            autocast_dtype=self.autocast_dtype,
            dp_group=self.dp_group,
        )

    # ----------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        run, info = self.run, self.info
        t = run.train
        sinks = Sinks.open(
            self.out_dir, run.to_dict(), info.is_main, t.max_steps, self.step, t.log_every
        )
        batches = self.data.batches()
        stats_k = self.model.stats_top_k
        start_time, tokens_seen, stop_reason = time.time(), 0.0, "max_steps"
        # Steps not yet read back from the device: (step, raw metrics). Reading back costs a
        # host-device sync, so it happens once per logging window, before an evaluation or a
        # checkpoint, and at the end -- never inside a step.
        pending: list[tuple[int, dict[str, Any]]] = []
        window_start = time.time()
        self.engine.train()
        while self.step < t.max_steps:
            want_stats = self.method.has_mixture and (self.step + 1) % t.router_stats_every == 0
            stats = RouterStatsAccumulator(stats_k) if want_stats else None
            raw = self.train_step(batches, stats)
            self.step += 1
            pending.append((self.step, raw))
            sinks.step_done()
            due_eval = self.evaluator is not None and (
                self.step % run.eval.every == 0 or self.step == t.max_steps
            )
            due_ckpt = self.step % run.checkpoint.every == 0 or self.step == t.max_steps
            router = stats.finalize(self.dp_group) if stats is not None else {}
            if self.step % t.log_every == 0 or self.step == 1 or router or due_eval or due_ckpt:
                now = time.time()
                diverged, tokens = self._flush(pending, sinks, router, now - window_start)
                tokens_seen += tokens
                pending, window_start = [], now
                if diverged:
                    stop_reason = diverged
                    break
            stop = due_eval and self._evaluate(sinks)
            # A new best is always checkpointed (and protected from pruning).
            new_best = due_eval and self.best["step"] == self.step
            if stop or new_best or due_ckpt:
                self._checkpoint()
            if stop:
                stop_reason = f"early stopping ({run.eval.patience} evaluations without gain)"
                break
        if pending:
            diverged, tokens = self._flush(pending, sinks, {}, time.time() - window_start)
            tokens_seen += tokens
            stop_reason = diverged or stop_reason
        sinks.close_bar()
        return self._finish(sinks, stop_reason, time.time() - start_time, tokens_seen)

    def _flush(self, pending, sinks: Sinks, router, seconds: float) -> tuple[str | None, float]:
        """Read a window of steps back (one sync), check divergence, log, extend the history.

        Returns (a stop reason if ``max_nonfinite_steps`` non-finite steps came in a row, the
        window's tokens).
        """
        lam = self.method.loss.aux_weight
        raws = [raw for _, raw in pending]
        metrics, tokens = window_metrics(raws, lam, seconds, self.info.device)
        diverged = None
        for (step, _), m in zip(pending, metrics, strict=True):
            if not m["applied"] or not math.isfinite(m["loss"]):
                self.nonfinite_in_row += 1
                log_nonfinite(step, m["loss"], self.nonfinite_in_row)
                if self.nonfinite_in_row >= self.run.train.max_nonfinite_steps and not diverged:
                    diverged = f"{self.nonfinite_in_row} non-finite steps in a row"
            else:
                self.nonfinite_in_row = 0
            self.history.append({"step": step, "loss": m["loss"], "lm_loss": m["lm_loss"]})
        sinks.log_window([step for step, _ in pending], metrics, router)
        return diverged, tokens

    def _evaluate(self, sinks: Sinks) -> bool:
        """Evaluate; keep the best adapter; True when early stopping is due."""
        result = self.evaluator.evaluate(self.engine, self.step)
        value = result[self.evaluator.metric]
        sinks.log_eval(result, self.step)
        new_best = improved(value, self.best["value"], self.evaluator.mode)
        if new_best:
            self.best = {
                "value": value,
                "tag": ckpt.tag_for(self.step),
                "step": self.step,
                "metric": self.evaluator.metric,
            }
            self.evals_without_improvement = 0
            save_adapter(self.model, self.out_dir / "adapter_best", write=self.info.is_main)
        else:
            self.evals_without_improvement += 1
        log_eval_result(
            self.step,
            self.evaluator.metric,
            value,
            new_best,
            self.best,
            self.evals_without_improvement,
        )
        return self.evals_without_improvement >= self.run.eval.patience

    def _checkpoint(self) -> None:
        if (self.ckpt_dir / ckpt.tag_for(self.step) / ckpt.COMPLETE).is_file():
            return
        state = {
            "step": self.step,
            "sampler": self.data.sampler.state_dict(),
            "best": self.best,
            "evals_without_improvement": self.evals_without_improvement,
            "nonfinite_in_row": self.nonfinite_in_row,
        }
        extra = {
            "run_config.json": self.run.to_dict(),
            "adapter_meta.json": adapter_metadata(self.model),
        }
        protect = {self.best["tag"]} if self.best.get("tag") else set()
        ckpt.save_checkpoint(
            self.engine,
            self.ckpt_dir,
            self.step,
            state,
            extra,
            self.run.checkpoint.keep_last,
            protect,
            self.info.rank,
        )

    def _finish(self, sinks: Sinks, stop_reason: str, seconds: float, tokens: float) -> dict:
        save_adapter(self.model, self.out_dir / "adapter", write=self.info.is_main)
        summary = build_summary(
            steps=self.step,
            stop_reason=stop_reason,
            best=self.best,
            history=self.history,
            report=self.report,
            world_size=self.info.world_size,
            zero_stage=zero_stage(self.ds_config),
            seconds=seconds,
            tokens=tokens,
            out_dir=self.out_dir,
            ckpt_dir=self.ckpt_dir,
        )
        sinks.finish(summary)
        return summary

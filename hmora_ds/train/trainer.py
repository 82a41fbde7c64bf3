"""One training run: wires the engine, the step, the loop's cadence and the output sinks.

* :mod:`hmora_ds.train.engine` builds the DeepSpeed engine (base, adapters, expert
  parallelism, optimizer, schedule);
* :mod:`hmora_ds.train.step` runs one optimizer step (global batch, loss scaling) and reads a
  logging window's metrics back in one transfer;
* :mod:`hmora_ds.train.loop` decides when to log, evaluate, checkpoint and stop, and holds the
  :class:`~hmora_ds.train.loop.LoopState` checkpoints carry;
* :mod:`hmora_ds.train.sinks` writes TensorBoard, the progress bar or lines, log lines,
  ``trainer_log.jsonl``, W&B, summary.json and ``loss_curve.png``.

:class:`Trainer` owns the run's objects and implements the loop's actions
(:class:`~hmora_ds.train.loop.LoopActions`) with them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from hmora_ds.adapter_io import adapter_metadata
from hmora_ds.full_model import output_dirs, save_trained
from hmora_ds.metrics import RouterStatsAccumulator
from hmora_ds.parallel.expert_parallel import validate_expert_parallel
from hmora_ds.runtime.dist import DistInfo, rank0_first
from hmora_ds.train.checkpoint import ResumePoint
from hmora_ds.train.config import RunConfig
from hmora_ds.train.data import (
    RunData,
    add_record_columns,
    build_run_data,
    prepare_records,
    resolve_max_steps,
)
from hmora_ds.train.deepspeed_config import zero_stage
from hmora_ds.train.engine import build_engine, plan_engine, resolve_base, seed_everything
from hmora_ds.train.evaluate import Evaluator, ValidationLoss
from hmora_ds.train.loop import (
    Cadence,
    LoopState,
    record_eval,
    record_window,
    restore_state,
    run_loop,
    save_state,
)
from hmora_ds.train.run_dir import finished_message
from hmora_ds.train.sinks import Sinks, build_summary, log_eval_result
from hmora_ds.train.stages import CLUSTER_INPUT, CLUSTERING_FILE, StagePlan, plan_stages
from hmora_ds.train.step import StepMetrics, train_step, window_metrics

logger = logging.getLogger(__name__)


class Trainer:
    """One training run.

    Args:
        run: the run config.
        ds_config: the parsed DeepSpeed JSON (its "auto" fields are filled from ``run``).
        info: this process's rank / device.
        resume: the verified checkpoint to resume from
            (:func:`hmora_ds.train.run_dir.plan_start` chooses it), or None.
        evaluator: overrides the default held-out-loss evaluator.
    """

    def __init__(
        self,
        run: RunConfig,
        ds_config: dict[str, Any],
        info: DistInfo,
        resume: ResumePoint | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        self.run = run
        self.info = info
        self.out_dir = Path(run.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.plan = plan_engine(run, ds_config, info)  # fails before anything is loaded
        self.ds_config, self.method = self.plan.ds_config, self.plan.method
        self.precision, self.autocast_dtype = self.plan.precision, self.plan.autocast_dtype
        self.stages: StagePlan | None = None
        self._setup_model_and_data(resume)
        # A per-rank stream for dropout from here on.
        seed_everything(run.train.seed + info.rank)
        self.evaluator = evaluator if evaluator is not None else self._default_evaluator()
        self.cadence = Cadence.from_run(run, self.evaluator is not None, self.method.has_mixture)
        self.resumed = resume is not None
        self.state: LoopState = restore_state(resume, self.engine, self.data.sampler, info.rank)
        self._sinks: Sinks | None = None
        self._batches = None
        self._started = time.time()
        self._seconds_before = self.state.seconds

    # ----------------------------------------------------------------- setup
    def _setup_model_and_data(self, resume: ResumePoint | None) -> None:
        run, info = self.run, self.info
        checkpoint, self.tokenizer = resolve_base(run, info.rank)
        # The offline mixture is built once (rank 0) before every rank reads it.
        rank0_first(lambda: prepare_records(run), info.rank)
        self.data: RunData = build_run_data(run, self.tokenizer, info.rank, info.world_size)
        resolve_max_steps(run, self.data, info.world_size)  # train.epochs: from the data
        # Two stages: the clustering decides the number of groups before the model exists.
        self.stages = plan_stages(run, self.plan.method, info, checkpoint, self.tokenizer,
                                  self.data.prompts, resume)  # fmt: skip
        if self.stages is not None:
            method = self.stages.method
            validate_expert_parallel(
                run.parallel.ep_size,
                method.adapter.num_experts,
                info.world_size,
                zero_stage(self.plan.ds_config),
                method.routing.mode,
                method.has_mixture,
            )
            self.plan = dataclasses.replace(self.plan, method=method)
            self.method = method
            self.data.columns[CLUSTER_INPUT] = self.stages.clustering.labels
        built = build_engine(run, self.plan, info, checkpoint, self.tokenizer, fresh=resume is None)
        self.engine, self.model = built.engine, built.model
        self.report, self.dp_group = built.report, built.dp_group
        add_record_columns(self.data, self.model.method)  # e.g. LoRAMoE's sample types

    def _default_evaluator(self) -> Evaluator | None:
        """Benchmarks (``eval.kind``), else the held-out loss; None without validation data."""
        run = self.run
        if run.eval.kind == "benchmarks":
            return rank0_first(self._benchmark_evaluator, self.info.rank)
        val = self.data.val_batches(run.eval.batch_size, run.eval.max_batches)
        if val:
            return ValidationLoss(val, self.info.device, self.autocast_dtype)
        logger.warning(
            "no validation records (data.val_fraction=%s, data.val_path=%s): validation, "
            "best-checkpoint selection and early stopping are off",
            run.data.val_fraction,
            run.data.val_path,
        )
        return None

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
            self.tokenizer,
            suite,
            score,
            self.info.device,
            self.autocast_dtype,
            progress=self.run.log.progress,  # a bar or a line per benchmark
        )

    # ----------------------------------------------------------------- the run
    def already_finished(self) -> str | None:
        """The message of a resumed run that has nothing left to do (its final outputs
        exist), else None; checked before :meth:`train` writes anything. (Usually decided
        before the model loads; this covers checkpoints without ``loop_state.json``.)"""
        if not self.resumed:
            return None
        state = {
            "step": self.state.step,
            "evals_without_improvement": self.state.evals_without_improvement,
        }
        return finished_message(
            state, self.out_dir, self.run.train.max_steps, self.run.eval.patience
        )

    def train(self) -> dict[str, Any]:
        """Train to a stop (see :mod:`hmora_ds.train.loop`); returns the summary."""
        t = self.run.train
        self._sinks = Sinks.open(
            self.out_dir,
            self.run.to_dict(),
            self.info.is_main,
            t.max_steps,
            self.state.step,
            t.log_every,
            log=self.run.log,
            steps_per_epoch=len(self.data.sampler) / t.grad_accum,
        )
        self._batches = self._stage_batches(self.data.batches())
        self._started = time.time()
        self.engine.train()
        try:
            try:
                stop_reason, _ = run_loop(self.state, self.cadence, self)
            finally:  # an error (a failed save) is then printed on a line of its own
                self._sinks.close_bar()
            return self._finish(stop_reason)
        finally:  # after a failure: trainer_log.jsonl closed, the W&B run marked failed
            self._sinks.close()

    def _stage_batches(self, batches):
        """The training batches, their ``cluster`` dropped from the first stage-2 step on
        (pulled inside the step, so ``state.step`` is the step being taken)."""
        announced = False
        for b in batches:
            if self.stages is not None and self.state.step >= self.stages.stage1_steps:
                b.pop(CLUSTER_INPUT, None)
                if not announced:
                    logger.info(
                        "step %d: HiMoLE stage 2 (every expert, both routers, lr x %s)",
                        self.state.step + 1,
                        self.stages.stage2_lr_scale,
                    )
                    announced = True
            yield b

    def _elapsed(self) -> float:
        """Training seconds of the whole run: earlier launches' plus this one's."""
        return self._seconds_before + time.time() - self._started

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
            autocast_dtype=self.autocast_dtype,
            dp_group=self.dp_group,
        )

    # ----------------------------------------------------------------- loop actions
    def run_step(self, router_stats: bool) -> tuple[StepMetrics, dict]:
        stats = RouterStatsAccumulator(self.model.stats_top_k) if router_stats else None
        raw = self.train_step(self._batches, stats)
        self._sinks.step_done()
        return raw, stats.finalize(self.dp_group) if stats is not None else {}

    def flush(self, pending, router, seconds: float) -> tuple[str | None, float]:
        """Read a window of steps back (one sync), check divergence, extend the history, log."""
        steps = [step for step, _ in pending]
        raws = [raw for _, raw in pending]
        metrics, tokens = window_metrics(raws, seconds, self.info.device)
        diverged = record_window(self.state, steps, metrics, self.cadence.max_nonfinite_steps)
        self._sinks.log_window(steps, metrics, router, elapsed=self._elapsed())
        return diverged, tokens

    def evaluate(self) -> bool:
        """Evaluate; keep the best adapter (a full fine-tune: model); True when early stopping
        is due."""
        step, ev = self.state.step, self.evaluator
        result = ev.evaluate(self.engine, step)
        value = result[ev.metric]
        new_best = record_eval(self.state, value, ev.metric, ev.mode)
        self._sinks.log_eval(result, step, ev.metric, self.state.best, new_best, self._elapsed())
        if new_best:
            best = output_dirs(self.model.config.full_finetune)[1]
            save_trained(self.model, self.out_dir / best, self.tokenizer, write=self.info.is_main)
        s = self.state
        log_eval_result(step, ev.metric, value, new_best, s.best, s.evals_without_improvement)
        return self.cadence.patience_exhausted(self.state)

    def checkpoint(self) -> None:
        self.state.seconds = self._elapsed()
        save_state(
            self.engine,
            self.ckpt_dir,
            self.state,
            self.data.sampler,
            lambda: {
                "run_config.json": self.run.to_dict(),
                "adapter_meta.json": adapter_metadata(self.model),
                **({CLUSTERING_FILE: self.stages.document} if self.stages is not None else {}),
            },
            self.run.checkpoint.keep_last,
            self.info.rank,
        )

    # ----------------------------------------------------------------- the end
    def _finish(self, stop_reason: str) -> dict[str, Any]:
        final = output_dirs(self.model.config.full_finetune)[0]
        save_trained(self.model, self.out_dir / final, self.tokenizer, write=self.info.is_main)
        self.state.seconds = self._elapsed()
        summary = build_summary(
            steps=self.state.step,
            stop_reason=stop_reason,
            best=self.state.best,
            history=self.state.history,
            report=self.report,
            world_size=self.info.world_size,
            zero_stage=zero_stage(self.ds_config),
            seconds=self.state.seconds,
            tokens=self.state.tokens,
            out_dir=self.out_dir,
            ckpt_dir=self.ckpt_dir,
            clustering=(self.stages.summary() if self.stages is not None else None),
            full_model=self.model.config.full_finetune,
        )
        self._sinks.finish(summary)
        return summary

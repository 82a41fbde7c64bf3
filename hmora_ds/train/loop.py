"""The training loop's cadence and the state it carries across checkpoints.

:func:`run_loop` decides *when*: a step every iteration up to ``train.max_steps``; a logging
window read back from the device every ``train.log_every`` steps (and ``log.progress_every``
steps), at step 1, at steps with router statistics and before every evaluation and checkpoint
(reading back costs a host-device sync, so it never happens inside a step); an evaluation
every ``eval.every`` steps and at the end; a checkpoint every ``checkpoint.every`` steps, at
the end, at every new best and before early stopping. *What* happens is the caller's
(:class:`LoopActions`, the :class:`~hmora_ds.train.trainer.Trainer`).

Stops: ``max_steps``; ``eval.patience`` evaluations in a row without improvement; or
``train.max_nonfinite_steps`` non-finite steps in a row (DeepSpeed skips such an update, its
grad-norm check, and we count it). Divergence is noticed at the end of the window it happened in.

:class:`LoopState` is what a checkpoint stores of the loop: DeepSpeed's ``client_state`` (keys
``step``, ``sampler``, ``best``, ``evals_without_improvement``, ``nonfinite_in_row``) and, with
the loss history, tokens and seconds added, the checkpoint's ``loop_state.json``, which a
resumed run starts from (so its summary covers the whole run).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hmora_ds.train import checkpoint as ckpt
from hmora_ds.train.config import RunConfig
from hmora_ds.train.evaluate import improved
from hmora_ds.train.sinks import log_nonfinite

logger = logging.getLogger(__name__)


def _no_best() -> dict[str, Any]:
    return {"value": None, "tag": None, "step": None}


@dataclass
class LoopState:
    """Where the loop stands.

    Attributes:
        step: optimizer steps done.
        best: the best evaluation so far: ``value``, ``tag`` (its checkpoint), ``step`` (all
            None before the first evaluation) and, once set, ``metric``.
        evals_without_improvement: evaluations in a row that did not beat ``best``.
        nonfinite_in_row: non-finite steps in a row (their updates were skipped).
        history: ``{step, loss, lm_loss}`` of every step of the run (a resumed run restores
            the steps before its checkpoint from ``loop_state.json``).
        tokens: attended tokens of the run so far.
        seconds: training time of the run so far (every session that trained it).
    """

    step: int = 0
    best: dict[str, Any] = field(default_factory=_no_best)
    evals_without_improvement: int = 0
    nonfinite_in_row: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    tokens: float = 0.0
    seconds: float = 0.0

    def client_state(self, sampler_state: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's ``client_state``: this state plus the data sampler's position."""
        return {
            "step": self.step,
            "sampler": sampler_state,
            "best": self.best,
            "evals_without_improvement": self.evals_without_improvement,
            "nonfinite_in_row": self.nonfinite_in_row,
        }

    @classmethod
    def from_client_state(cls, state: dict[str, Any]) -> LoopState:
        """Inverse of :meth:`client_state` (the sampler's part is restored by the caller)."""
        return cls(
            step=int(state["step"]),
            best=state["best"],
            evals_without_improvement=int(state["evals_without_improvement"]),
            nonfinite_in_row=int(state["nonfinite_in_row"]),
        )

    def to_json(self, sampler_state: dict[str, Any]) -> dict[str, Any]:
        """``loop_state.json``: the client state plus history, tokens and seconds."""
        return {
            **self.client_state(sampler_state),
            "history": self.history,
            "tokens": self.tokens,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoopState:
        """Inverse of :meth:`to_json` (the sampler's part is restored by the caller)."""
        state = cls.from_client_state(data)
        state.history = [dict(h) for h in data.get("history", [])]
        state.tokens = float(data.get("tokens", 0.0))
        state.seconds = float(data.get("seconds", 0.0))
        return state

    def protected_tags(self) -> set[str]:
        """Checkpoints pruning must keep: the best one."""
        return {self.best["tag"]} if self.best.get("tag") else set()


@dataclass(frozen=True)
class Cadence:
    """The loop's schedule, from the run config (see the module doc)."""

    max_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    router_stats_every: int
    patience: int
    max_nonfinite_steps: int
    evaluates: bool  # an evaluator exists (no validation data: no evaluations)
    router_stats: bool  # the method has routers whose statistics are logged
    progress_every: int = 0  # log.progress_every (0: none); progress lines need a read-back

    @classmethod
    def from_run(cls, run: RunConfig, evaluates: bool, has_mixture: bool) -> Cadence:
        t = run.train
        return cls(
            max_steps=t.max_steps,
            log_every=t.log_every,
            eval_every=run.eval.every,
            checkpoint_every=run.checkpoint.every,
            router_stats_every=t.router_stats_every,
            patience=run.eval.patience,
            max_nonfinite_steps=t.max_nonfinite_steps,
            evaluates=evaluates,
            router_stats=has_mixture,
            progress_every=run.log.progress_every or t.log_every,
        )

    def wants_router_stats(self, step: int) -> bool:
        return self.router_stats and step % self.router_stats_every == 0

    def due_eval(self, step: int) -> bool:
        return self.evaluates and (step % self.eval_every == 0 or step == self.max_steps)

    def due_checkpoint(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.max_steps

    def due_flush(self, step: int, router: dict, due_eval: bool, due_ckpt: bool) -> bool:
        """Read the window back: a logging or progress-line step, router statistics, or an
        eval / checkpoint (which must see every step's metrics) follows. (Decided from the
        config alone, never from a terminal: every rank reads back at the same steps.)"""
        progress = self.progress_every and step % self.progress_every == 0
        return (
            step % self.log_every == 0
            or step == 1
            or bool(progress)
            or bool(router)
            or due_eval
            or due_ckpt
        )

    def patience_exhausted(self, state: LoopState) -> bool:
        return state.evals_without_improvement >= self.patience


class LoopActions(Protocol):
    """What the loop drives (every rank calls each at the same steps: they may be collective)."""

    def run_step(self, router_stats: bool) -> tuple[Any, dict]:
        """One optimizer step: (its device metrics, its router statistics or {})."""
        ...

    def flush(self, pending: list[tuple[int, Any]], router: dict, seconds: float):
        """Read back, record and log a window of (step, device metrics) that took ``seconds``;
        ``router`` belongs to its last step. Returns (a divergence stop reason or None, the
        window's tokens)."""
        ...

    def evaluate(self) -> bool:
        """Evaluate at ``state.step``, update the best; True when early stopping is due."""
        ...

    def checkpoint(self) -> None: ...


def run_loop(state: LoopState, cadence: Cadence, actions: LoopActions) -> tuple[str, float]:
    """Train from ``state.step`` to a stop; returns (stop reason, tokens seen by this call).

    A state that already stopped early (resumed from the checkpoint written before early
    stopping) trains no further step.
    """
    stop_reason, tokens_seen = "max_steps", 0.0
    early_stop = f"early stopping ({cadence.patience} evaluations without gain)"
    if cadence.evaluates and cadence.patience_exhausted(state):
        return early_stop, tokens_seen
    # Steps not yet read back from the device: (step, device metrics).
    pending: list[tuple[int, Any]] = []
    window_start = time.time()
    while state.step < cadence.max_steps:
        raw, router = actions.run_step(cadence.wants_router_stats(state.step + 1))
        state.step += 1
        pending.append((state.step, raw))
        due_eval = cadence.due_eval(state.step)
        due_ckpt = cadence.due_checkpoint(state.step)
        if cadence.due_flush(state.step, router, due_eval, due_ckpt):
            now = time.time()
            diverged, tokens = actions.flush(pending, router, now - window_start)
            tokens_seen += tokens
            state.tokens += tokens
            pending, window_start = [], now
            if diverged:
                stop_reason = diverged
                break
        stop = due_eval and actions.evaluate()
        # A new best is always checkpointed (and protected from pruning).
        new_best = due_eval and state.best["step"] == state.step
        if stop or new_best or due_ckpt:
            actions.checkpoint()
        if stop:
            stop_reason = early_stop
            break
    if pending:
        diverged, tokens = actions.flush(pending, {}, time.time() - window_start)
        tokens_seen += tokens
        state.tokens += tokens
        stop_reason = diverged or stop_reason
    return stop_reason, tokens_seen


def record_window(
    state: LoopState, steps: list[int], metrics: list[dict[str, float]], max_nonfinite: int
) -> str | None:
    """Extend the non-finite streak and the history with a window's steps.

    Returns the stop reason once ``max_nonfinite`` non-finite steps came in a row, else None.
    """
    diverged = None
    for step, m in zip(steps, metrics, strict=True):
        if not m["applied"] or not math.isfinite(m["loss"]):
            state.nonfinite_in_row += 1
            log_nonfinite(step, m["loss"], state.nonfinite_in_row)
            if state.nonfinite_in_row >= max_nonfinite and not diverged:
                diverged = f"{state.nonfinite_in_row} non-finite steps in a row"
        else:
            state.nonfinite_in_row = 0
        state.history.append({"step": step, "loss": m["loss"], "lm_loss": m["lm_loss"]})
    return diverged


def record_eval(state: LoopState, value: float, metric: str, mode: str) -> bool:
    """Update the best (``mode``: ``min`` / ``max``) with an evaluation at ``state.step``;
    True when it is a new best. A non-finite value is never the best (a warning says so) and
    counts as an evaluation without improvement."""
    if not math.isfinite(value):
        logger.warning(
            "step %d: %s is %s (not finite): not a best checkpoint", state.step, metric, value
        )
    if improved(value, state.best["value"], mode):
        state.best = {
            "value": value,
            "tag": ckpt.tag_for(state.step),
            "step": state.step,
            "metric": metric,
        }
        state.evals_without_improvement = 0
        return True
    state.evals_without_improvement += 1
    return False


def restore_state(
    point: ckpt.ResumePoint | None, engine: Any, sampler: Any, rank: int
) -> LoopState:
    """The loop state to start from: fresh (``point`` None), or restored from a verified
    checkpoint (:mod:`hmora_ds.train.run_dir` chose it) with engine, sampler and RNG."""
    if point is None:
        return LoopState()
    client_state = ckpt.load_checkpoint(engine, point, rank)
    if point.loop_state is not None:
        state = LoopState.from_json(point.loop_state)
    else:
        state = LoopState.from_client_state(client_state)
        logger.warning(
            "%s has no %s (saved by an older hmora-ds): the loss history before step %d is "
            "not restored, so summary.json covers the steps from here on",
            point.tag_dir,
            ckpt.LOOP_STATE,
            state.step,
        )
    sampler.load_state_dict(client_state["sampler"])
    logger.info("resumed from %s at step %d", point.tag_dir, state.step)
    return state


def save_state(
    engine: Any,
    ckpt_dir: Path,
    state: LoopState,
    sampler: Any,
    extra_files: Callable[[], dict[str, Any]],
    keep_last: int,
    rank: int,
) -> None:
    """Checkpoint at ``state.step`` (every rank calls this); a checkpoint of the same step
    (one that failed verification, from before a fallback resume) is replaced.

    ``extra_files`` (name → JSON content, written by rank 0) is called at every save;
    ``loop_state.json`` is added to them.
    """
    sampler_state = sampler.state_dict()
    files = {**extra_files(), ckpt.LOOP_STATE: state.to_json(sampler_state)}
    ckpt.save_checkpoint(
        engine,
        ckpt_dir,
        state.step,
        state.client_state(sampler_state),
        files,
        keep_last,
        state.protected_tags(),
        rank,
    )

"""What a run may do with its ``output_dir``: decided on rank 0 before the model loads.

* **A new run** (no ``--resume``) needs an empty or absent ``output_dir``. Anything else is
  refused in one line naming the ways out: ``--resume auto``, a new or empty directory, or
  ``--overwrite``, which first deletes the previous run's own outputs (:data:`RUN_OUTPUTS`)
  and nothing else (evaluations or notes written there stay).
* **--resume auto** continues from the newest checkpoint that verifies
  (:func:`hmora_ds.train.checkpoint.newest_verified`: a corrupt one is skipped, naming the
  file, for the next older one). Without any complete checkpoint it starts the run over,
  removing what a run interrupted before its first checkpoint left (TensorBoard events,
  router statistics, unfinished saves), but refuses when the directory holds a run's results
  (``adapter/``, ``adapter_best/``, ``summary.json``) it cannot continue.
* **--resume PATH**: that checkpoint, verified, no fallback. It may come from another run's
  directory, and then ``output_dir`` must be empty as for a new run.
* **A finished run** (its newest checkpoint is at ``train.max_steps`` or stopped early, and
  its ``summary.json`` and ``adapter/`` were written) is left exactly as it is: nothing is
  loaded and no file is written. A checkpoint at the end whose final outputs are missing (the
  run was killed while writing them) is resumed: no step is trained, the outputs are written.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hmora_ds.train import checkpoint as ckpt

logger = logging.getLogger(__name__)

#: A training run's own outputs in ``output_dir``: what ``--overwrite`` deletes.
RUN_OUTPUTS = (
    "checkpoints",
    "adapter",
    "adapter_best",
    "model",
    "model_best",
    "tensorboard",
    "summary.json",
    "run_config.json",
    "router_stats.jsonl",
    "clustering.json",
    "trainer_log.jsonl",
    "loss_curve.png",
    "wandb",
)
#: Outputs that only a run that got somewhere writes: ``--resume auto`` will not start over
#: on top of them.
RESULTS = ("adapter", "adapter_best", "model", "model_best", "summary.json")

T = TypeVar("T")


@dataclass(frozen=True)
class StartPlan:
    """How the run starts: ``point`` None is a fresh start; ``finished`` is the message of a
    run that has nothing left to do."""

    point: ckpt.ResumePoint | None = None
    finished: str | None = None


def _entries(out_dir: Path) -> list[str]:
    if not out_dir.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir())


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def clear_run_outputs(out_dir: Path) -> list[str]:
    """Delete the run's own outputs (:data:`RUN_OUTPUTS`) from ``out_dir``; returns them."""
    removed = []
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def refusal(out_dir: Path, entries: list[str]) -> str:
    return (
        f"output_dir {out_dir} is not empty ({_listing(entries)}): pass --resume auto to "
        "continue the run there, choose a new or empty output_dir, or pass --overwrite to "
        f"delete the previous run's outputs there ({', '.join(RUN_OUTPUTS)}) and start over"
    )


def finished_message(
    loop_state: dict[str, Any] | None, out_dir: Path, max_steps: int, patience: int
) -> str | None:
    """The message for a run that has nothing left to do, else None (see the module doc)."""
    if loop_state is None:
        return None
    step = int(loop_state["step"])
    if step < max_steps and int(loop_state["evals_without_improvement"]) < patience:
        return None
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    saved = (out_dir / "adapter").is_dir() or (out_dir / "model").is_dir()
    if summary.get("steps") != step or not saved:
        return None
    return (
        f"the run in {out_dir} is finished ({step} steps, {summary.get('stop_reason')}): "
        "nothing to do, its outputs are left as they are (train.max_steps or eval.patience "
        "raised would continue it)"
    )


def plan_start(
    out_dir: Path, resume: str | None, overwrite: bool, max_steps: int, patience: int
) -> StartPlan:
    """Decide how the run starts (rank 0; see the module doc).

    Raises:
        ValueError: the one-line reason the run cannot start (a non-empty ``output_dir``, a
            checkpoint that fails verification, ...).
    """
    ckpt_dir = out_dir / "checkpoints"
    if overwrite:
        if resume is not None:
            raise ValueError("--overwrite starts the run over; it cannot go with --resume")
        removed = clear_run_outputs(out_dir)
        if removed:
            kept = _entries(out_dir)
            logger.warning(
                "--overwrite: deleted the previous run's %s from %s%s",
                ", ".join(removed),
                out_dir,
                f" (kept: {_listing(kept)})" if kept else "",
            )
        return StartPlan()
    if resume is None:
        entries = _entries(out_dir)
        if entries:
            raise ValueError(refusal(out_dir, entries))
        return StartPlan()
    if resume == "auto":
        point = ckpt.newest_verified(ckpt_dir)
        if point is None:
            results = [name for name in RESULTS if (out_dir / name).exists()]
            if results:
                raise ValueError(
                    f"--resume auto: {out_dir} holds a run's results ({', '.join(results)}) "
                    f"but no complete checkpoint in {ckpt_dir} to continue from: choose a new "
                    "or empty output_dir, or pass --overwrite (without --resume) to start over"
                )
            removed = clear_run_outputs(out_dir)
            logger.info(
                "resume=auto: no checkpoint in %s, starting fresh%s",
                ckpt_dir,
                f" (removed the interrupted start's {', '.join(removed)})" if removed else "",
            )
            return StartPlan()
    else:
        point = ckpt.verified(resume)
        if point.ckpt_dir.resolve() != ckpt_dir.resolve():
            entries = _entries(out_dir)
            if entries:
                raise ValueError(refusal(out_dir, entries))
    if point.loop_state is not None:
        step = point.loop_state["step"]
        logger.info("resume: checkpoint %s (step %d) verified", point.tag_dir, step)
    else:
        logger.info("resume: checkpoint %s", point.tag_dir)
    return StartPlan(point, finished_message(point.loop_state, out_dir, max_steps, patience))


def on_rank0(fn: Callable[[], T], rank: int, world_size: int) -> T:
    """``fn()`` on rank 0, its result (or its error, re-raised as ValueError) on every rank:
    the others never wait for a rank that already gave up."""
    import torch.distributed as dist

    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # every rank must hear of it, whatever it is
            box[0] = ("error", str(err) if isinstance(err, ValueError) else repr(err))
    if world_size > 1:
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ValueError(value)
    return value

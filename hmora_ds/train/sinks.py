"""Where a training run's outputs go: TensorBoard, the progress bar, ``router_stats.jsonl``,
log lines, ``summary.json`` and the closing summary the launcher prints.

Nothing here decides *when* something is written (the loop's cadence,
:mod:`hmora_ds.train.loop`) or computes a metric (:mod:`hmora_ds.train.step`). Files and
TensorBoard are rank 0's: on the other ranks :class:`Sinks` writes nothing (its writer is None
and its bar disabled), so callers need no rank checks. Log lines are emitted on every rank; the
logging setup (``train/dist.py``) keeps INFO to rank 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hmora_ds.full_model import output_dirs

logger = logging.getLogger(__name__)

#: Per-step scalars written as ``train/<key>`` (when present), in this order; then the
#: per-kind auxiliary losses ``train/aux_loss_<kind>``.
TRAIN_SCALARS = ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb")


def open_tensorboard(out_dir: Path, run_config: dict[str, Any], initial_step: int = 0):
    """Create ``out_dir``, write the resolved ``run_config.json`` there, return a SummaryWriter.

    A run resumed at ``initial_step`` hides the events its previous session logged after that
    step (TensorBoard's ``purge_step``) and drops those lines of ``router_stats.jsonl``, so
    the steps it repeats are not shown twice.
    """
    from torch.utils.tensorboard import SummaryWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run_config.json").write_text(json.dumps(run_config, indent=2))
    if initial_step:
        _drop_router_stats_after(out_dir / "router_stats.jsonl", initial_step)
        return SummaryWriter(str(out_dir / "tensorboard"), purge_step=initial_step + 1)
    return SummaryWriter(str(out_dir / "tensorboard"))


def _drop_router_stats_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by the interruption
            continue
    if len(kept) != len(lines):
        path.write_text("".join(kept))


class Sinks:
    """This rank's outputs of one run: TensorBoard writer (rank 0), tqdm bar, router stats.

    Args:
        out_dir: the run's output directory (``router_stats.jsonl`` goes there).
        writer: a SummaryWriter on rank 0, None elsewhere.
        bar: the progress bar (disabled off rank 0).
        is_main: rank 0.
        log_every: ``train.log_every``: per-step scalars are written at multiples of it, at
            step 1 and at steps with router statistics (a window may hold more steps).
    """

    def __init__(self, out_dir: Path, writer, bar, is_main: bool, log_every: int) -> None:
        self.out_dir = out_dir
        self.writer = writer
        self.bar = bar
        self.is_main = is_main
        self.log_every = log_every

    @classmethod
    def open(
        cls,
        out_dir: Path,
        run_config: dict[str, Any],
        is_main: bool,
        max_steps: int,
        initial_step: int,
        log_every: int,
    ) -> Sinks:
        """The run's sinks: TensorBoard (and ``run_config.json``) on rank 0, then the bar."""
        writer = open_tensorboard(out_dir, run_config, initial_step) if is_main else None
        bar = tqdm(
            total=max_steps,
            initial=initial_step,
            desc="train",
            unit="step",
            disable=not is_main,
            dynamic_ncols=True,
        )
        return cls(out_dir, writer, bar, is_main, log_every)

    def step_done(self) -> None:
        self.bar.update(1)

    def close_bar(self) -> None:
        self.bar.close()

    def log_window(
        self,
        steps: list[int],
        metrics: list[dict[str, float]],
        router: dict[str, dict[str, torch.Tensor]],
    ) -> None:
        """Write a logging window's steps; ``router`` (its statistics) belongs to the last step.

        The bar's postfix shows the window's last step (``tokens_per_s`` is the window's).
        """
        if not self.is_main:
            return
        for step, m in zip(steps, metrics, strict=True):
            self.log_step(step, m, router if step == steps[-1] else {})
        if metrics:
            last = metrics[-1]
            self.bar.set_postfix(
                loss=f"{last['loss']:.4f}",
                aux=f"{last['aux_loss']:.3f}",
                tok_s=f"{last['tokens_per_s']:.0f}",
            )

    def log_step(
        self, step: int, m: dict[str, float], router: dict[str, dict[str, torch.Tensor]]
    ) -> None:
        """One step's scalars (at logging steps) and router statistics (when present)."""
        if self.writer is None:
            return
        if step % self.log_every == 0 or step == 1 or router:
            for key in TRAIN_SCALARS:
                if key in m:
                    self.writer.add_scalar(f"train/{key}", m[key], step)
            for key in m:
                if key.startswith("aux_loss_"):
                    self.writer.add_scalar(f"train/{key}", m[key], step)
        if router:
            self.log_router(step, router)

    def log_router(self, step: int, router: dict[str, dict[str, torch.Tensor]]) -> None:
        """Router name → {balance (), certainty (), load (E,)}: three scalars per router in
        TensorBoard (a fourth, ``router_active_experts``, for routers with a variable number
        of experts per token), the full statistics as one line of ``router_stats.jsonl``."""
        record: dict[str, Any] = {"step": step}
        for name, s in router.items():
            self.writer.add_scalar(f"router_balance/{name}", s["balance"].item(), step)
            self.writer.add_scalar(f"router_certainty/{name}", s["certainty"].item(), step)
            self.writer.add_scalar(f"router_load_max/{name}", s["load"].max().item(), step)
            if "active_experts" in s:
                self.writer.add_scalar(
                    f"router_active_experts/{name}", s["active_experts"].item(), step
                )
            record[name] = {k: v.tolist() for k, v in s.items()}
        with (self.out_dir / "router_stats.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log_eval(self, result: dict[str, float], step: int) -> None:
        """An evaluation's results as ``eval/<key>`` scalars."""
        if self.is_main and self.writer is not None:
            for k, v in result.items():
                self.writer.add_scalar(f"eval/{k}", v, step)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` and close TensorBoard (rank 0)."""
        if self.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if self.writer is not None:
                self.writer.close()


def log_nonfinite(step: int, loss: float, in_row: int) -> None:
    logger.warning(
        "step %d: non-finite loss or gradient (loss %s); update skipped (%d in a row)",
        step,
        loss,
        in_row,
    )


def log_eval_result(
    step: int, metric: str, value: float, new_best: bool, best: dict[str, Any], without_gain: int
) -> None:
    """The evaluation line: a new best, or the best so far and the evaluations without gain."""
    if new_best:
        logger.info("step %d: %s = %.4f (best so far)", step, metric, value)
        return
    if best["value"] is None:  # every evaluation so far was non-finite
        logger.info(
            "step %d: %s = %.4f (no best yet; %d without gain)", step, metric, value, without_gain
        )
        return
    logger.info(
        "step %d: %s = %.4f (best %.4f at step %d; %d without gain)",
        step,
        metric,
        value,
        best["value"],
        best["step"],
        without_gain,
    )


def lm_loss_ends(history: list[dict[str, float]]) -> tuple[float | None, float | None]:
    """Mean LM loss of the first and of the last few steps (a window of 1–10 steps, a quarter
    of the history), None without history."""
    window = max(1, min(10, len(history) // 4 or 1))
    first = [h["lm_loss"] for h in history[:window]]
    last = [h["lm_loss"] for h in history[-window:]]
    return (
        sum(first) / len(first) if first else None,
        sum(last) / len(last) if last else None,
    )


def build_summary(
    *,
    steps: int,
    stop_reason: str,
    best: dict[str, Any],
    history: list[dict[str, float]],
    report: Any,
    world_size: int,
    zero_stage: int,
    seconds: float,
    tokens: float,
    out_dir: Path,
    ckpt_dir: Path,
    clustering: dict[str, Any] | None = None,
    full_model: bool = False,
) -> dict[str, Any]:
    """The content of ``summary.json`` (keys in this order); ``report`` is the model's
    :class:`~hmora_ds.params.ParameterReport`, ``tokens`` the run's attended tokens,
    ``clustering`` a two-stage run's (:meth:`hmora_ds.train.stages.StagePlan.summary`).
    ``adapter`` / ``adapter_best`` name the saved adapters; a full fine-tune (``full_model``)
    has ``model`` / ``model_best`` instead."""
    first, last = lm_loss_ends(history)
    final, best_name = output_dirs(full_model)
    extra = {"clustering": clustering} if clustering is not None else {}
    return {
        "steps": steps,
        "stop_reason": stop_reason,
        "lm_loss_first": first,
        "lm_loss_last": last,
        "best": best,
        "trainable_parameters": report.trainable,
        "tp_percent": report.tp_percent,
        "world_size": world_size,
        "zero_stage": zero_stage,
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        final: str(out_dir / final),
        best_name: str(out_dir / best_name) if best["tag"] else None,
        "checkpoints": str(ckpt_dir),
        "tensorboard": str(out_dir / "tensorboard"),
        **extra,
        "history": history,
    }


def format_summary(s: dict) -> str:
    """The closing summary printed by rank 0 (all of it is in <output_dir>/summary.json)."""
    best = s["best"]
    lines = [
        "",
        f"== hmora-ds run finished: {s['steps']} steps ({s['stop_reason']}), "
        f"{s['world_size']} rank(s), ZeRO-{s['zero_stage']}, {s['seconds'] / 60:.1f} min",
        f"   LM loss      {s['lm_loss_first']:.4f} (first steps) -> {s['lm_loss_last']:.4f} (last)",
    ]
    if best.get("value") is not None:
        lines.append(f"   best {best['metric']} {best['value']:.4f} at step {best['step']}")
    lines += [
        f"   trainable    {s['trainable_parameters']:,} parameters, TP {s['tp_percent']:.2f}%",
        f"   throughput   {s['tokens_per_s']:.0f} tokens/s",
    ]
    what = "model" if "model" in s else "adapter"
    lines.append(f"   {what:<12} {s[what]}")
    if s.get(f"{what}_best"):
        lines.append(f"   best {what:<7} {s[what + '_best']}")
    c = s.get("clustering")
    if c:
        scores = ", ".join(f"{k}: {v:.3f}" for k, v in c["silhouette"].items())
        lines.append(
            f"   stage 1      {c['stage1_steps']} steps on N={c['chosen_n']} clusters (sizes "
            f"{c['sizes']}, silhouette {{{scores}}}, {c['encoder']}); stage 2 lr x "
            f"{c['stage2_lr_scale']}"
        )
    lines += [
        f"   checkpoints  {s['checkpoints']}",
        f"   tensorboard  tensorboard --logdir {s['tensorboard']}",
    ]
    return "\n".join(lines)

"""Where a training run's outputs go: TensorBoard, the progress bar or progress lines,
``router_stats.jsonl``, ``trainer_log.jsonl``, Weights & Biases, log lines, ``summary.json``,
``loss_curve.png`` and the closing summary the launcher prints (docs/reliability.md, "Logs").

Nothing here decides *when* something is written (the loop's cadence,
:mod:`hmora_ds.train.loop`) or computes a metric (:mod:`hmora_ds.train.step`). Files,
TensorBoard and W&B are rank 0's: on the other ranks :class:`Sinks` writes nothing (its writer
is None and its bar disabled), so callers need no rank checks. Log lines are emitted on every
rank; the logging setup (``runtime/dist.py``) keeps INFO to rank 0.

Progress (``log.progress``): in a terminal a tqdm bar; elsewhere (SLURM, ``make train > log``)
a plain line every ``log.progress_every`` steps (:func:`format_progress`), written as the
window holding that step is read back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hmora_ds.full_model import output_dirs
from hmora_ds.runtime.dist import resolve_progress

logger = logging.getLogger(__name__)

ROUTER_STATS = "router_stats.jsonl"
TRAINER_LOG = "trainer_log.jsonl"
LOSS_CURVE = "loss_curve.png"

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
        drop_lines_after(out_dir / ROUTER_STATS, initial_step)
        return SummaryWriter(str(out_dir / "tensorboard"), purge_step=initial_step + 1)
    return SummaryWriter(str(out_dir / "tensorboard"))


def drop_lines_after(path: Path, step: int) -> None:
    """Keep the lines of a JSONL file whose ``step`` is at most ``step`` (a resumed run
    repeats the later ones); a line cut short by the interruption goes too."""
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


# ----------------------------------------------------------------- progress lines
def format_duration(seconds: float | None) -> str:
    """``42s``, ``3m12s``, ``2h05m``, ``3d04h``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def eta_seconds(step: int, max_steps: int, first_step: int, seconds: float) -> float | None:
    """Seconds left at ``step`` of ``max_steps``, at the pace of this launch: ``seconds``
    spent on steps ``first_step + 1 … step``. None before this launch's first step."""
    done = step - first_step
    if done <= 0 or seconds < 0:
        return None
    return seconds / done * max(0, max_steps - step)


def format_progress(
    step: int, max_steps: int, m: dict[str, float], elapsed: float | None, eta: float | None
) -> str:
    """One progress line, e.g. ``step 40/200 (20%) | loss 2.3141 | lm 2.2012 | aux 0.113 |
    lr 2.8e-04 | gnorm 0.52 | 1,234 tok/s | elapsed 3m12s | ETA 12m50s`` (``aux`` when the
    method has an auxiliary loss, ``gnorm`` when DeepSpeed reports a gradient norm). The ETA
    is at this launch's pace (:func:`eta_seconds`)."""
    pct = 100 * step / max_steps if max_steps else 100.0
    parts = [f"step {step}/{max_steps} ({pct:.0f}%)", f"loss {m['loss']:.4f}"]
    if "lm_loss" in m:
        parts.append(f"lm {m['lm_loss']:.4f}")
    if m.get("aux_loss"):
        parts.append(f"aux {m['aux_loss']:.3f}")
    if "lr" in m:
        parts.append(f"lr {m['lr']:.1e}")
    if m.get("grad_norm") is not None:
        parts.append(f"gnorm {m['grad_norm']:.3g}")
    if "tokens_per_s" in m:
        parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    parts += [f"elapsed {format_duration(elapsed)}", f"ETA {format_duration(eta)}"]
    return " | ".join(parts)


# ----------------------------------------------------------------- trainer_log.jsonl
def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class TrainerLog:
    """``trainer_log.jsonl``: one JSON object per logged step (``"kind": "train"``) and per
    evaluation (``"kind": "eval"``), flushed line by line (rank 0). A resumed run first drops
    the lines after its checkpoint's step, so every step appears once. Non-finite numbers are
    written as null (the file stays plain JSON)."""

    def __init__(self, path: Path, initial_step: int) -> None:
        self.path = path
        if initial_step:
            drop_lines_after(path, initial_step)
            self._file = path.open("a")
        else:  # a fresh start: nothing of an earlier run belongs here
            self._file = path.open("w")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; a failed write (a full disk) is logged once and ends this file,
        not the run (the checkpoint writer reports a full disk in its own words)."""
        if self._file is None:
            return
        clean = {k: _finite_or_none(v) for k, v in record.items()}
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as err:
            logger.warning("%s: cannot write (%s); no further lines", self.path, err)
            self.close()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()


def read_trainer_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``trainer_log.jsonl`` (a line cut short is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


# ----------------------------------------------------------------- Weights & Biases
class WandbSink:
    """A W&B run of this launch of a training run (rank 0): the TensorBoard scalars and the run
    config. A resumed run starts a new W&B run in the same group (named as the first), so
    the launches of one run sit together; ``trainer_log.jsonl`` holds the run's one history."""

    def __init__(self, run: Any) -> None:
        self.run = run

    @classmethod
    def open(
        cls, log: Any, out_dir: Path, run_config: dict[str, Any], initial_step: int
    ) -> WandbSink | None:
        """Start the W&B run (files under ``<out_dir>/wandb``); None, with a warning, when
        wandb cannot start (e.g. ``online`` without credentials): the run goes on without."""
        try:
            import wandb
        except ImportError as err:
            logger.warning("log.wandb: wandb cannot be imported (%s): no W&B logging", err)
            return None
        name = log.wandb_run_name or out_dir.resolve().name
        config = {**run_config, "resumed_at_step": initial_step}
        try:
            run = wandb.init(
                project=log.wandb_project,
                name=name,
                group=name,
                job_type="train",
                dir=str(out_dir),
                mode=log.wandb_mode,
                config=config,
                # Our log says where the run is; W&B's own lines and console capture stay off.
                settings=wandb.Settings(console="off", silent=True, save_code=False),
            )
        except Exception as err:  # a logging backend must not end the run
            logger.warning("log.wandb: W&B did not start (%s): no W&B logging", err)
            return None
        url = getattr(run, "url", None) if log.wandb_mode == "online" else None
        where = url or Path(getattr(run, "dir", None) or out_dir / "wandb").parent
        logger.info("W&B run %s (%s): %s", name, log.wandb_mode, where)
        return cls(run)

    def log(self, scalars: dict[str, float], step: int) -> None:
        if not scalars or self.run is None:
            return
        try:
            self.run.log(scalars, step=step)
        except Exception as err:  # a logging backend must not end the run
            logger.warning("log.wandb: W&B logging failed (%s): no further W&B logging", err)
            self.finish(exit_code=1)

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as err:
                logger.warning("log.wandb: finishing the W&B run failed (%s)", err)


# ----------------------------------------------------------------- loss_curve.png
def write_loss_curve(
    path: Path, history: list[dict[str, float]], evals: list[dict[str, Any]]
) -> bool:
    """Plot LM and total loss per step and the validation metric per evaluation (second axis)
    into ``path`` (matplotlib's Agg renderer, no display needed). False, with one log line,
    without matplotlib or history."""
    if not history:
        return False
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return False

    def finite(v: Any) -> float:
        return v if isinstance(v, (int, float)) and math.isfinite(v) else math.nan

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [h["step"] for h in history]
    # A long run's per-step losses are noisy: drawn faintly, under a moving average.
    window = len(history) // 50 if len(history) >= 200 else 1
    for key, label in (("loss", "total loss"), ("lm_loss", "LM loss")):
        values = [finite(h[key]) for h in history]
        if window > 1:
            (raw,) = ax.plot(steps, values, lw=0.6, alpha=0.3)
            ax.plot(steps, _moving_average(values, window), color=raw.get_color(), lw=1.4,
                    label=f"{label} (mean of {window} steps)")  # fmt: skip
        else:
            ax.plot(steps, values, label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if evals:
        metric = evals[-1].get("metric", "validation")
        shown = [e for e in evals if e.get("metric") == metric]
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in shown], [finite(e.get("value")) for e in shown], "o-",
                 color="tab:red", label=f"{metric} (evaluation)", lw=1.2, ms=4)  # fmt: skip
        ax2.set_ylabel(metric)
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="best", fontsize="small")
    ax.set_title(path.parent.name)
    fig.savefig(path, dpi=110)
    return True


def _moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` finite values at each point (fewer at the start)."""
    out, kept = [], []
    for v in values:
        if math.isfinite(v):
            kept.append(v)
        recent = kept[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


# ----------------------------------------------------------------- the sinks
class Sinks:
    """This rank's outputs of one run: TensorBoard writer (rank 0), progress bar or lines,
    router stats, ``trainer_log.jsonl``, W&B.

    Args:
        out_dir: the run's output directory (``router_stats.jsonl`` goes there).
        writer: a SummaryWriter on rank 0, None elsewhere.
        bar: the progress bar (disabled off rank 0 and without ``progress="bar"``), or None.
        is_main: rank 0.
        log_every: ``train.log_every``: per-step scalars are written at multiples of it, at
            step 1 and at steps with router statistics (a window may hold more steps).
        progress: ``bar``, ``lines`` or ``none`` (:func:`resolve_progress`).
        progress_every: steps between progress lines (default ``log_every``).
        max_steps: the run's last step.
        initial_step: the step this launch started from (a resumed run's checkpoint).
        trainer_log: ``trainer_log.jsonl`` (rank 0), or None.
        wandb: the W&B run (rank 0, ``log.wandb``), or None.
        steps_per_epoch: optimizer steps per pass over the training data (the ``epoch``
            of ``trainer_log.jsonl``), or None.
    """

    def __init__(
        self,
        out_dir: Path,
        writer,
        bar,
        is_main: bool,
        log_every: int,
        *,
        progress: str = "bar",
        progress_every: int | None = None,
        max_steps: int = 0,
        initial_step: int = 0,
        trainer_log: TrainerLog | None = None,
        wandb: WandbSink | None = None,
        steps_per_epoch: float | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.writer = writer
        self.bar = bar
        self.is_main = is_main
        self.log_every = log_every
        self.progress = progress
        self.progress_every = progress_every or log_every
        self.max_steps = max_steps
        self.initial_step = initial_step
        self.trainer_log = trainer_log
        self.wandb = wandb
        self.steps_per_epoch = steps_per_epoch
        self._launch_start = time.time()
        self._closed = False

    @classmethod
    def open(
        cls,
        out_dir: Path,
        run_config: dict[str, Any],
        is_main: bool,
        max_steps: int,
        initial_step: int,
        log_every: int,
        log: Any = None,
        steps_per_epoch: float | None = None,
    ) -> Sinks:
        """The run's sinks: TensorBoard (and ``run_config.json``), ``trainer_log.jsonl`` and
        W&B (``log.wandb``) on rank 0, then the bar. ``log`` is the run's ``LogConfig``
        (None: a bar, no W&B)."""
        progress = resolve_progress(log.progress if log is not None else "bar")
        writer = trainer_log = wandb = None
        if is_main:
            writer = open_tensorboard(out_dir, run_config, initial_step)
            trainer_log = TrainerLog(out_dir / TRAINER_LOG, initial_step)
            if log is not None and log.wandb:
                wandb = WandbSink.open(log, out_dir, run_config, initial_step)
        bar = tqdm(
            total=max_steps,
            initial=initial_step,
            desc="train",
            unit="step",
            disable=not is_main or progress != "bar",
            dynamic_ncols=True,
        )
        return cls(
            out_dir,
            writer,
            bar,
            is_main,
            log_every,
            progress=progress,
            progress_every=log.progress_every if log is not None else None,
            max_steps=max_steps,
            initial_step=initial_step,
            trainer_log=trainer_log,
            wandb=wandb,
            steps_per_epoch=steps_per_epoch,
        )

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _write_record(
        self, kind: str, step: int, fields: dict[str, Any], elapsed: float | None
    ) -> None:
        """One line of ``trainer_log.jsonl``: kind, step, epoch (when known), ``fields``, then
        the run's training seconds so far."""
        if self.trainer_log is None:
            return
        record: dict[str, Any] = {"kind": kind, "step": step}
        if self.steps_per_epoch:
            record["epoch"] = round(step / self.steps_per_epoch, 4)
        record.update(fields)
        if elapsed is not None:
            record["elapsed_s"] = round(elapsed, 3)
        self.trainer_log.write(record)

    def _logged(self, step: int, router: dict) -> bool:
        """A step whose scalars go to TensorBoard, W&B and ``trainer_log.jsonl``."""
        return step % self.log_every == 0 or step == 1 or bool(router)

    def _progress_due(self, step: int) -> bool:
        return (
            self.progress == "lines"
            and self.is_main
            and (step % self.progress_every == 0 or step == 1 or step == self.max_steps)
        )

    def log_window(
        self,
        steps: list[int],
        metrics: list[dict[str, float]],
        router: dict[str, dict[str, torch.Tensor]],
        elapsed: float | None = None,
    ) -> None:
        """Write a logging window's steps; ``router`` (its statistics) belongs to the last step;
        ``elapsed``: the run's training seconds so far (every launch's).

        The bar's postfix shows the window's last step (``tokens_per_s`` is the window's); in
        ``lines`` mode a progress line is logged for each due step.
        """
        if not self.is_main:
            return
        for step, m in zip(steps, metrics, strict=True):
            self.log_step(step, m, router if step == steps[-1] else {}, elapsed)
            if self._progress_due(step):
                eta = eta_seconds(
                    step, self.max_steps, self.initial_step, time.time() - self._launch_start
                )
                logger.info("%s", format_progress(step, self.max_steps, m, elapsed, eta))
        if metrics and self.bar is not None:
            last = metrics[-1]
            self.bar.set_postfix(
                loss=f"{last['loss']:.4f}",
                aux=f"{last['aux_loss']:.3f}",
                tok_s=f"{last['tokens_per_s']:.0f}",
            )

    def log_step(
        self,
        step: int,
        m: dict[str, float],
        router: dict[str, dict[str, torch.Tensor]],
        elapsed: float | None = None,
    ) -> None:
        """One step's scalars (at logging steps) and router statistics (when present)."""
        if self.writer is None:
            return
        if self._logged(step, router):
            scalars = {f"train/{key}": m[key] for key in TRAIN_SCALARS if key in m}
            scalars.update({f"train/{k}": v for k, v in m.items() if k.startswith("aux_loss_")})
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            if self.wandb is not None:
                self.wandb.log(scalars, step)
            fields = {tag.split("/", 1)[1]: v for tag, v in scalars.items()}
            self._write_record("train", step, fields, elapsed)
        if router:
            self.log_router(step, router)

    def log_router(self, step: int, router: dict[str, dict[str, torch.Tensor]]) -> None:
        """Router name → {balance (), certainty (), load (E,)}: three scalars per router in
        TensorBoard (a fourth, ``router_active_experts``, for routers with a variable number
        of experts per token), the full statistics as one line of ``router_stats.jsonl``."""
        record: dict[str, Any] = {"step": step}
        scalars: dict[str, float] = {}
        for name, s in router.items():
            scalars[f"router_balance/{name}"] = s["balance"].item()
            scalars[f"router_certainty/{name}"] = s["certainty"].item()
            scalars[f"router_load_max/{name}"] = s["load"].max().item()
            if "active_experts" in s:
                scalars[f"router_active_experts/{name}"] = s["active_experts"].item()
            record[name] = {k: v.tolist() for k, v in s.items()}
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step)
        with (self.out_dir / ROUTER_STATS).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log_eval(
        self,
        result: dict[str, float],
        step: int,
        metric: str | None = None,
        best: dict[str, Any] | None = None,
        new_best: bool = False,
        elapsed: float | None = None,
    ) -> None:
        """An evaluation's results as ``eval/<key>`` scalars; with ``metric`` also a line of
        ``trainer_log.jsonl`` (``best``: the loop's best after this evaluation)."""
        if not self.is_main:
            return
        if self.writer is not None:
            for k, v in result.items():
                self.writer.add_scalar(f"eval/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in result.items()}, step)
        if metric is not None:
            best = best or {}
            fields: dict[str, Any] = {
                "metric": metric,
                "value": result.get(metric),
                "best": best.get("value"),
                "best_step": best.get("step"),
                "new_best": new_best,
            }
            others = {k: v for k, v in result.items() if k != metric}
            if others:
                fields["results"] = others
            self._write_record("eval", step, fields, elapsed)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` and ``loss_curve.png``, close TensorBoard,
        ``trainer_log.jsonl`` and the W&B run (rank 0)."""
        if self.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if self.writer is not None:
                self.writer.close()
            if self.trainer_log is not None:
                self.trainer_log.close()
            evals = [
                r for r in read_trainer_log(self.out_dir / TRAINER_LOG) if r.get("kind") == "eval"
            ]
            try:
                write_loss_curve(self.out_dir / LOSS_CURVE, summary.get("history", []), evals)
            except Exception as err:  # a plot must not fail a finished run
                logger.warning("%s not written: %s", LOSS_CURVE, err)
        diverged = "non-finite" in str(summary.get("stop_reason", ""))
        self.close(exit_code=3 if diverged else 0)

    def close(self, exit_code: int = 1) -> None:
        """Close the bar, ``trainer_log.jsonl`` and the W&B run (``exit_code`` 1 unless
        :meth:`finish` closed them first: a run that failed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.close_bar()
        if self.trainer_log is not None:
            self.trainer_log.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code)


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
        "trainer_log": str(out_dir / TRAINER_LOG),
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
    if s.get("trainer_log"):
        log = Path(s["trainer_log"])
        lines.append(f"   logs         {log} ({LOSS_CURVE} next to it)")
    return "\n".join(lines)

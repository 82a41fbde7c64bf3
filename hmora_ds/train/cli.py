"""Command line of ``launchers/train.py``.

    deepspeed launchers/train.py --deepspeed ds_configs/zero2.json [--config configs/x.yaml]
    hmora-ds train [--nproc N] --deepspeed zero2 --config default [...]
        [--resume auto|PATH | --overwrite] [key.sub=value …]

``--local_rank`` (injected by the ``deepspeed`` launcher) is accepted; ``torchrun`` and plain
``python`` (one process) work the same way.

Exit status: 0 trained (or the run was already finished), 2 a user error (a bad config, an
``output_dir`` that is not empty, a checkpoint that fails verification), 1 a checkpoint that
could not be written (e.g. a full disk), 3 the run diverged, 4 a rank stopped answering or a
collective failed (``dist.timeout_s``; :mod:`hmora_ds.runtime.watchdog`). Each error is one
line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hmora_ds.cli import Parser, prog_name

logger = logging.getLogger("hmora_ds.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(
        prog=prog_name("hmora_ds.train", "launchers/train.py"),
        description="Fine-tune a Qwen2 / LLaMA model with HMoRA under DeepSpeed.",
    )
    p.add_argument(
        "--deepspeed",
        default="zero2",
        help="DeepSpeed JSON: a path or a shipped one's name (zero2, zero3, zero3_offload, "
        "zero2_ep)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="run config YAML: a path or a shipped one's name (default, paper_qwen2_1.5b, …); "
        "none: the built-in defaults",
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        default=None,
        help="'auto': continue the run in output_dir from its newest checkpoint that "
        "verifies (a finished run is left as it is; none at all: start fresh); or a "
        "checkpoint (a run dir, its checkpoints/ dir or a step dir). Without --resume, "
        "output_dir must be empty or absent",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a non-empty output_dir: first delete the previous run's outputs "
        "there (checkpoints/, adapter/, adapter_best/, model/, model_best/, tensorboard/, "
        "wandb/, summary.json, run_config.json, router_stats.jsonl, trainer_log.jsonl, "
        "loss_curve.png, clustering.json); other files (e.g. evaluations) are kept",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides: train.lr=1e-4 method.routing.eps=2"
    )
    return p.parse_args(argv)


def _error(message: str, is_main: bool = True) -> None:
    if is_main:
        print(f"error: {message}", file=sys.stderr, flush=True)


def _close() -> None:
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hmora_ds.resources import resolve_ds_config, resolve_run_config
    from hmora_ds.runtime.writable import check_writable_dir
    from hmora_ds.train.config import load_run_config
    from hmora_ds.train.deepspeed_config import read_ds_config

    try:
        config = resolve_run_config(args.config) if args.config else None
        run = load_run_config(config, args.overrides)
        check_writable_dir(run.output_dir)  # before anything loads
        ds_config = read_ds_config(resolve_ds_config(args.deepspeed))
    except ValueError as err:
        _error(str(err))
        return 2
    from hmora_ds.assets import cache_root
    from hmora_ds.runtime.dist import init_distributed, setup_logging

    info = init_distributed(str(cache_root()), run.dist.timeout_s)
    setup_logging(info.rank)
    from hmora_ds.runtime.watchdog import watch_ranks
    from hmora_ds.train.checkpoint import CheckpointWriteError
    from hmora_ds.train.run_dir import on_rank0, plan_start
    from hmora_ds.train.sinks import format_summary
    from hmora_ds.train.trainer import Trainer

    # Heartbeats and rank 0's watchdog: a rank that stops answering is named, and a failed
    # collective ends the run with one line and exit code 4 (hmora_ds.runtime.watchdog).
    with watch_ranks(info.rank, info.world_size, run.dist) as watch:
        # Before the model loads: rank 0 decides what the output directory allows (and
        # verifies the checkpoint to resume); every rank hears the decision, so none waits.
        try:
            plan = on_rank0(
                lambda: plan_start(
                    Path(run.output_dir),
                    args.resume,
                    args.overwrite,
                    run.train.max_steps,
                    run.eval.patience,
                ),
                info.rank,
                info.world_size,
            )
        except ValueError as err:
            _error(str(err), info.is_main)
            _close()
            return 2
        if plan.finished:
            logger.info("%s", plan.finished)
            _close()
            return 0
        try:
            trainer = Trainer(run, ds_config, info, resume=plan.point)
        except ValueError as err:
            _error(str(err))  # every rank: it may be one rank's own problem
            return 2
        finished = trainer.already_finished()
        if finished:
            logger.info("%s", finished)
            _close()
            return 0
        watch.follow(lambda: trainer.state.step)
        try:
            summary = trainer.train()
        except CheckpointWriteError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            if info.world_size > 1:
                # Other ranks may wait in a collective of the failed save: end this process
                # now; the launcher then stops them.
                sys.stdout.flush()
                os._exit(1)
            return 1
    if info.is_main:
        print(format_summary(summary))
    _close()
    # A run stopped by divergence is a failure for schedulers and scripts.
    return 3 if "non-finite" in summary["stop_reason"] else 0

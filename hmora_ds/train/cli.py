"""Command line of ``launchers/train.py``.

    deepspeed launchers/train.py --deepspeed ds_configs/zero2.json [--config configs/x.yaml]
        [--resume auto|PATH] [key.sub=value …]

``--local_rank`` (injected by the ``deepspeed`` launcher) is accepted; ``torchrun`` and plain
``python`` (one process) work the same way.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("hmora_ds.train")

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launchers/train.py",
        description="Fine-tune a Qwen2 / LLaMA model with HMoRA under DeepSpeed.",
    )
    p.add_argument(
        "--deepspeed",
        default=str(REPO / "ds_configs" / "zero2.json"),
        help="DeepSpeed JSON (ds_configs/zero2.json, zero3.json, zero3_offload.json)",
    )
    p.add_argument("--config", default=None, help="run config YAML (configs/*.yaml)")
    p.add_argument("--resume", default=None, help="'auto' (the run's latest) or a checkpoint dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides: train.lr=1e-4 method.routing.eps=2"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hmora_ds.runtime.writable import check_writable_dir
    from hmora_ds.train.config import load_run_config
    from hmora_ds.train.deepspeed_config import read_ds_config

    try:
        run = load_run_config(args.config, args.overrides)
        check_writable_dir(run.output_dir)  # before anything loads
        ds_config = read_ds_config(args.deepspeed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from hmora_ds.assets import cache_root
    from hmora_ds.runtime.dist import init_distributed, setup_logging

    info = init_distributed(str(cache_root()), run.dist.timeout_s)
    setup_logging(info.rank)
    from hmora_ds.runtime.watchdog import watch_ranks
    from hmora_ds.train.sinks import format_summary
    from hmora_ds.train.trainer import Trainer

    # Heartbeats and rank 0's watchdog: a rank that stops answering is named, and a failed
    # collective ends the run with one line and exit code 4 (hmora_ds.runtime.watchdog).
    with watch_ranks(info.rank, info.world_size, run.dist) as watch:
        try:
            trainer = Trainer(run, ds_config, info, resume=args.resume)
        except ValueError as err:
            logger.error("%s", err)
            return 2
        watch.follow(lambda: trainer.state.step)
        summary = trainer.train()
    if info.is_main:
        print(format_summary(summary))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    # A run stopped by divergence is a failure for schedulers and scripts.
    return 3 if "non-finite" in summary["stop_reason"] else 0

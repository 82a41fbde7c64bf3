"""``python -m hmora_ds.bench {all,step,ep} [--quick] [--device cpu|cuda] [--out DIR]``."""

from __future__ import annotations

import logging
import sys

from hmora_ds.cli import Parser, prog_name


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=prog_name("hmora_ds.bench"))
    parser.add_argument("which", nargs="?", default="all", choices=["all", "step", "ep"])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="step benchmark"
    )
    parser.add_argument("--only", help="step benchmark: comma-separated variant names")
    parser.add_argument(
        "--profile", help="step benchmark: variants to profile (torch.profiler op tables)"
    )
    parser.add_argument("--batch", type=int, help="step benchmark: sequences per step")
    parser.add_argument("--seq", type=int, help="step benchmark: tokens per sequence")
    parser.add_argument("--steps", type=int, help="step benchmark: timed steps per variant")
    parser.add_argument("--warmup", type=int, help="step benchmark: warm-up steps per variant")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.which in ("all", "step"):
        from hmora_ds.bench.step import run as run_step

        only = args.only.split(",") if args.only else None
        prof = args.profile.split(",") if args.profile else None
        path = run_step(
            device=args.device,
            quick=args.quick,
            out_dir=args.out,
            only=only,
            profile=prof,
            batch=args.batch,
            seq=args.seq,
            steps=args.steps,
            warmup=args.warmup,
        )
        print(path.with_suffix(".md").read_text())
        print(f"written: {path} and {path.with_suffix('.md')}")
    if args.which in ("all", "ep") and args.device != "cuda":
        from hmora_ds.bench.expert_parallel import run

        path = run(quick=args.quick, out_dir=args.out)
        print(path.with_suffix(".md").read_text())
        print(f"written: {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

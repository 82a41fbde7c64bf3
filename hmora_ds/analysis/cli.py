"""``python -m hmora_ds.analyze routing``: the paper's routing analysis of a trained adapter.

    python -m hmora_ds.analyze routing --model smollm2-135m-instruct \
        --adapter runs/default/adapter_best --out runs/default/analysis

Writes ``routing.json`` (schema in ``docs/analysis.md``), ``routing.md``,
``fig3_routing_entropy.png`` and ``fig4_task_tsne.png`` to ``--out``.

    python -m hmora_ds.analyze task-repr --model smollm2-135m-instruct --data offline \
        --max-per-task 50 --seeds 0 1 2 --out runs/task_repr

measures H_task at initialisation (:mod:`hmora_ds.analysis.task_repr`): mean cosine similarity,
between-task share of variance and |corr(PC1, prompt length)| for the task encoder's input
variants; writes ``task_repr.json`` and ``task_repr.md``. Every user error is one
line on stderr (exit status 2) naming the option and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from hmora_ds.cli import Parser, prog_name

logger = logging.getLogger("hmora_ds.analysis")

FIG3 = "fig3_routing_entropy.png"
FIG4 = "fig4_task_tsne.png"


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=prog_name("hmora_ds.analyze"),
        description="Analyses of trained HMoRA adapters (the paper's appendix E.4 / E.8).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "routing",
        help="balance / certainty per router, expert shares, main expert pairs, t-SNE",
        description="Route labelled prompts through an adapter and write routing.json, "
        "routing.md and the figure-3 / figure-4 PNGs.",
    )
    r.add_argument("--model", required=True, help="base: HF name / dir or smollm2-135m-instruct")
    r.add_argument("--adapter", required=True, help="adapter directory (save_adapter output)")
    r.add_argument(
        "--data",
        default="mmlu",
        help="'mmlu' (57 subjects, default), 'offline' (training mixture) or a .jsonl/.json file",
    )
    r.add_argument("--out", required=True, type=Path, help="output directory")
    r.add_argument("--max-per-task", type=int, default=100, help="examples per task (paper: 100)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--max-input-tokens", type=int, default=512)
    r.add_argument("--seed", type=int, default=0, help="per-task sampling and t-SNE seed")
    r.add_argument("--task-field", default="task", help="task column of a --data file")
    r.add_argument(
        "--prompt-field", default=None, help="prompt column (default: prompt/question/source)"
    )
    r.add_argument("--mmlu-split", default="test", choices=("dev", "validation", "test"))
    r.add_argument(
        "--router", default=None, help="task router for MEP / t-SNE (default: the final one)"
    )
    r.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    r.add_argument(
        "--per-task",
        action="store_true",
        help="also each task's own routing statistics (tasks.<t>.routing: token balance and "
        "certainty, expert shares of the last token router and of the MEP router)",
    )
    r.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    r.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    t = sub.add_parser(
        "task-repr",
        help="H_task at initialisation: task vs prompt-length content, per input variant",
        description="Build the task encoder as the model does (random init, several seeds) over "
        "the base model's embeddings and measure, on labelled prompts, the mean cosine "
        "similarity of H_task, the between-task share of its variance and the correlation of "
        "its first principal component with prompt length, for routing.task_slot_position × "
        "routing.task_input. Writes task_repr.json and task_repr.md.",
    )
    t.add_argument("--model", required=True, help="base: HF name / dir or smollm2-135m-instruct")
    t.add_argument(
        "--data", default="offline", help="'offline' (default), 'mmlu' or a .jsonl/.json file"
    )
    t.add_argument("--out", required=True, type=Path, help="output directory")
    t.add_argument("--max-per-task", type=int, default=50, help="prompts per task")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="encoder init seeds")
    t.add_argument("--sample-seed", type=int, default=0, help="per-task sampling seed")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--max-input-tokens", type=int, default=1024)
    t.add_argument("--task-field", default="task", help="task column of a --data file")
    t.add_argument("--prompt-field", default=None, help="prompt column of a --data file")
    t.add_argument("--mmlu-split", default="test", choices=("dev", "validation", "test"))
    return p


def check_adapter(path: str | Path) -> Path:
    """The adapter directory, checked before anything slow runs."""
    from hmora_ds.adapter_io import check_adapter as check_adapter_files
    from hmora_ds.analysis.collect import AnalysisError

    adapter = Path(path)
    if not adapter.is_dir():
        raise AnalysisError(
            f"--adapter: {adapter} is not a directory; give the directory save_adapter wrote "
            "(e.g. runs/default/adapter_best after `make train`)"
        )
    try:
        check_adapter_files(adapter)
    except (FileNotFoundError, ValueError) as err:
        raise AnalysisError(f"--adapter: {err}") from None
    return adapter


def _examples(args: argparse.Namespace, seed: int) -> list[Any]:
    """The examples of ``--data`` (sampled per task with ``seed``)."""
    from hmora_ds.analysis.data import load_examples

    return load_examples(
        args.data,
        task_field=args.task_field,
        prompt_field=args.prompt_field,
        max_per_task=args.max_per_task,
        seed=seed,
        mmlu_split=args.mmlu_split,
    )


def _load_base(model: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """Tokenizer, base model and checkpoint path of ``--model`` (a one-line error if absent)."""
    from hmora_ds.analysis.collect import AnalysisError
    from hmora_ds.runtime.errors import first_line
    from hmora_ds.runtime.loading import load_base_model, load_tokenizer, resolve_checkpoint

    ckpt = resolve_checkpoint(model, option="--model")
    try:
        return (
            load_tokenizer(ckpt, option="--model"),
            load_base_model(ckpt, dtype, option="--model"),
            ckpt,
        )
    except OSError as err:  # anything from_pretrained raises past ModelSourceError
        first = first_line(err)
        raise AnalysisError(
            f"--model: cannot load {model!r} ({first}); give an HF name or directory, or "
            "smollm2-135m-instruct"
        ) from None


def _load_model(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, str]:
    from hmora_ds.adapter_io import load_adapter
    from hmora_ds.runtime.loading import torch_dtype

    adapter = check_adapter(args.adapter)
    tokenizer, base, ckpt = _load_base(args.model, torch_dtype(args.dtype, device.type == "cuda"))
    model = load_adapter(base, adapter).to(device)
    return tokenizer, model.eval(), ckpt


def run_routing(args: argparse.Namespace) -> dict[str, Any]:
    """The ``routing`` subcommand; returns the written document."""
    from hmora_ds.analysis.collect import (
        collect_routing,
        resolve_mep_router,
        router_names,
        summarize_routing,
    )
    from hmora_ds.analysis.plots import plot_routing_entropy, plot_task_tsne
    from hmora_ds.analysis.report import routing_markdown
    from hmora_ds.analysis.stats import tsne_embedding

    if args.batch_size < 1 or args.max_input_tokens < 1:
        from hmora_ds.analysis.collect import AnalysisError

        raise AnalysisError("--batch-size / --max-input-tokens: must be positive")
    check_adapter(args.adapter)
    from hmora_ds.runtime.loading import check_model_source

    check_model_source(args.model, option="--model")  # before the examples load
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    examples = _examples(args, args.seed)
    tokenizer, model, _ = _load_model(args, device)
    resolve_mep_router(router_names(model), args.router)  # fail before the long pass
    # bf16 base weights (GPU) run under bf16 autocast with fp32 adapters, as in evaluation.
    bf16 = model.base_model.get_input_embeddings().weight.dtype == torch.bfloat16
    coll = collect_routing(
        model,
        tokenizer,
        examples,
        batch_size=args.batch_size,
        max_input_tokens=args.max_input_tokens,
        progress=not args.no_progress,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        per_task=args.per_task,
    )
    data = args.data if args.data in ("mmlu", "offline") else str(Path(args.data))
    if args.data == "mmlu":
        data = f"mmlu[{args.mmlu_split}]"
    meta = {"model": args.model, "adapter": str(args.adapter), "data": data}
    doc = summarize_routing(coll, meta, router=args.router)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    figures = {"Figure 3: balance and certainty across layers": FIG3}
    (out / FIG4).unlink(missing_ok=True)  # never leave a previous run's figure 4 behind
    plot_routing_entropy(doc["routers"], out / FIG3)
    notes = doc["meta"]["notes"]
    mep_router = doc["meta"]["mep_router"]
    if mep_router is not None:
        try:
            emb, tsne_notes = tsne_embedding(
                coll.task_gates[mep_router], seed=args.seed, perplexity=args.perplexity
            )
        except ValueError as err:
            notes.append(f"t-SNE skipped: {err}")
            logger.warning(notes[-1])
        else:
            n_tasks = doc["meta"]["num_tasks"]
            title = f"t-SNE of {mep_router} gates ({len(coll.tasks)} prompts, {n_tasks} tasks)"
            _, plot_notes = plot_task_tsne(emb, coll.tasks, out / FIG4, title=title)
            notes += tsne_notes + plot_notes
            figures["Figure 4: t-SNE of task-router gates"] = FIG4
    doc["meta"]["figures"] = list(figures.values())
    (out / "routing.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "routing.md").write_text(routing_markdown(doc, figures))
    return doc


def run_task_repr(args: argparse.Namespace) -> dict[str, Any]:
    """The ``task-repr`` subcommand; returns the written document."""
    from hmora_ds.analysis.collect import AnalysisError
    from hmora_ds.analysis.task_repr import encode_prompts, task_repr_markdown, task_repr_table
    from hmora_ds.methods.hmora import resolve_task_token_id

    if args.batch_size < 1 or args.max_input_tokens < 1 or not args.seeds:
        raise AnalysisError("--batch-size / --max-input-tokens / --seeds: must be positive")
    examples = _examples(args, args.sample_seed)
    if len({ex.task for ex in examples}) < 2:
        raise AnalysisError("--data: needs at least two tasks to split the variance")
    tokenizer, base, _ = _load_base(args.model, torch.float32)
    embedding = base.get_input_embeddings()
    prompts = encode_prompts(tokenizer, examples, args.max_input_tokens, args.batch_size)
    rows = task_repr_table(
        embedding,
        prompts,
        task_token_id=resolve_task_token_id(tokenizer, None),
        seeds=args.seeds,
    )
    data = args.data if args.data in ("mmlu", "offline") else str(Path(args.data))
    meta = {
        "model": args.model,
        "data": data,
        "max_per_task": args.max_per_task,
        "sample_seed": args.sample_seed,
        "max_input_tokens": args.max_input_tokens,
        "skipped": prompts.skipped,
    }
    doc = {"meta": meta, "rows": rows}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "task_repr.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "task_repr.md").write_text(task_repr_markdown(rows, meta))
    return doc


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; 0 on success, 2 on a user error (one line on stderr).

    Logging is configured by the ``python -m hmora_ds.analyze`` entry point, not here, so that
    calling ``main`` from Python (tests, notebooks) leaves the caller's logging alone.
    """
    from hmora_ds.analysis.collect import AnalysisError
    from hmora_ds.data.records import DataError
    from hmora_ds.eval.benchmarks import EvalError

    args = _parser().parse_args(argv)
    try:
        doc = run_task_repr(args) if args.command == "task-repr" else run_routing(args)
    except (AnalysisError, DataError, EvalError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "task-repr":
        from hmora_ds.analysis.task_repr import task_repr_markdown

        print(task_repr_markdown(doc["rows"], doc["meta"]), end="")
        print(f"written to {args.out}: task_repr.json, task_repr.md")
        return 0
    rec = doc["summary"]["recognition"]
    print(
        f"routing: {doc['meta']['num_examples']} examples, {doc['meta']['num_tasks']} tasks, "
        f"{len(doc['routers'])} routers; recognition ≥ 0.8: "
        + ("n/a" if rec is None else f"{100 * rec['0.8']:.1f}%")
    )
    print(f"written to {args.out}: routing.json, routing.md, " + ", ".join(doc["meta"]["figures"]))
    return 0

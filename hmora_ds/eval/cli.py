"""Command line of ``launchers/eval.py`` (also ``python -m hmora_ds.eval``).

    python launchers/eval.py --model smollm2-135m-instruct [--adapter DIR] \
        --benchmarks all --split test [--mode letter|loglik] [--shots K] [--max-questions N]
    deepspeed --num_gpus 8 launchers/eval.py --model Qwen/Qwen2-1.5B --adapter DIR ...
    deepspeed launchers/eval.py ... --deepspeed ds_configs/zero3.json   # partitioned base

Every rank scores its shard of the questions; rank 0 prints the paper's table and writes
``results.json``, ``results.md`` and ``manifest.json`` to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hmora_ds.cli import Parser, prog_name
from hmora_ds.eval.benchmarks import SOURCES, EvalError
from hmora_ds.eval.scoring import MODES, NORMS, ScoreConfig, Scorer
from hmora_ds.eval.subsets import SPLITS, write_manifest
from hmora_ds.eval.suite import SuiteConfig, prepare_suite, result_document, run_suite
from hmora_ds.eval.tables import markdown_table
from hmora_ds.resources import resolve_ds_config

logger = logging.getLogger("hmora_ds.eval")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(
        prog=prog_name("hmora_ds.eval", "launchers/eval.py"),
        description="Evaluate a base model or an HMoRA adapter on the paper's seven benchmarks.",
    )
    p.add_argument("--model", required=True, help="HF name / dir, .gguf, or smollm2-135m-instruct")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model's directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    p.add_argument(
        "--chat-template",
        default=None,
        help="chatml, llama3, plain or a .jinja file: the training run's data.chat_template, "
        "if it set one (default: the tokenizer's own)",
    )
    p.add_argument("--adapter", default=None, help="adapter directory (save_adapter output)")
    p.add_argument("--benchmarks", default="all", help="'all' or e.g. mmlu,arc-e,csqa")
    p.add_argument("--split", default="test", choices=SPLITS, help="the paper's subsets")
    p.add_argument("--source", default="offline", choices=SOURCES)
    p.add_argument("--local-dir", type=Path, default=None, help="<dir>/<benchmark>/<split>.jsonl")
    p.add_argument("--mode", default="letter", choices=MODES)
    p.add_argument("--norm", default="tokens", choices=NORMS, help="loglik normalisation")
    p.add_argument("--shots", type=int, default=0, help="k-shot examples (default: zero-shot)")
    p.add_argument("--max-questions", type=int, default=None, help="cap per benchmark")
    p.add_argument("--seed", type=int, default=0, help="subset sampling seed")
    p.add_argument("--manifest", type=Path, default=None, help="re-evaluate these exact ids")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-input-tokens", type=int, default=1024)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument(
        "--deepspeed",
        default=None,
        help="DeepSpeed JSON, a path or a shipped name (zero3: the base partitioned)",
    )
    p.add_argument("--output-dir", type=Path, default=Path("runs/eval"))
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def eval_ds_config(path: str, batch_size: int, world: int, bf16: bool) -> dict[str, Any]:
    """A user's DeepSpeed JSON made concrete for inference (batch keys, no optimizer)."""
    cfg = json.loads(Path(path).read_text())
    cfg.update(
        train_micro_batch_size_per_gpu=batch_size,
        gradient_accumulation_steps=1,
        train_batch_size=batch_size * world,
        gradient_clipping=1.0,
        bf16={"enabled": bf16},
    )
    for key in ("optimizer", "scheduler", "fp16"):
        cfg.pop(key, None)
    return cfg


def load_model(args: argparse.Namespace, info: Any, rank0_first) -> tuple[Any, Any, dict]:
    """Tokenizer and model (base, or base + adapter), placed or wrapped for evaluation."""
    from hmora_ds.adapter_io import load_adapter, read_adapter_config
    from hmora_ds.runtime.loading import (
        load_base_model,
        load_tokenizer,
        resolve_checkpoint,
        torch_dtype,
    )

    ckpt = rank0_first(
        lambda: resolve_checkpoint(
            args.model, args.gguf_file, option="--model", gguf_option="--gguf-file"
        )
    )
    tokenizer = load_tokenizer(
        ckpt, args.tokenizer, option="--model", tokenizer_option="--tokenizer"
    )
    from hmora_ds.data import ChatEncoder, EncodeConfig
    from hmora_ds.data.chat_templates import apply_chat_template_setting

    apply_chat_template_setting(tokenizer, args.chat_template, args.model, "--chat-template")

    # The chat template and the prompt limit, before the base model loads.
    ChatEncoder(tokenizer, EncodeConfig(max_input_tokens=args.max_input_tokens)).check_room(
        "--max-input-tokens"
    )
    on_gpu = info.device.type == "cuda"
    dtype = torch_dtype(args.dtype, on_gpu)
    ds_config = None
    if args.deepspeed:
        ds_config = eval_ds_config(
            str(resolve_ds_config(args.deepspeed)), args.batch_size, info.world_size, on_gpu
        )
    meta: dict[str, Any] = {"model": args.model, "checkpoint": ckpt, "adapter": None}
    if args.adapter:
        meta["adapter"] = str(args.adapter)
        meta["adapter_base"] = read_adapter_config(args.adapter)["base_model"].get("name_or_path")
    base = load_base_model(ckpt, dtype, args.attn_implementation, ds_config, option="--model")
    model = load_adapter(base, args.adapter) if args.adapter else base
    if ds_config is not None:
        import deepspeed

        model, *_ = deepspeed.initialize(model=model, config=ds_config)
    else:
        model.to(info.device)
    model.eval()
    return tokenizer, model, meta


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model, before the process group starts or anything loads:
    the numbers, the benchmark names, the adapter's two files, that the model can be found.

    Raises:
        ValueError: one line naming the option and the fix.
    """
    from hmora_ds.adapter_io import AdapterError, check_adapter
    from hmora_ds.eval.benchmarks import parse_benchmarks
    from hmora_ds.runtime.loading import check_model_source

    for option, value, least in (
        ("--max-questions", args.max_questions, 1),
        ("--batch-size", args.batch_size, 1),
        ("--max-input-tokens", args.max_input_tokens, 1),
        ("--shots", args.shots, 0),
    ):
        if value is not None and value < least:
            raise EvalError(f"{option}: must be >= {least}, got {value}")
    try:
        parse_benchmarks([args.benchmarks])
    except EvalError as err:
        raise EvalError(f"--benchmarks: {err}") from None
    if args.source == "local" and args.local_dir is None:
        raise EvalError("--local-dir: is required with --source local (<dir>/<benchmark>/…)")
    if args.adapter:
        try:
            check_adapter(args.adapter)
        except AdapterError as err:
            raise type(err)(f"--adapter: {err}") from None
    check_model_source(args.model, args.gguf_file, option="--model", gguf_option="--gguf-file")
    from hmora_ds.data.chat_templates import template_problem

    problem = template_problem(args.chat_template)
    if problem:
        raise EvalError(f"--chat-template: {problem}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from hmora_ds import assets
    from hmora_ds.runtime.dist import init_distributed, setup_logging

    info = init_distributed(str(assets.cache_root()))
    setup_logging(info.rank)
    import torch.distributed as dist

    from hmora_ds.runtime.dist import rank0_first as _rank0_first

    def rank0_first(fn):
        return _rank0_first(fn, info.rank)

    start = time.time()
    try:
        suite = SuiteConfig(
            benchmarks=[args.benchmarks],
            split=args.split,
            source=args.source,
            local_dir=args.local_dir,
            seed=args.seed,
            max_questions=args.max_questions,
            manifest=args.manifest,
        )
        score_cfg = ScoreConfig(
            mode=args.mode,
            shots=args.shots,
            batch_size=args.batch_size,
            max_input_tokens=args.max_input_tokens,
            norm=args.norm,
            seed=args.seed,
        )
        prepared = rank0_first(lambda: prepare_suite(suite, args.shots, args.seed))
        tokenizer, model, meta = load_model(args, info, rank0_first)
        scorer = Scorer(tokenizer, score_cfg)
        autocast = (
            torch.bfloat16 if info.device.type == "cuda" and args.dtype != "float32" else None
        )
        results = run_suite(model, scorer, prepared, info.device, autocast)
    except (EvalError, ValueError, FileNotFoundError) as err:
        logger.error("evaluation failed: %s", err)
        print(f"error: {err}", file=sys.stderr)
        return 2
    doc = result_document(
        results,
        score_cfg,
        suite,
        **meta,
        world_size=info.world_size,
        seconds=round(time.time() - start, 1),
    )
    if info.is_main:
        out = args.output_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        label = Path(args.adapter).name if args.adapter else Path(args.model).name
        table = markdown_table(doc, label)
        (out / "results.md").write_text(table)
        entries = {b: p.manifest for b, p in prepared.items() if p.manifest is not None}
        write_manifest(out / "manifest.json", entries, {"split": args.split, "seed": args.seed})
        print(table)
        print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'manifest.json'}")
    dist.barrier()
    dist.destroy_process_group()
    return 0

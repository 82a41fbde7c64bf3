"""``python -m hmora_ds.library lorahub``: LoraHub on a library and a file of examples.

The method itself (composition, objective, search) is :mod:`hmora_ds.methods.lorahub`; this
module loads the base model and the library, turns the examples into training batches, runs
the search (split over ranks under torchrun / deepspeed) and writes the composed adapter with
``lorahub.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hmora_ds.methods.lorahub import (
    BOUND,
    DEFAULT_BUDGET,
    L1_WEIGHT,
    Composer,
    LoraHubError,
    SearchResult,
    cross_entropy,
    few_shot_objective,
    search,
)

logger = logging.getLogger("hmora_ds.lorahub")

LORAHUB_JSON = "lorahub.json"


def example_batches(
    path: str | Path,
    tokenizer: Any,
    max_input_tokens: int = 512,
    max_output_tokens: int = 128,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """The few-shot examples (records: ``source`` / ``target``) tokenised with the chat template
    and collated as training batches (longest first, fixed order).

    Raises:
        LoraHubError: no usable example (after the token limits).
    """
    from hmora_ds.data import ChatEncoder, DataCollator, EncodeConfig, encode_records, load_records

    try:
        records = load_records(path)
    except (OSError, ValueError) as err:
        raise LoraHubError(f"--examples: {err}") from None
    encoder = ChatEncoder(tokenizer, EncodeConfig(max_input_tokens, max_output_tokens))
    encoder.check_room("--max-input-tokens")
    data = encode_records(records, encoder, progress=False)
    if len(data) == 0:
        raise LoraHubError(
            f"--examples: none of the {len(records)} examples in {path} could be encoded "
            f"(empty targets, or prompts beyond --max-input-tokens {max_input_tokens}); fix "
            "the file or raise the limit"
        )
    collator = DataCollator.from_tokenizer(tokenizer, "right")
    order = sorted(range(len(data)), key=lambda i: -int(data.lengths[i]))
    return [
        collator([data[i] for i in order[s : s + batch_size]])
        for s in range(0, len(order), batch_size)
    ]


@dataclass
class LoraHubOptions:
    """``python -m hmora_ds.library lorahub`` (the CLI fills it; tests may build it)."""

    library: Path
    examples: Path
    out: Path
    tasks: list[str] | None = None
    budget: int = DEFAULT_BUDGET
    seed: int = 0
    model: str | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    max_input_tokens: int = 512
    max_output_tokens: int = 128
    batch_size: int = 8
    timeout_s: float = 300.0


def check_options(opts: LoraHubOptions) -> Any:
    """Every check that needs no model; returns the selected, uniform library.

    Raises:
        LoraHubError: one line naming the option and the fix.
    """
    from hmora_ds.library import Library, LibraryError

    for option, value, least in (
        ("--budget", opts.budget, 1),
        ("--seed", opts.seed, 0),
        ("--batch-size", opts.batch_size, 1),
        ("--max-input-tokens", opts.max_input_tokens, 1),
        ("--max-output-tokens", opts.max_output_tokens, 1),
    ):
        if value < least:
            raise LoraHubError(f"{option}: must be >= {least}, got {value}")
    if opts.timeout_s <= 0:
        raise LoraHubError(f"--timeout: must be > 0 seconds, got {opts.timeout_s}")
    if not Path(opts.examples).is_file():
        raise LoraHubError(
            f"--examples: {opts.examples} is not a file; give a JSONL of "
            "records with source and target"
        )
    out = Path(opts.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraHubError(f"--out: {out} exists and is not empty; choose a new directory")
    try:
        lib = Library.load(opts.library)
    except LibraryError as err:
        raise LoraHubError(f"--library: {err}") from None
    try:
        lib = lib.select(opts.tasks)
    except LibraryError as err:
        raise LoraHubError(f"--tasks: {err}") from None
    try:
        lib.check_uniform()
    except LibraryError as err:
        raise LoraHubError(f"--library: {err}") from None
    if opts.model is None and not lib.base_name:
        raise LoraHubError(f"--model: library {lib.root} names no base model; pass --model")
    return lib


def run(opts: LoraHubOptions) -> SearchResult:
    """Load the base and the library, search the weights, write the composed adapter (rank 0)
    with ``lorahub.json``. Under torchrun / deepspeed (``WORLD_SIZE`` > 1) the candidates are
    split over the ranks (gloo on CPU)."""
    import torch.distributed as dist

    from hmora_ds.adapter_io import load_adapter, save_adapter
    from hmora_ds.assets import cache_root
    from hmora_ds.library import LibraryError, load_lora
    from hmora_ds.runtime.loading import (
        load_base_model,
        load_tokenizer,
        resolve_checkpoint,
        torch_dtype,
    )

    lib = check_options(opts)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, device = 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        from hmora_ds.runtime.dist import init_distributed, setup_logging

        info = init_distributed(str(cache_root()), opts.timeout_s)
        setup_logging(info.rank)
        rank, device = info.rank, info.device
    model_name = opts.model or lib.base_name
    ckpt = resolve_checkpoint(
        model_name, opts.gguf_file, option="--model", gguf_option="--gguf-file"
    )
    tokenizer = load_tokenizer(
        ckpt, opts.tokenizer, option="--model", tokenizer_option="--tokenizer"
    )
    batches = example_batches(
        opts.examples, tokenizer, opts.max_input_tokens, opts.max_output_tokens, opts.batch_size
    )
    dtype = torch_dtype(opts.dtype, device.type == "cuda")
    base = load_base_model(ckpt, dtype, opts.attn_implementation, option="--model")
    try:
        lib.check_base(base)
    except LibraryError as err:
        raise LoraHubError(f"--model {model_name}: {err}") from None
    model = load_adapter(base, lib.entries[0].adapter)  # a plain LoRA of the library's shape
    composer = Composer(model, [load_lora(e.adapter) for e in lib.entries])
    model.to(device).eval()
    objective = few_shot_objective(composer, batches, device)
    n_examples = sum(int(b["input_ids"].shape[0]) for b in batches)
    logger.info(
        "lorahub: %d LoRA(s) (%s), %d example(s), budget %d, seed %d, %d rank(s)",
        len(lib.entries),
        ", ".join(lib.tasks),
        n_examples,
        opts.budget,
        opts.seed,
        world,
    )
    result = search(objective, len(lib.entries), opts.budget, opts.seed, progress=rank == 0)
    composer.set_weights(result.weights)
    loss_best = cross_entropy(model, batches, device)
    if rank == 0:
        save_adapter(model, opts.out)
        doc = {
            "method": "lorahub",
            "library": str(Path(lib.root).resolve()),
            "base_model": lib.base_name,
            "examples": str(Path(opts.examples).resolve()),
            "num_examples": n_examples,
            "weights": {t: float(w) for t, w in zip(lib.tasks, result.weights, strict=True)},
            "objective_start": result.start_objective,
            "objective_best": result.objective,
            "loss_start": result.start_objective,  # w = 0: no L1 term
            "loss_best": loss_best,
            "l1_weight": L1_WEIGHT,
            "bounds": [-BOUND, BOUND],
            "budget": opts.budget,
            "seed": opts.seed,
            "optimizer": f"NGOpt ({result.optimizer})",
            "world_size": world,
            "seconds": round(result.seconds, 1),
            "evaluations": [{"weights": w, "objective": v} for w, v in result.evaluations],
        }
        (Path(opts.out) / LORAHUB_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result

"""Benchmark: expert parallelism EP = 1 vs EP = 2 (per MoRA block and per training step).

    python -m hmora_ds.bench ep [--quick] [--out bench/results]

Two gloo ranks on this machine (CPU) or NCCL ranks on a GPU machine. For e = 8, 16, 32 experts
it measures the forward + backward time of one MoRA block and of one step of a small HMoRA
model, and the bytes the dispatch all-to-alls move per token (counted from the real split sizes,
forward and backward, and checked against the formula ``2·K·(I+O)·4``). Median of repeats.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

EXPERTS = (8, 16, 32)


def _worker(rank: int, world: int, init: str, cfg: dict[str, Any], out: str) -> None:
    import torch.distributed as dist

    from hmora_ds.runtime.dist import skip_cpu_shm_build

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    import deepspeed
    from deepspeed.utils import groups

    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    groups._create_expert_and_data_parallel(world)
    group = groups._get_expert_parallel_group(f"ep_size_{world}")
    results = []
    for e in cfg["experts"]:
        for ep in (1, world):
            results.append(_measure(rank, e, ep, group, cfg))
    dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _model(e: int, cfg: dict[str, Any]):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hmora_ds.config import load_config
    from hmora_ds.model import HMoRAModel

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=1024, hidden_size=cfg["hidden"], intermediate_size=2 * cfg["hidden"],
        num_hidden_layers=cfg["layers"], num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=4 * cfg["tokens"],
    ))  # fmt: skip
    method = load_config("hmora", {"adapter.num_experts": e, "adapter.dropout": 0.0})
    return HMoRAModel(base, method, task_token_id=5)


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _measure(rank: int, e: int, ep: int, group, cfg: dict[str, Any]) -> dict[str, Any]:
    from hmora_ds.parallel.expert_parallel import expert_parallel_blocks, to_expert_parallel

    model = _model(e, cfg)
    if ep > 1:
        to_expert_parallel(model, ep, rank)
        for block in expert_parallel_blocks(model).values():
            block.bind_group(group)
    torch.manual_seed(rank)
    ids = torch.randint(3, 1024, (cfg["batch"], cfg["tokens"]))
    # One block: the MLP up projection of the last hybrid layer, fed a realistic input.
    block = model.base_model.model.layers[cfg["layers"] - 1].mlp.up_proj
    x = torch.randn(cfg["batch"], cfg["tokens"], cfg["hidden"], requires_grad=True)
    model.routing_context._task_repr = torch.randn(cfg["batch"], cfg["hidden"])
    sent = {"bytes": 0}
    if ep > 1:
        # Count the float payload of every all-to-all the block issues (benchmark only).
        original = torch.distributed.all_to_all_single

        def counting(out, inp, *args, **kwargs):
            if inp.is_floating_point():
                sent["bytes"] += inp.numel() * inp.element_size()
            return original(out, inp, *args, **kwargs)

        torch.distributed.all_to_all_single = counting
    try:
        block_s = _timeit(lambda: block(x).sum().backward(), cfg["repeats"])
        sent["bytes"] = 0
        block(x).sum().backward()
        # Received row counts differ per rank: sum the payload over ranks, divide by all tokens.
        total = torch.tensor([float(sent["bytes"])])
        torch.distributed.all_reduce(total)
        block_bytes = total.item() / torch.distributed.get_world_size()
        step_s = _timeit(lambda: model(ids, labels=ids).loss.backward(), cfg["repeats"])
    finally:
        if ep > 1:
            torch.distributed.all_to_all_single = original
    n_tok = cfg["batch"] * cfg["tokens"]
    k, i, o = 2, cfg["hidden"], 2 * cfg["hidden"]
    return {
        "experts": e, "ep_size": ep, "block_ms": 1e3 * block_s, "step_ms": 1e3 * step_s,
        "bytes_per_token_block": block_bytes / n_tok,
        # All-to-all buffers hold every (token, expert) pair, the local split included; about
        # (ep - 1) / ep of these bytes cross ranks.
        "formula_bytes_per_token_block": (2 * k * (i + o) * 4) if ep > 1 else 0,
    }  # fmt: skip


def run(quick: bool = False, out_dir: str | Path = "bench/results") -> Path:
    cfg = {
        "experts": (8,) if quick else EXPERTS, "hidden": 256 if quick else 512,
        "layers": 2 if quick else 4, "tokens": 64 if quick else 256, "batch": 2,
        "repeats": 2 if quick else 5,
    }  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        init, res = os.path.join(tmp, "init"), os.path.join(tmp, "res.json")
        mp.start_processes(_worker, args=(2, init, cfg, res), nprocs=2, start_method="spawn")
        rows = json.loads(Path(res).read_text())
    record = {
        "benchmark": "expert_parallel", "quick": quick, "shape": cfg,
        "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "device": "cpu", "rows": rows,
    }  # fmt: skip
    path = out_dir / f"expert_parallel{'_quick' if quick else ''}.json"
    path.write_text(json.dumps(record, indent=2))
    (path.with_suffix(".md")).write_text(markdown(record))
    return path


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"# Expert parallelism, 2 ranks on {record['device']} ({record['machine']})",
        "",
        f"Shape: {record['shape']}",
        "",
        "| experts | EP | block fwd+bwd (ms) | step fwd+bwd (ms) | bytes/token/block (measured) |"
        " formula 2K(I+O)·4 |",
        "|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['experts']} | {r['ep_size']} | {r['block_ms']:.2f} | {r['step_ms']:.1f} | "
            f"{r['bytes_per_token_block']:.0f} | {r['formula_bytes_per_token_block']} |"
        )
    return "\n".join(lines) + "\n"

"""Shared helpers for tests that run the real training entry point (CPU, with timeouts).

The tiny random-init LLaMA uses SmolLM2's real tokenizer and chat template (mechanics: exact
equality across layouts needs a model small enough to run many times); data are real sentences.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests._dist import free_port, run_command

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = str(REPO / "launchers" / "train.py")
BIN = Path(sys.executable).parent
TIMEOUT = 240


def save_tiny_llama(
    path: Path, tok, *, hidden: int = 64, intermediate: int = 128, heads: int = 4, kv_heads: int = 2
) -> Path:
    """Save a random-init 4-layer LLaMA (seed 0) with ``tok``'s vocabulary and the tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=4,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_run_inputs(root: Path) -> Path:
    """A tiny LLaMA directory (real SmolLM2 tokenizer) and a JSONL of real Q/A sentences."""
    from hmora_ds import assets
    from hmora_ds.runtime.loading import load_tokenizer, resolve_checkpoint
    from tests._assets import require_asset

    # SmolLM2 is the tokenizer's source; missing, it skips (fails under CI=true).
    smol = require_asset(assets.SMOLLM2, lambda: resolve_checkpoint("smollm2-135m-instruct"))
    tok = load_tokenizer(smol)
    save_tiny_llama(root / "model", tok)
    lines = (REPO / "tests" / "fixtures" / "sentences.txt").read_text().strip().splitlines()
    with (root / "data.jsonl").open("w") as f:
        for i, line in enumerate(lines):
            q, a = line.split(" Answer: ")
            f.write(json.dumps({"id": f"s{i}", "source": q, "target": a, "task_name": "qa"}) + "\n")
    return root


def overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={root / 'model'}",
        "model.attn_implementation=eager",
        "data.kind=local",
        f"data.path={root / 'data.jsonl'}",
        "data.val_fraction=0.15",
        "data.max_input_tokens=48",
        "data.max_output_tokens=24",
        "train.max_steps=6",
        "train.lr=5e-3",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.router_stats_every=3",
        "eval.every=3",
        "eval.batch_size=4",
        "checkpoint.every=3",
        "checkpoint.keep_last=1",
        f"output_dir={out}",
        *extra,
    ]


# Exact layout equality: no dropout, and a small lr (Adam's g/sqrt(v) turns float rounding of
# the cross-rank sums into steps of size ~lr on near-zero gradients).
NO_DROPOUT = (
    "method.adapter.dropout=0.0",
    "method.routing.router_dropout=0.0",
    "method.routing.encoder_dropout=0.0",
    "train.lr=1e-3",
)


# Two ranks × micro 1 × accumulation 2: the same global batch as one process × micro 2.
DIST_ARGS = (*NO_DROPOUT, "train.micro_batch_size=1", "train.grad_accum=2")


def single_process_run(tiny: Path, out: Path) -> Path:
    """The reference of the multi-node and container runs: 1 process × micro 2 × accum 2."""
    args = overrides(tiny, out, *NO_DROPOUT, "train.micro_batch_size=2")
    launch("python", "zero2.json", [*args, "train.grad_accum=2"])
    return out


def node_commands(script: str, hostfile: str, port: str, tiny: Path, out: Path) -> list[list[str]]:
    """One ``run_deepspeed.sh --node-rank R`` command per node of a 2-node hostfile (no ssh:
    what each machine of a cluster runs), training ``DIST_ARGS`` into ``out``."""
    train = ["--deepspeed", "ds_configs/zero2.json", *overrides(tiny, out, *DIST_ARGS)]
    return [
        [script, "--hostfile", hostfile, "--node-rank", str(rank), "--master-addr", "127.0.0.1",
         "--master-port", port, "--", *train]
        for rank in (0, 1)
    ]  # fmt: skip


def assert_same_two_rank_run(run: Path, single: Path) -> None:
    """A 2-rank ZeRO-2 run of ``DIST_ARGS`` repeats ``single``: losses and final adapter."""
    from safetensors.torch import load_file

    assert summary(run)["world_size"] == 2 and summary(run)["zero_stage"] == 2
    losses = [torch.tensor([h["loss"] for h in summary(r)["history"]]) for r in (run, single)]
    assert len(losses[0]) == 6
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=name)


def launch(kind: str, ds: str, args: list[str], env: dict | None = None, expect: int = 0):
    if kind == "python":
        cmd = [sys.executable, LAUNCHER]
    elif kind == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", LAUNCHER]
    else:  # the deepspeed launcher, exactly as users run it
        cmd = [
            str(BIN / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            LAUNCHER,
        ]
    rc, out = run_command(
        [*cmd, "--deepspeed", str(REPO / "ds_configs" / ds), *args], TIMEOUT, env=env, cwd=REPO
    )
    assert rc == expect, f"{kind} exited {rc} (expected {expect}):\n{out[-4000:]}"
    return out


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _leaves(x, path: str = "") -> dict[str, object]:
    """Every leaf of a nested checkpoint structure, by path (``/key``, ``[i]``)."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _leaves(val, f"{path}/{key}").items()}
    if isinstance(x, (list, tuple)):
        return {k: v for i, val in enumerate(x) for k, v in _leaves(val, f"{path}[{i}]").items()}
    return {path: x}


def _assert_leaves_identical(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: {sorted(a.keys() ^ b.keys())[:10]}"
    for key, x in a.items():
        y = b[key]
        if torch.is_tensor(x):
            assert torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape, (what, key)
            assert torch.equal(x, y), f"{what}{key}: max |diff| {(x - y).abs().max().item()}"
        else:
            assert repr(x) == repr(y), f"{what}{key}: {x!r} != {y!r}"


def assert_same_final_state(run: Path, ref: Path, tag: str = "step00000006") -> None:
    """``run`` ended in exactly ``ref``'s state, bit for bit: the final adapter tensors, and in
    checkpoint ``tag`` every optimizer states file (Adam's exp_avg, exp_avg_sq, step, the fp32
    master partitions, the param groups with their lr), the LR scheduler's state and the saved
    trainable weights. Loaded weights-only; both runs took the same code path, so any
    difference is a resume bug (a loss history can agree to 1e-6 while these do not)."""
    from safetensors.torch import load_file

    from hmora_ds.train.checkpoint import safe_load

    adapter = "adapter/adapter_model.safetensors"
    _assert_leaves_identical(
        load_file(str(run / adapter)), load_file(str(ref / adapter)), f"{run.name}/{adapter}"
    )
    got_dir, want_dir = run / "checkpoints" / tag, ref / "checkpoints" / tag
    optim = sorted(p.name for p in want_dir.glob("*optim_states.pt"))
    assert optim and optim == sorted(p.name for p in got_dir.glob("*optim_states.pt"))
    for name in optim:
        got = _leaves(safe_load(got_dir / name)["optimizer_state_dict"])
        want = _leaves(safe_load(want_dir / name)["optimizer_state_dict"])
        for part in ("exp_avg", "exp_avg_sq", "step"):  # what this comparison is about
            assert any(k.endswith(f"/{part}") for k in want), (name, part)
        _assert_leaves_identical(got, want, f"{tag}/{name}")
    for name in sorted(p.name for p in want_dir.glob("*model_states.pt")):
        got, want = safe_load(got_dir / name), safe_load(want_dir / name)
        if "module" not in want:  # an expert-parallel file of one expert's weights
            _assert_leaves_identical(_leaves(got), _leaves(want), f"{tag}/{name}")
            continue
        for key in ("module", "lr_scheduler", "global_steps"):
            _assert_leaves_identical(_leaves(got[key]), _leaves(want[key]), f"{tag}/{name}/{key}")

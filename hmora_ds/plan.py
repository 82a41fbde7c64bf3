"""Memory planner: which ZeRO stage / offload / micro-batch fits a run config on given GPUs.

    python -m hmora_ds.plan --preset qwen2_7b_zero3 --gpus 8 [--nodes 2] [--gpu-mem 48]

``--preset`` is a run config (``configs/<name>.yaml`` or a path). Its header line
``# hardware: gpus=8 nodes=1 gpu_mem=48 cpu_mem=256 deepspeed=zero3`` supplies the defaults
for anything not given on the command line. The base model is built on the ``meta`` device
(shapes from ``hmora_ds/model_configs``), so the parameter counts are exact and no weights are
read. Each candidate layout (every ``ds_configs/*.json``, with and without gradient
checkpointing) is estimated with :mod:`hmora_ds.memory` and reported with the largest
micro-batch that fits; the verdict says whether the run config as written fits, and if not,
what does or why nothing does.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmora_ds.cli import Parser, prog_name
from hmora_ds.memory import (
    GIB,
    Counts,
    Estimate,
    Shapes,
    Strategy,
    Workload,
    deepspeed_all_trainable,
    estimate,
    usable_bytes,
)
from hmora_ds.params import MODEL_CONFIGS_DIR, load_model_config
from hmora_ds.resources import CONFIGS_DIR, DS_CONFIGS_DIR

HARDWARE_RE = re.compile(r"^#\s*hardware:\s*(.*)$", re.MULTILINE)
MICRO_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def resolve_preset(name: str) -> Path:
    """``configs/<name>.yaml`` or a path to a run config."""
    for candidate in (CONFIGS_DIR / f"{name}.yaml", Path(name)):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    raise ValueError(f"--preset: {name!r} is neither a run config in configs/ {names} nor a file")


def hardware_header(path: Path) -> dict[str, str]:
    """The ``# hardware: key=value …`` line of a run config ({} if absent)."""
    match = HARDWARE_RE.search(path.read_text())
    if not match:
        return {}
    pairs = [item.split("=", 1) for item in match.group(1).split() if "=" in item]
    return {k: v for k, v in pairs}


def model_config_for(name_or_path: str) -> Any:
    """Architecture of ``model.name_or_path``: a shipped shape (by file stem or by its
    ``_name_or_path``), or a local directory / config.json."""
    import json

    for path in sorted(MODEL_CONFIGS_DIR.glob("*.json")):
        if name_or_path in (path.stem, json.loads(path.read_text()).get("_name_or_path")):
            return load_model_config(path.stem)
    return load_model_config(name_or_path)


@dataclass(frozen=True)
class Setup:
    """Everything the estimates need, resolved once."""

    name: str
    shapes: Shapes
    counts: Counts
    method: Any
    run: Any
    gpus: int
    nodes: int
    gpu_mem: float
    cpu_mem: float | None
    on_gpu: bool
    intended: str | None  # the ds_config stem the preset is meant for


def count_parameters(model_cfg: Any, method: Any) -> Counts:
    """Exact counts from the meta-built model (``hmora_ds.params``)."""
    from hmora_ds.params import build_meta_model, parameter_report

    model = build_meta_model(model_cfg, method)
    report = parameter_report(model)
    largest = max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in model.base_model.modules()
    )
    return Counts(model.base_parameter_count, report.trainable, largest, method.full_finetune)


def build_setup(
    preset: str,
    overrides: list[str] | None = None,
    *,
    gpus: int | None = None,
    nodes: int | None = None,
    gpu_mem: float | None = None,
    cpu_mem: float | None = None,
    device: str = "gpu",
    model_config: str | None = None,
) -> Setup:
    """Resolve a run config, its hardware header and the meta-built parameter counts.

    Arguments left None come from the run config's ``# hardware:`` line (else 1 node, 1 GPU,
    48 GiB, host RAM unchecked).
    """
    from hmora_ds.train.config import load_run_config

    path = resolve_preset(preset)
    header = hardware_header(path)
    run = load_run_config(path, overrides)
    model_cfg = model_config_for(model_config or run.model.name_or_path)
    method = run.hmora_config()

    def pick(value, key, default, kind):
        return kind(value if value is not None else header.get(key, default))

    cpu = cpu_mem if cpu_mem is not None else header.get("cpu_mem")
    setup = Setup(
        name=path.stem,
        shapes=Shapes.from_hf(model_cfg),
        counts=count_parameters(model_cfg, method),
        method=method,
        run=run,
        gpus=pick(gpus, "gpus", 1, int),
        nodes=pick(nodes, "nodes", 1, int),
        gpu_mem=pick(gpu_mem, "gpu_mem", 48, float),
        cpu_mem=float(cpu) if cpu is not None else None,
        on_gpu=device == "gpu",
        intended=header.get("deepspeed", "zero2"),
    )
    if setup.gpus < 1 or setup.nodes < 1:
        raise ValueError("--gpus and --nodes must be >= 1")
    return setup


def workload(setup: Setup, micro: int, checkpointing: bool) -> Workload:
    run = setup.run
    if run.model.dtype == "auto":
        weight_bytes = 2 if setup.on_gpu else 4
    else:
        weight_bytes = 2 if run.model.dtype == "bfloat16" else 4
    precision = run.train.precision
    if precision == "auto":
        precision = "bf16" if setup.on_gpu else "fp32"
    return Workload(
        micro_batch=micro,
        seq_len=run.data.max_input_tokens + run.data.max_output_tokens,
        prompt_len=run.data.max_input_tokens,
        gradient_checkpointing=checkpointing,
        weight_bytes=weight_bytes,
        compute_bytes=2 if precision == "bf16" else 4,
        eager_attention=run.model.attn_implementation == "eager",
        on_gpu=setup.on_gpu,
        ce_chunk_tokens=run.train.ce_chunk_tokens,
    )


def estimate_for(setup: Setup, strategy: Strategy, micro: int, checkpointing: bool) -> Estimate:
    return estimate(
        setup.shapes,
        setup.counts,
        setup.method,
        strategy,
        workload(setup, micro, checkpointing),
        setup.gpus,
        setup.nodes,
    )


def fits(setup: Setup, est: Estimate) -> tuple[bool, str]:
    """Whether an estimate fits the device (and host RAM, when it is known)."""
    usable = usable_bytes(setup.gpu_mem, setup.on_gpu)
    if est.total > usable:
        top = max(est.device, key=est.device.get)
        return False, (
            f"needs {est.total / GIB:.1f} GiB per GPU > {usable / GIB:.1f} GiB usable "
            f"(largest: {top} {est.device[top] / GIB:.1f} GiB)"
        )
    if setup.cpu_mem is not None and est.host_per_node > setup.cpu_mem * GIB:
        return False, (
            f"needs {est.host_per_node / GIB:.0f} GiB host RAM per node > {setup.cpu_mem:.0f} GiB"
        )
    return True, "fits"


def max_micro_batch(setup: Setup, strategy: Strategy, checkpointing: bool) -> int:
    best = 0
    for micro in MICRO_BATCHES:
        if fits(setup, estimate_for(setup, strategy, micro, checkpointing))[0]:
            best = micro
    return best


def strategies(setup: Setup, paths: list[str] | None) -> list[Strategy]:
    files = [Path(p) for p in paths] if paths else sorted(DS_CONFIGS_DIR.glob("*.json"))
    return [Strategy.from_json(p, setup.on_gpu) for p in files]


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


def breakdown(setup: Setup, est: Estimate) -> str:
    w = est.workload
    lines = [
        f"per-GPU memory, {est.strategy.name}, micro-batch {w.micro_batch} × {w.seq_len} "
        f"tokens, gradient checkpointing {'on' if w.gradient_checkpointing else 'off'}:"
    ]
    for name, value in est.device.items():
        lines.append(f"  {name:<36}{_gib(value)} GiB")
    lines.append(f"  {'total':<36}{_gib(est.total)} GiB")
    usable = usable_bytes(setup.gpu_mem, setup.on_gpu)
    lines.append(f"  {'usable (after runtime reserve)':<36}{_gib(usable)} GiB")
    if est.host_per_node:
        lines.append(f"  {'host RAM per node (offload)':<36}{_gib(est.host_per_node)} GiB")
    return "\n".join(lines)


def report(setup: Setup, ds_paths: list[str] | None = None) -> tuple[str, bool]:
    """The planner's text and whether the run config as written fits."""
    s, c, t = setup, setup.counts, setup.run.train
    n = s.gpus * s.nodes
    out = [
        f"plan {s.name}: {s.run.model.name_or_path} · preset {s.run.preset} · "
        f"{s.nodes} node(s) × {s.gpus} GPU(s) of {s.gpu_mem:g} GiB"
        + (f" · {s.cpu_mem:g} GiB host RAM/node" if s.cpu_mem is not None else "")
        + ("" if s.on_gpu else " · CPU (fp32)"),
        f"base {c.base:,} parameters ({'trainable' if c.full_finetune else 'frozen'}), "
        f"trainable {c.trainable:,} ({100 * c.trainable / c.base:.2f}%), "
        f"largest module {c.largest_module:,}",
        f"global batch {t.micro_batch_size} × {t.grad_accum} × {n} GPUs = "
        f"{t.micro_batch_size * t.grad_accum * n}; sequence ≤ "
        f"{s.run.data.max_input_tokens + s.run.data.max_output_tokens} tokens",
        "",
        f"{'layout':<16}{'ckpt':<6}{'weights':>9}{'adapters':>9}{'grads':>9}{'activ.':>9}"
        f"{'total':>9}{'host/node':>10}  {'micro':>5}  verdict at micro-batch {t.micro_batch_size}",
    ]
    chosen: Estimate | None = None
    candidates = []
    for strategy in strategies(s, ds_paths):
        for ckpt in (False, True):
            est = estimate_for(s, strategy, t.micro_batch_size, ckpt)
            ok, why = fits(s, est)
            states = sum(
                v for k, v in est.device.items() if k in ("adapter params", "optimizer states")
            )
            weights = est.device.get(
                "weights", est.device.get("model states (DeepSpeed estimator)", 0)
            )
            act = sum(est.device.get(k, 0) for k in ("activations", "logits", "task encoder"))
            mmax = max_micro_batch(s, strategy, ckpt)
            out.append(
                f"{strategy.name:<16}{'on' if ckpt else 'off':<6}{_gib(weights):>9}"
                f"{_gib(states):>9}{_gib(est.device.get('gradients + buckets', 0)):>9}"
                f"{_gib(act):>9}{_gib(est.total):>9}{_gib(est.host_per_node):>10}  "
                f"{mmax if mmax else '-':>5}  {'FITS' if ok else 'no: ' + why}"
            )
            candidates.append((strategy, ckpt, est, ok, mmax))
            if strategy.name == s.intended and ckpt == t.gradient_checkpointing:
                chosen = est
    out.append(
        "(GiB per GPU; 'micro' = the largest micro-batch that fits; columns add up to total)"
    )
    if chosen is None:
        chosen = candidates[0][2]
    out += ["", breakdown(s, chosen)]
    if c.full_finetune is False:
        strategy = chosen.strategy
        gpu, _ = deepspeed_all_trainable(
            c.base + c.trainable,
            c.largest_module,
            strategy.stage,
            s.gpus,
            s.nodes,
            strategy.offload_optimizer,
        )
        out.append(
            f"  (DeepSpeed's estimate_zero{3 if strategy.stage == 3 else 2}_model_states_mem_needs "
            f"assumes every parameter trains: {gpu / GIB:.1f} GiB of model states; with the base "
            "frozen only the adapters carry gradients and Adam states, computed above)"
        )
    ok, why = fits(s, chosen)
    out.append("")
    ckpt_word = "with" if t.gradient_checkpointing else "without"
    layout = (
        f"{chosen.strategy.name} {ckpt_word} gradient checkpointing, "
        f"micro-batch {t.micro_batch_size}"
    )
    if ok:
        out.append(f"verdict: the run config as written FITS ({layout}).")
        return "\n".join(out), True
    out.append(f"verdict: the run config as written does NOT fit ({layout}): {why}.")
    fitting = [(st, ck, m) for st, ck, _, _, m in candidates if m]
    if fitting:
        # Prefer the least sharding, no checkpointing, then the largest micro-batch.
        st, ck, m = sorted(fitting, key=lambda x: (x[0].stage, x[0].offload_param, x[1], -x[2]))[0]
        # The same per-GPU batch (micro × accumulation): the largest micro-batch dividing it.
        per_gpu = t.micro_batch_size * t.grad_accum
        m = max(d for d in range(1, min(m, per_gpu) + 1) if per_gpu % d == 0)
        accum = per_gpu // m
        out.append(
            f"instead: --deepspeed ds_configs/{st.name}.json train.micro_batch_size={m} "
            f"train.grad_accum={accum} train.gradient_checkpointing={str(ck).lower()}"
        )
    else:
        smallest = min(
            (estimate_for(s, st, 1, True) for st in strategies(s, ds_paths)), key=lambda e: e.total
        )
        _, why_small = fits(s, smallest)
        out.append(
            f"nothing fits because even {smallest.strategy.name} with micro-batch 1 and "
            f"gradient checkpointing {why_small}: use more or larger GPUs, more host RAM, or "
            "shorter sequences (data.max_input_tokens / data.max_output_tokens)."
        )
    return "\n".join(out), False


def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog=prog_name("hmora_ds.plan"),
        description="Per-GPU memory of a run config under ZeRO-2/3 (+ offload) and which "
        "layout and micro-batch fit (base model built on the meta device: no weights).",
    )
    p.add_argument("--preset", required=True, help="run config: configs/<name>.yaml or a path")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: header)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: header or 1)")
    p.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (default 48)")
    p.add_argument("--cpu-mem", type=float, default=None, help="host RAM per node, GiB")
    p.add_argument("--deepspeed", action="append", help="candidate ds_config(s) (default: all)")
    p.add_argument("--model-config", default=None, help="architecture (default: from the run)")
    p.add_argument(
        "--device", choices=("gpu", "cpu"), default="gpu", help="cpu: fp32, DeepSpeed on CPU"
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted run-config overrides (train.micro_batch_size=2)"
    )
    args = p.parse_args(argv)
    try:
        setup = build_setup(
            args.preset,
            args.overrides,
            gpus=args.gpus,
            nodes=args.nodes,
            gpu_mem=args.gpu_mem,
            cpu_mem=args.cpu_mem,
            device=args.device,
            model_config=args.model_config,
        )
        if args.deepspeed and setup.intended not in {Path(d).stem for d in args.deepspeed}:
            setup = dataclasses.replace(setup, intended=Path(args.deepspeed[0]).stem)
        text, ok = report(setup, args.deepspeed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

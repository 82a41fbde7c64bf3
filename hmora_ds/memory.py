"""Per-device memory of an HMoRA run under DeepSpeed ZeRO: the model behind ``hmora_ds.plan``.

Everything is in bytes, per data-parallel rank (one GPU), for one layout:

* **weights** – the frozen base in its load dtype (bf16 on GPU, fp32 on CPU). ZeRO-0/1/2 keep a
  full replica; ZeRO-3 keeps ``1/N`` plus the gathered working set (DeepSpeed's own estimator
  term ``4 · largest_layer_params``, scaled to the dtype); ZeRO-3 + ``offload_param`` keeps only
  the working set on the device and ``P·bytes / nodes`` in host RAM per node.
* **adapter states** – trainable parameters are fp32 (hmora-ds keeps adapters fp32 under bf16
  autocast): the parameter itself (4 B; ``/N`` under ZeRO-3), DeepSpeed's fp32 partition copy
  (4 B / N, ZeRO ≥ 1 always clones it), Adam moments (8 B / N). With ``offload_optimizer`` the
  last two (and the fp32 gradient partition) live in host RAM.
* **gradients** – the fp32 gradient partition (4 B / N) plus the reduce bucket(s) DeepSpeed
  allocates up front: ``reduce_bucket_size`` elements (fp32), twice with ``overlap_comm``.
  On CPU an untouched ``torch.empty`` costs no RSS, so there only ``min(bucket, P_trainable)``
  is counted.
* **activations** – saved tensors per token per decoder layer (formula in
  :func:`layer_activation_bytes`), times tokens ``b · s`` and layers; with gradient
  checkpointing only the layer input (``h`` elements) is kept per layer plus one layer
  recomputed in full. Plus the LM head: with ``train.ce_chunk_tokens`` one chunk's logits at a
  time, ``(a + 8) · V`` bytes per chunk token (on CPU a chunk holds target tokens only), and
  the hidden states' gradient, ``a · h`` per token; with the full logits (ZeRO-3, or
  ``ce_chunk_tokens=0``) ``(2a + 8) · V`` bytes per token (logits in the compute dtype and
  their gradient, fp32 log-probabilities saved by the label-smoothed cross entropy and their
  gradient); and the task encoder (one transformer layer over the prompt, checkpointed: its input).
* **full fine-tuning** makes every base parameter trainable: its states come from DeepSpeed's
  ``estimate_zero2/3_model_states_mem_needs`` (which assume exactly that), not from the
  frozen-base accounting above.

DeepSpeed's estimators (``estimate_zero{2,3}_model_states_mem_needs_all_cold``) assume every
parameter trains; with a frozen base and small adapters they overstate optimizer memory by
~16 bytes per frozen parameter, so the frozen-base case is computed here and the estimator's
number is only shown for comparison.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30

#: Device memory that is not tensors: CUDA context, NCCL buffers, allocator fragmentation.
GPU_RESERVE_GIB = 2.0


@dataclass(frozen=True)
class Shapes:
    """The base architecture, from its HF config (works for Qwen2 and LLaMA)."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, cfg: Any) -> Shapes:
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(
            hidden=cfg.hidden_size,
            ffn=cfg.intermediate_size,
            layers=cfg.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=cfg.vocab_size,
            tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Counts:
    """Parameter counts (from the meta-built model, see :func:`hmora_ds.params`)."""

    base: int
    trainable: int
    largest_module: int  # the largest leaf module (the embedding for these models)
    full_finetune: bool


@dataclass(frozen=True)
class Strategy:
    """How DeepSpeed shards: read from a ``ds_configs/*.json``."""

    name: str
    stage: int
    offload_param: bool = False
    offload_optimizer: bool = False
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True

    @classmethod
    def from_json(cls, path: str | Path, on_gpu: bool = True) -> Strategy:
        path = Path(path)
        zero = json.loads(path.read_text()).get("zero_optimization", {})
        stage = int(zero.get("stage", 0))

        def offloaded(key: str) -> bool:
            return zero.get(key, {}).get("device", "none") not in ("none", None)

        # DeepSpeed's defaults: overlap_comm on for ZeRO-3, off otherwise; hmora-ds forces it
        # off on CPU (deepspeed_config.build_ds_config).
        overlap = bool(zero.get("overlap_comm", stage == 3)) and on_gpu
        return cls(
            name=path.stem,
            stage=stage,
            offload_param=offloaded("offload_param"),
            offload_optimizer=offloaded("offload_optimizer"),
            reduce_bucket_size=int(float(zero.get("reduce_bucket_size", 5e8))),
            overlap_comm=overlap,
            contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        )


@dataclass(frozen=True)
class Workload:
    """What one rank processes per micro-step, and in which dtypes."""

    micro_batch: int
    seq_len: int
    prompt_len: int
    gradient_checkpointing: bool
    weight_bytes: int  # 2 (bf16 base) or 4 (fp32)
    compute_bytes: int  # 2 (bf16 autocast) or 4 (fp32)
    eager_attention: bool
    on_gpu: bool
    # train.ce_chunk_tokens: the LM loss in chunks without the full logits (0: from them).
    ce_chunk_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass
class Estimate:
    """Per-GPU bytes by component, host RAM per node, and the verdict."""

    strategy: Strategy
    workload: Workload
    device: dict[str, float] = field(default_factory=dict)
    host_per_node: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.device.values())


#: The four inputs adapters and routers read in a decoder layer, and who reads each.
LAYER_INPUTS = (
    ("attention input", ("q", "k", "v")),
    ("attention output", ("o",)),
    ("MLP input", ("gate", "up")),
    ("MLP product", ("down",)),
)


def input_width(name: str, shapes: Shapes) -> int:
    return {
        "attention input": shapes.hidden,
        "attention output": shapes.q_width,
        "MLP input": shapes.hidden,
        "MLP product": shapes.ffn,
    }[name]


def site_method(method: Any, shapes: Shapes) -> Any:
    """The method object (its sites: experts per layer and target, router groups) of a config
    (or a method already built), bound to the model's shape."""
    from hmora_ds.methods import Method, build_method

    built = method if isinstance(method, Method) else build_method(method)
    built.bind(shapes.hidden, shapes.layers)
    return built


def routers_on(method: Any, layer: int, targets: tuple[str, ...]) -> list[int]:
    """The expert counts of the routers reading one input of ``layer`` (one per router group
    with a member among ``targets``)."""
    return [
        method.experts_at(layer, group[0])
        for group in method.router_groups(layer)
        if set(group) & set(targets)
    ]


def layer_activation_bytes(
    shapes: Shapes, method: Any, w: Workload, layer: int | None = None
) -> float:
    """Bytes saved for backward per token in decoder layer ``layer`` (no checkpointing); the
    mean over the layers when ``layer`` is None. ``method``: a method config or object — its
    sites (experts per layer and target, router groups) decide the adapter terms.

    ``a`` is the compute dtype's size, ``h`` hidden, ``f`` FFN width, ``q`` = heads·head_dim,
    ``n`` heads, ``s`` sequence length, ``E`` experts, ``R`` rank. Frozen linears save nothing
    (their input gradient needs only the weight), so the base layer keeps::

        base = 2·4h          the two RMSNorms' fp32 inputs
             + a·3q          RoPE'd q, and k, v expanded to q width (GQA) for the matmuls
             + n·s·(4 + a)   eager attention: fp32 softmax and its cast (a = 4: once);
                             SDPA instead keeps 4n (log-sum-exp; + a·q output on GPU)
             + a·3f          gate, SiLU(gate) and up, saved by SiLU and the product

    and each input ``X`` (width ``i``) read by adapters or token routers adds::

             a·i             X itself (with dropout the dropped input is rebuilt from X:
                             hmora_ds/experts/dropout.py, for adapters and routers alike)
           + i               per adapter or router with dropout (its boolean mask)
           + a·i             per router with dropout on a 2-byte base: its fp32 linear's input
                             is a cast of the dropped input, kept as autocast's bf16 copy

    and each adapted linear: ``2a·E·R + 4E`` (expert activations before / after gating, fp32
    gates; Hydra ``a·R + a·E·R + 4E``; single LoRA ``a·R``); each top-k token router ``16E``
    (fp32 probabilities, top-k / mixing buffers; a soft router's probabilities are its
    adapters' gates, counted there). Full fine-tuning (weights trainable) saves
    every linear input and both normalised RMSNorm outputs: ``a·(4h + q + f)`` more.
    Checked against the bytes autograd saves on tiny LLaMAs (tests/test_plan.py).
    """
    a, h, f, q = w.compute_bytes, shapes.hidden, shapes.ffn, shapes.q_width
    total = 2 * 4 * h + a * 3 * q + a * 3 * f
    if w.eager_attention:
        total += shapes.heads * w.seq_len * (4 + (a if a < 4 else 0))
    else:
        total += 4 * shapes.heads + (a * q if w.on_gpu else 0)
    m = site_method(method, shapes)
    if m.trains_base:
        return float(total + a * (4 * h + q + f))
    if layer is None:
        layers = range(shapes.layers)
        return sum(layer_activation_bytes(shapes, m, w, i) for i in layers) / shapes.layers
    ad, r = m.config.adapter, m.config.routing
    for name, targets in LAYER_INPUTS:
        adapters = {t: m.experts_at(layer, t) for t in targets}
        adapters = {t: e for t, e in adapters.items() if e is not None}
        routers = routers_on(m, layer, targets)
        if not adapters and not routers:
            continue
        width = input_width(name, shapes)
        masks = len(adapters) if ad.dropout > 0 else 0
        dropped = len(routers) if r.router_dropout > 0 else 0
        total += a * width + width * (masks + dropped) + (a * width * dropped if a < 4 else 0)
        total += (16 if r.mode == "topk" else 0) * sum(routers)
        for e in adapters.values():
            rank = ad.rank
            if e == 1:
                total += a * rank
            elif ad.hydra:
                total += a * rank + a * e * rank + 4 * e
            else:
                total += 2 * a * e * rank + 4 * e
    return float(total)


def activation_bytes(shapes: Shapes, method: Any, w: Workload) -> dict[str, float]:
    """Activation memory of one micro-batch: decoder layers, LM head, task encoder."""
    m = site_method(method, shapes)
    per_layer = [layer_activation_bytes(shapes, m, w, i) * w.tokens for i in range(shapes.layers)]
    if w.gradient_checkpointing:
        # Only each layer's input survives the forward; one layer is recomputed at a time.
        layers = w.compute_bytes * shapes.hidden * w.tokens * shapes.layers + max(per_layer)
    else:
        layers = sum(per_layer)
    if w.ce_chunk_tokens:
        # One chunk's logits (compute dtype), fp32 copy and gradient at a time, plus the
        # hidden states' gradient kept for the backward (hmora_ds/lm_head.py).
        # On CPU only the target rows reach the head (the prompt rows are left out first).
        rows = w.tokens if w.on_gpu else w.micro_batch * (w.seq_len - w.prompt_len)
        chunk = min(w.ce_chunk_tokens, rows)
        logits = (
            w.compute_bytes + 8
        ) * shapes.vocab * chunk + w.compute_bytes * shapes.hidden * w.tokens
    else:
        logits = (2 * w.compute_bytes + 8) * shapes.vocab * w.tokens
    encoder = 0.0
    if m.task_encoder_kind == "transformer":
        tokens = w.micro_batch * w.prompt_len
        # Checkpointed (hmora_ds/routing/task_encoder.py): only its fp32 input is kept. Its
        # activations (~6 h-wide tensors, 3 FFN-wide, the scores) exist again only while its
        # backward runs, after every decoder layer's, so they do not raise the peak.
        encoder = 4 * tokens * shapes.hidden
    return {"activations": float(layers), "logits": float(logits), "task encoder": encoder}


def deepspeed_all_trainable(
    total_params: int, largest: int, stage: int, gpus: int, nodes: int, offload: bool
) -> tuple[float, float]:
    """(device bytes, host bytes) from DeepSpeed's own estimators (all parameters trainable)."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params, largest, gpus, nodes, cpu_offload=offload, cpu_offload_params=offload
        )
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params, gpus, nodes, cpu_offload=offload
        )
    return float(gpu), float(cpu)


def estimate(
    shapes: Shapes,
    counts: Counts,
    method: Any,
    strategy: Strategy,
    workload: Workload,
    gpus_per_node: int,
    nodes: int,
) -> Estimate:
    """Per-rank memory of one layout (see the module docstring for every term)."""
    n = gpus_per_node * nodes
    est = Estimate(strategy, workload)
    wb, st = workload.weight_bytes, strategy
    offload_opt = st.offload_optimizer
    working_set = 2 * wb * counts.largest_module  # DeepSpeed: 4 · largest_layer (16-bit)
    if counts.full_finetune:
        # Every parameter trains: DeepSpeed's estimator is exactly this case.
        gpu, cpu = deepspeed_all_trainable(
            counts.base, counts.largest_module, st.stage, gpus_per_node, nodes, offload_opt
        )
        est.device["model states (DeepSpeed estimator)"] = gpu
        est.host_per_node = cpu
        est.notes.append("full fine-tuning: model states from DeepSpeed's estimator")
    else:
        ptr = counts.trainable
        if st.stage == 3 and st.offload_param:
            est.device["weights"] = working_set
            est.host_per_node += wb * counts.base / nodes
        elif st.stage == 3:
            est.device["weights"] = wb * counts.base / n + working_set
        else:
            est.device["weights"] = float(wb * counts.base)
        param = 4 * ptr / (n if st.stage == 3 else 1)
        states = 12 * ptr / n  # fp32 partition copy + Adam m, v
        if st.stage == 3 and st.offload_param:
            est.host_per_node += param * gpus_per_node
            param = 0.0
        est.device["adapter params"] = param
        if offload_opt:
            est.host_per_node += (states + 4 * ptr / n) * gpus_per_node
            est.device["optimizer states"] = 0.0
        else:
            est.device["optimizer states"] = states
        grads = 0.0 if offload_opt else 4 * ptr / n
        bucket = st.reduce_bucket_size if workload.on_gpu else min(st.reduce_bucket_size, ptr)
        if st.contiguous_gradients or st.stage == 3:
            grads += 4 * bucket * (2 if st.overlap_comm else 1)
        est.device["gradients + buckets"] = grads
    if st.stage == 3 and workload.ce_chunk_tokens:  # ZeRO-3 computes the loss from the logits
        workload = dataclasses.replace(workload, ce_chunk_tokens=0)
    est.device.update(activation_bytes(shapes, method, workload))
    return est


def usable_bytes(gpu_mem_gib: float, on_gpu: bool) -> float:
    """Device memory available to tensors (the reserve covers context, NCCL, fragmentation)."""
    return (gpu_mem_gib - (GPU_RESERVE_GIB if on_gpu else 0.0)) * GIB

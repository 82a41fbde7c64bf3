"""Expert parallelism: the LoRA experts of each MoRA block placed across ranks.

Shapes: ``N`` routed tokens of this rank, ``K`` top-k, ``M`` rows received, ``I`` / ``O`` the
block's in / out features, ``E`` experts, ``L = E / ep`` local experts, ``R`` rank.

With ``ep_size = ep`` every group of ``ep`` consecutive ranks shares one copy of the experts:
rank ``j`` of the group owns experts ``j·L … (j+1)·L − 1`` (DeepSpeed's expert-parallel groups;
the expert-data-parallel groups hold the same experts on other groups). Routers, hydra's shared
``A`` and single-LoRA layers stay replicated. Per block and step:

1. the replicated router gives top-k gates for this rank's tokens (no capacity, no dropping);
2. each (token, expert) pair's input row — ``x`` (I wide), or ``x·A`` (R wide) with Hydra — goes
   to the owner of the expert with a variable-size autograd all-to-all;
3. the owner computes all its local experts on the rows it received with stacked weights (two
   GEMMs, each row masked to its own expert), so every local expert is in the graph even when it
   received no row;
4. results return with the reverse all-to-all, are scaled by their gates here (the gate's
   gradient stays local) and summed into the tokens' outputs.

Bytes moved per token per block (fp32, forward + backward): ``2·K·(I + O)·4`` without Hydra,
``2·K·(R + O)·4`` with it.

DeepSpeed only treats a module as expert-parallel if it subclasses ``deepspeed.moe.layer.MoE``
and names its experts ``deepspeed_moe.experts.deepspeed_experts.<i>`` (its checkpoint code saves
one file per global expert by that name); DeepSpeed's own ``MOELayer`` cannot carry non-square
LoRA experts, so the math is ours and only the structure follows DeepSpeed.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from hmora_ds.experts import MoRALinear

EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts"
_EXPERT_KEY = re.compile(rf"^(.*)\.{re.escape(EXPERT_PREFIX)}\.(\d+)\.(lora_A|lora_B)$")


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel group of this size."""
    return f"ep_size_{ep_size}"


def validate_expert_parallel(
    ep_size: int, num_experts: int, world_size: int, zero_stage: int, routing_mode: str,
    has_mixture: bool,
) -> None:  # fmt: skip
    """Refuse configurations expert parallelism cannot run, naming the field and the fix."""
    if ep_size == 1:
        return
    if ep_size < 1:
        raise ValueError(f"parallel.ep_size: must be >= 1, got {ep_size}")
    if not has_mixture:
        raise ValueError("parallel.ep_size: the method has no mixture of experts to distribute")
    if num_experts % ep_size:
        raise ValueError(
            f"parallel.ep_size ({ep_size}) must divide adapter.num_experts ({num_experts})"
        )
    if world_size % ep_size:
        raise ValueError(
            f"parallel.ep_size ({ep_size}) must divide the data-parallel world size ({world_size})"
        )
    if zero_stage >= 3:
        raise ValueError(
            "parallel.ep_size > 1 with ZeRO stage 3 is not supported: DeepSpeed's expert "
            "parallelism refuses stage 3; use ds_configs/zero2_ep.json (ZeRO-2)"
        )
    if routing_mode != "topk":
        raise ValueError(
            "parallel.ep_size > 1 needs routing.mode=topk: soft routing sends every token to "
            "every expert (an all-gather, no saving over replicated experts)"
        )


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all whose backward is the reverse all-to-all.

    DeepSpeed's ``_AllToAll`` needs equal splits; top-k dispatch without capacity has unequal
    ones, so this is the same idea with split sizes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits  # reversed roles
        back = grad.new_empty((sum(out_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), out_splits, in_splits, group=ctx.group)
        return back, None, None, None


class LoRAExpert(nn.Module):
    """One expert: ``lora_A`` (R, I) — absent with Hydra's shared A — and ``lora_B`` (O, R)."""

    def __init__(self, a: torch.Tensor | None, b: torch.Tensor, name: str) -> None:
        super().__init__()
        self.lora_A = None if a is None else nn.Parameter(a.clone())
        self.lora_B = nn.Parameter(b.clone())
        for p in self.parameters():
            p.allreduce = False  # reduced over the expert-data-parallel group only
            p.group_name = name


class ExpertParallelMoRA(MoE):
    """A MoRA block whose experts live on the ranks of an expert-parallel group.

    Built from a replicated :class:`MoRALinear` by :func:`to_expert_parallel` (which keeps the
    experts ``ep_rank·L … (ep_rank+1)·L − 1``), so it starts from exactly the same weights.
    """

    def __init__(self, block: MoRALinear, ep_size: int, ep_rank: int) -> None:
        nn.Module.__init__(self)  # MoE.__init__ would build DeepSpeed's gate and MOELayer
        e, r = block.num_experts, block.rank
        self.num_experts, self.ep_size, self.ep_rank = e, ep_size, ep_rank
        self.num_local_experts = e // ep_size
        self.expert_group_name = group_name(ep_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.base_layer = block.base_layer
        self.in_features, self.out_features = block.in_features, block.out_features
        self.rank, self.hydra, self.scaling = r, block.hydra, block.scaling
        self.dropout = block.dropout
        self._router = block._router
        self.top_k = block.router.top_k
        first = ep_rank * self.num_local_experts
        local = range(first, first + self.num_local_experts)
        with torch.no_grad():
            self.hydra_A = nn.Parameter(block.lora_A.detach().clone()) if self.hydra else None
            experts = [
                LoRAExpert(
                    None if self.hydra else block.lora_A[i * r : (i + 1) * r],
                    block.lora_B[:, i * r : (i + 1) * r],
                    self.expert_group_name,
                )
                for i in local
            ]
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.experts = nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(experts)
        self._ep_group: Any = None

    @property
    def router(self):
        return self._router[0]

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine: create (once) and bind the expert-parallel group."""
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_
            )
        self.bind_group(groups._get_expert_parallel_group(self.expert_group_name))
        actual = groups._get_expert_parallel_rank(self.expert_group_name)
        if actual != self.ep_rank:
            raise RuntimeError(f"expert parallel rank {actual} != the rank {self.ep_rank} "
                               "whose experts this block holds")  # fmt: skip

    def bind_group(self, group: Any) -> None:
        self._ep_group = group

    def _local_weights(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Stacked local weights: A (L·R, I) (None with Hydra) and B (O, L·R)."""
        experts = self.local_experts
        a = None if self.hydra else torch.cat([ex.lora_A for ex in experts], 0)
        return a, torch.cat([ex.lora_B for ex in experts], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._ep_group is None:
            raise RuntimeError("ExpertParallelMoRA: no process group bound (deepspeed.initialize "
                               "binds it; or call bind_group)")  # fmt: skip
        out = self.base_layer(x)
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.local_experts[0].lora_B.dtype)
        if self.hydra:
            h = F.linear(h, self.hydra_A)  # (…, R): Hydra ships R-wide rows
        gates = self.router.gates(x).expand(*x.shape[:-1], self.num_experts)
        rows_in = h.reshape(-1, h.shape[-1])  # (N, I or R)
        vals, idx = gates.reshape(-1, self.num_experts).topk(self.top_k, dim=-1)  # (N, K)
        n, k, lx = rows_in.shape[0], self.top_k, self.num_local_experts
        token = torch.arange(n, device=x.device).repeat_interleave(k)
        expert, gate = idx.reshape(-1), vals.reshape(-1)
        dest = torch.div(expert, lx, rounding_mode="floor")
        order = torch.argsort(dest, stable=True)
        token, expert, gate = token[order], expert[order], gate[order]
        send_counts = torch.bincount(dest, minlength=self.ep_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self._ep_group)
        in_splits, out_splits = send_counts.tolist(), recv_counts.tolist()
        rows = _AllToAll.apply(rows_in[token], out_splits, in_splits, self._ep_group)  # (M, ·)
        local_id = torch.empty(sum(out_splits), dtype=expert.dtype, device=x.device)
        dist.all_to_all_single(local_id, expert % lx, out_splits, in_splits, group=self._ep_group)
        a, b = self._local_weights()
        hid = rows.unsqueeze(1) if self.hydra else F.linear(rows, a).unflatten(-1, (lx, self.rank))
        mask = F.one_hot(local_id, lx).to(hid.dtype).unsqueeze(-1)  # (M, L, 1)
        y = F.linear((hid * mask).flatten(1), b)  # (M, O): every local expert in the graph
        back = _AllToAll.apply(y, in_splits, out_splits, self._ep_group)  # (N·K, O)
        contrib = back * (gate.unsqueeze(-1) * self.scaling).to(back.dtype)
        delta = contrib.new_zeros(n, self.out_features).index_add(0, token, contrib)
        return out + delta.reshape(out.shape).to(out.dtype)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"local={self.num_local_experts}, hydra={self.hydra}")  # fmt: skip


def to_expert_parallel(model: nn.Module, ep_size: int, ep_rank: int) -> int:
    """Replace every routed :class:`MoRALinear` of ``model`` by an expert-parallel block.

    Returns:
        The number of blocks converted.
    """
    converted = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, MoRALinear) and module.router is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child,
                    ExpertParallelMoRA(module, ep_size, ep_rank))  # fmt: skip
            converted += 1
    return converted


def expert_parallel_blocks(model: nn.Module) -> dict[str, ExpertParallelMoRA]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertParallelMoRA)}


def standardize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Expert-parallel tensor names → the replicated layout (``…q_proj.lora_A`` stacked).

    ``state`` must hold every global expert of every block (``…deepspeed_experts.<global id>``).
    """
    out: dict[str, torch.Tensor] = {}
    stacks: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        m = _EXPERT_KEY.match(key)
        if m:
            stacks.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
        elif key.endswith(".hydra_A"):
            out[key[: -len("hydra_A")] + "lora_A"] = value
        else:
            out[key] = value
    for (prefix, kind), experts in stacks.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))):
            raise ValueError(f"expert parallel state of {prefix}: experts {ids} are not complete")
        parts = [experts[i] for i in ids]
        out[f"{prefix}.{kind}"] = torch.cat(parts, 0 if kind == "lora_A" else 1)
    return out


def gather_expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """All trainable tensors in the replicated layout; experts all-gathered over their group.

    A collective: every rank of the expert-parallel group must call it.
    """
    state: dict[str, torch.Tensor] = {}
    blocks = expert_parallel_blocks(model)
    for name, p in model.named_parameters():
        if p.requires_grad and f".{EXPERT_PREFIX}." not in name:
            state[name] = p.detach().cpu()
    for name, block in blocks.items():
        world = dist.get_world_size(block._ep_group)
        for local, expert in enumerate(block.local_experts):
            for kind in ("lora_A", "lora_B"):
                t = getattr(expert, kind)
                if t is None:
                    continue
                parts = [torch.empty_like(t) for _ in range(world)]
                dist.all_gather(parts, t.detach().contiguous(), group=block._ep_group)
                for src, part in enumerate(parts):
                    gid = src * block.num_local_experts + local
                    state[f"{name}.{EXPERT_PREFIX}.{gid}.{kind}"] = part.cpu()
    return standardize_state_dict(state)

"""Expert parallelism: the LoRA experts of each MoRA block placed across ranks.

The block computes eqs. 3–5 with the same code as every expert bank
(:class:`~hmora_ds.experts.bank.ExpertBankForward`); what is expert-parallel is its dispatcher,
:class:`AllToAllDispatcher`, which sends each routed (token, expert) pair to the rank that owns
the expert.

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

from hmora_ds.experts import Dispatcher, MoRALinear
from hmora_ds.experts.bank import ExpertBankForward
from hmora_ds.methods import adapter_parameters

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


class ExpertParallelMoRA(ExpertBankForward, MoE):
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

    @property
    def adapter_dtype(self) -> torch.dtype:
        return self.local_experts[0].lora_B.dtype

    def _dispatcher(self) -> Dispatcher:
        if self._ep_group is None:
            raise RuntimeError("ExpertParallelMoRA: no process group bound (deepspeed.initialize "
                               "binds it; or call bind_group)")  # fmt: skip
        return _ALL_TO_ALL

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"local={self.num_local_experts}, hydra={self.hydra}")  # fmt: skip


class AllToAllDispatcher(Dispatcher):
    """The routed pairs of this rank's tokens computed by the experts' owners (steps 2–4 of the
    module docstring); any number of experts per token (the router's non-zero gates)."""

    name = "expert-parallel"

    def delta(self, block, h: torch.Tensor, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        group, lx, e = block._ep_group, block.num_local_experts, block.num_experts
        if block.hydra:
            h = F.linear(h, block.hydra_A)  # (…, R): Hydra ships R-wide rows
        rows_in = h.reshape(-1, h.shape[-1])  # (N, I or R)
        plan = block.router.dispatch(gates, x.shape[-2])  # sorted by expert, shared per group
        counts = torch.diff(plan.offsets.long(), prepend=plan.offsets.new_zeros(1).long())
        expert = torch.repeat_interleave(torch.arange(e, device=x.device), counts)
        # Experts sorted ⇒ owners sorted: each owner's pairs are one contiguous slice.
        send_counts = counts.view(block.ep_size, lx).sum(-1)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        in_splits, out_splits = send_counts.tolist(), recv_counts.tolist()
        rows = _AllToAll.apply(rows_in[plan.token], out_splits, in_splits, group)  # (M, ·)
        local_id = torch.empty(sum(out_splits), dtype=expert.dtype, device=x.device)
        dist.all_to_all_single(local_id, expert % lx, out_splits, in_splits, group=group)
        a, b = block._local_weights()
        hid = (
            rows.unsqueeze(1) if block.hydra else F.linear(rows, a).unflatten(-1, (lx, block.rank))
        )
        mask = F.one_hot(local_id, lx).to(hid.dtype).unsqueeze(-1)  # (M, L, 1)
        y = F.linear((hid * mask).flatten(1), b)  # (M, O): every local expert in the graph
        back = _AllToAll.apply(y, in_splits, out_splits, group)  # this rank's pairs, (P, O)
        contrib = back * (plan.weight.unsqueeze(-1) * block.scaling).to(back.dtype)
        return contrib.new_zeros(plan.num_tokens, block.out_features).index_add(0, plan.token,
                                                                               contrib)  # fmt: skip


_ALL_TO_ALL = AllToAllDispatcher()


def to_expert_parallel(model: nn.Module, ep_size: int, ep_rank: int) -> int:
    """Replace every routed :class:`MoRALinear` of ``model`` by an expert-parallel block.

    Returns:
        The number of blocks converted.
    """
    blocks = [(n, m) for n, m in model.named_modules()
              if isinstance(m, MoRALinear) and m.router is not None]  # fmt: skip
    for name, module in blocks:  # a method may give each site its own E: check all first
        if module.num_experts % ep_size:
            raise ValueError(
                f"parallel.ep_size ({ep_size}) must divide the {module.num_experts} experts "
                f"of {name}; choose an ep_size dividing every site's expert count"
            )
    for name, module in blocks:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child,
                ExpertParallelMoRA(module, ep_size, ep_rank))  # fmt: skip
    converted = len(blocks)
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
    for name, p in adapter_parameters(model).items():
        if f".{EXPERT_PREFIX}." not in name:
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

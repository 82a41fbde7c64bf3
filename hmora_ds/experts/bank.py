"""The expert bank: a frozen dense layer plus LoRA experts behind a router (spec §1, eqs. 3–5).

Shapes: ``N…`` leading dims (B, T), ``I`` in_features, ``O`` out_features, ``E`` experts,
``R`` rank.

    Z = base(X) + s · Σ_i g_i · (dropout(X) A_i) B_i

One bank layout serves every method: the E experts' A matrices stacked in ``lora_A`` (E·R, I)
(Hydra LoRA: one shared A of R rows), their B matrices side by side in ``lora_B`` (O, E·R); a
single plain LoRA is the E = 1 case with no router. Expert ``i`` owns rows ``i·R:(i+1)·R`` of
``lora_A`` and columns ``i·R:(i+1)·R`` of ``lora_B``. E is per site (a method may give each
layer its own count). The gates come from the block's router (any module with ``gates(x)``,
``dispatch(gates, T)``, ``top_k`` and ``sparse_gates``); how the routed update is computed is
the block's :class:`~hmora_ds.experts.dispatch.Dispatcher`: dense (two GEMMs), sparse (the
routed pairs only, grouped per expert) or the benchmark's per-expert loop, all equal.
``adapter.compute=auto`` picks sparse where :func:`prefer_sparse` says the benchmark measured
it faster.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from hmora_ds.experts.dispatch import DenseDispatcher, Dispatcher, SparseDispatcher
from hmora_ds.experts.dropout import InputDropout, scaled_mm

# adapter.compute=auto picks the sparse path only where the dense adapter is the expensive part
# of the block: E·R at least SPARSE_MIN_WIDTH × the layer's input width, with each token using at
# most 1/8 of the experts. Measured (Qwen2-1.5B shape, bf16; H100 at e = 4 … 32, H200 at e = 32
# in bench/results/step_cuda.md): with r = 8 (E·R ≤ 256 ≪ 1536) the dense path is faster at every
# e (sparse 0.6–0.76×) and uses less memory (the grouped GEMM saves the gathered token rows for
# backward), so the paper's settings stay dense. The sparse side of the rule (E·R ≥ 2·I) is a
# FLOP argument: no measured run has reached it. See docs/performance.md.
SPARSE_MIN_WIDTH = 2.0
SPARSE_MIN_RATIO = 8


def prefer_sparse(num_experts: int, top_k: int | None, rank: int, in_features: int) -> bool:
    """Whether ``adapter.compute=auto`` uses the sparse path (``top_k`` None: a variable count
    of experts per token, whose cost is unknown in advance: dense)."""
    return top_k is not None and (
        num_experts >= SPARSE_MIN_RATIO * top_k
        and num_experts * rank >= SPARSE_MIN_WIDTH * in_features
    )


class ExpertBankForward:
    """``Z = base(X) + s · Σ_i g_i · (dropout(X) A_i) B_i`` (eqs. 3–5), written once for every
    bank layout: the replicated :class:`MoRALinear` and the expert-parallel block
    (:mod:`hmora_ds.parallel.expert_parallel`) differ only in their dispatcher.

    Needs ``base_layer``, ``dropout``, ``router``, ``lora_A`` / ``lora_B`` (or the dispatcher's
    own weights), ``scaling``, :attr:`adapter_dtype` and :meth:`_dispatcher`.

    A router with an ``observe_update(x, gates, update)`` method is shown the block's routed
    update as a function of the gates: ``update(g)`` is ``s · Σ_i g_i (h A_i) B_i`` (N…, O) for
    gates ``g`` of its choosing, computed by the block's own dispatcher (dense, sparse or
    expert-parallel alike). HiMoLE uses it for the per-group outputs of its diversity loss.
    """

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The adapters' dtype (fp32 whatever the base; bf16 autocast computes in bf16)."""
        return self.lora_B.dtype

    def _dispatcher(self) -> Dispatcher:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop = self.dropout
        if isinstance(drop, InputDropout) and drop.projects() and self._projects_first(x):
            # dropout and the A projection as one autograd node (the common case: a plain
            # LoRA or the dense experts); it keeps x and the mask, as the scope below does,
            # and applies the scaling s inside its products (the update is linear in it).
            # The base product comes first: the backward runs the later node first, so the
            # dropout node's gradient of x (a tensor of its own) reaches x before the base
            # product's (a view of its GEMM's output), and autograd adds the others into it
            # in place: it reuses only the first gradient to arrive.
            own = self._base_into_update(x)
            out = self._base_product(x) if own else self.base_layer(x)
            projected = drop.project(x, self.lora_A, alpha=self.scaling)
            return self._adapted(x, None, out, projected, own_out=own)
        out = self.base_layer(x)
        if isinstance(drop, InputDropout):
            h, scope = drop.recomputable(x)
        else:
            h, scope = drop(x), contextlib.nullcontext()
        with scope:  # the dropped input is kept for the backward as its seed
            return self._adapted(x, h, out)

    def _projects_first(self, x: torch.Tensor) -> bool:
        """Whether the update starts with ``dropout(x) · Aᵀ`` and needs nothing else of the
        dropped input: a plain LoRA, or dense experts whose router does not look at their
        outputs, in the adapters' dtype or under autocast."""
        router = self.router
        if router is not None and (
            getattr(router, "observe_update", None) is not None
            or not isinstance(self._dispatcher(), DenseDispatcher)
        ):
            return False
        return x.dtype == self.adapter_dtype or torch.is_autocast_enabled(x.device.type)

    def _base_into_update(self, x: torch.Tensor) -> bool:
        """Whether the base layer's product is computed here (:meth:`_base_product`) and the
        update accumulated into it in place (see :meth:`_adapted`), instead of into a copy of
        the base module's output: a plain ``nn.Linear`` with no hooks (ZeRO-3's gathering
        hooks, a user's) and a weight ZeRO-3 does not partition, outside autocast, everything
        in one dtype. (A partitioned weight is released after the forward and gathered again
        for the backward: ZeRO-3's own ``F.linear`` keeps the parameter for it, where the
        product here would keep a view of the gathered weight alive until the backward.)"""
        base = self.base_layer
        return (
            type(base) is nn.Linear
            and not _has_hooks(base)
            and not hasattr(base.weight, "ds_id")
            and not torch.is_autocast_enabled(x.device.type)
            and x.dtype == base.weight.dtype == self.lora_B.dtype
        )

    def _base_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b`` of the plain base linear as a 2-D tensor of this block's own (see
        :meth:`_base_into_update`)."""
        base = self.base_layer
        return scaled_mm(x.reshape(-1, x.shape[-1]), base.weight.t(), 1.0, base.bias)

    def _adapted(
        self,
        x: torch.Tensor,
        h: torch.Tensor | None,
        out: torch.Tensor,
        projected: torch.Tensor | None = None,
        own_out: bool = False,
    ) -> torch.Tensor:
        """The adapted output from the dropped input ``h``, or from ``projected`` = ``s · h · Aᵀ``
        already computed, scaling included (see :meth:`_projects_first`). ``out``: the base
        layer's output; with ``own_out``, the 2-D product of :meth:`_base_product`, into which
        the update is accumulated in place."""
        if h is not None and not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.adapter_dtype)
        router = self.router
        if router is None:  # a single plain LoRA
            h = F.linear(h, self.lora_A) if projected is None else projected
        else:
            gates = router.gates(x)  # (B, T, E) or (B, 1, E), fp32
            dispatcher = self._dispatcher()
            if projected is not None:  # dense, no observer (_projects_first)
                h = dispatcher.gate(self, projected, gates)
            else:
                observe = getattr(router, "observe_update", None)
                if observe is not None:  # a router that looks at its experts' outputs (HiMoLE)
                    observe(x, gates, lambda g: dispatcher.delta(self, h, x, g))
                if not isinstance(dispatcher, DenseDispatcher):
                    delta = dispatcher.delta(self, h, x, gates)
                    return out + delta.view(*out.shape[:-1], -1).to(out.dtype)
                h = dispatcher.hidden(self, h, gates)
        # out + s · h Bᵀ as ONE GEMM with the residual add and the scaling fused in (addmm's
        # beta/alpha): no separate (N, O) multiply and add, the widest tensors of the block.
        # (A projected h carries s already: alpha = 1, which addmm's backward does not multiply.)
        scaling = 1.0 if projected is not None else self.scaling
        if own_out:
            # u = x Wᵀ + b, then u += s · h Bᵀ in place (GEMM beta = 1), where the update added
            # into the base module's output first copies that output (addmm's beta): a write
            # and a read of the widest tensor less per adapted linear. u is this block's own
            # tensor (never a module's output) and no node keeps it, so the in-place product
            # is safe for autograd.
            out.addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.t(), alpha=scaling)
            return out.view(*x.shape[:-1], self.out_features)
        if not torch.is_autocast_enabled(x.device.type) and out.dtype != h.dtype:
            return out + (F.linear(h, self.lora_B) * scaling).to(out.dtype)  # fp32 LoRA
        out2d = out.reshape(-1, self.out_features)
        fused = torch.addmm(out2d, h.reshape(-1, h.shape[-1]), self.lora_B.t(), alpha=scaling)
        return fused.view(out.shape)


class MoRALinear(ExpertBankForward, nn.Module):
    """An adapted ``nn.Linear``: the original module is kept and called, never copied.

    Args:
        base: the frozen original linear (under ZeRO-3 its weight is a partitioned parameter,
            so sizes come from ``in_features`` / ``out_features``).
        rank: LoRA rank R.
        alpha: ``lora_alpha``; scaling ``alpha / R`` (``alpha / sqrt(R)`` with ``rslora``).
        dropout: dropout on the experts' input.
        num_experts: E (1 with ``router=None`` = plain LoRA).
        hydra: share one ``A`` across the experts.
        router: the router group of this layer's input, or None for a single LoRA.
        compute: ``auto`` | ``dense`` | ``sparse`` (top-k mixtures only; see the module doc).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        rslora: bool = False,
        dropout: float = 0.0,
        num_experts: int = 1,
        hydra: bool = False,
        router: nn.Module | None = None,
        compute: str = "auto",
    ) -> None:
        super().__init__()
        if router is None and num_experts != 1:
            raise ValueError("MoRALinear: a mixture of experts (num_experts > 1) needs a router")
        self.base_layer = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.num_experts = num_experts
        self.hydra = hydra and num_experts > 1
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = InputDropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        a_rows = rank if (self.hydra or num_experts == 1) else num_experts * rank
        # Adapters are fp32 whatever the base dtype (bf16 autocast computes in bf16).
        self.lora_A = nn.Parameter(torch.empty(a_rows, self.in_features, device=device))
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, num_experts * rank, device=device)
        )
        # Routers are owned by the wrapper model (one group can serve q, k and v); keep a
        # reference outside the module tree so their parameters are registered once.
        self._router = (router,)
        self.compute = compute
        #: Overrides the automatic dense/sparse choice (see :func:`use_dispatcher`).
        self.dispatcher: Dispatcher | None = None
        self.reset_parameters()

    @property
    def router(self) -> nn.Module | None:
        return self._router[0]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (for code that inspects ``module.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def reset_parameters(self) -> None:
        """A: Kaiming-uniform per expert like PEFT (bound 1/sqrt(I)); B = 0 so Z = base(X)."""
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def sparse(self) -> bool:
        """Whether this block computes only the routed experts (gates with structural zeros)."""
        router = self.router
        if router is None or not router.sparse_gates or self.compute == "dense":
            return False
        return self.compute == "sparse" or prefer_sparse(
            self.num_experts, router.top_k, self.rank, self.in_features
        )

    def _dispatcher(self) -> Dispatcher:
        if self.dispatcher is not None:
            return self.dispatcher
        return _SPARSE if self.sparse else _DENSE

    def extra_repr(self) -> str:
        kind = "lora" if self.router is None else ("hydra" if self.hydra else "mora")
        return (
            f"{kind}, in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"experts={self.num_experts}, scaling={self.scaling:g}"
            + (", sparse" if self.sparse else "")
        )


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs any hook (its own or a global one), which a computation
    that uses its weights without calling it would skip."""
    from torch.nn.modules import module as m

    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
           module._backward_pre_hooks)  # fmt: skip
    glob = (m._global_forward_hooks, m._global_forward_pre_hooks, m._global_backward_hooks,
            m._global_backward_pre_hooks)  # fmt: skip
    return any(own) or any(glob)


_DENSE, _SPARSE = DenseDispatcher(), SparseDispatcher()

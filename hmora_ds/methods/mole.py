"""MoLE: a learned, layer-wise composition of frozen trained LoRAs.

Paper: Wu, Huang and Wei, "Mixture of LoRA Experts" (ICLR 2024). Official code: the adapted
linear ``tools/peft/tuners/lora.py`` (``Linear``, lines 811–917), the gate in the encoder layer
of ``tools/transformers_mole/src/transformersmole/models/clip/modeling_clip.py`` (lines 49–53,
373–407) and the training loop ``dreambooth/train_mixture_of_experts.py`` (lines 559–566,
594–600). What this file decides, and where it comes from:

- experts: the N LoRAs of a library (``options.library``; ``options.tasks`` selects them), each
  trained on its own task, frozen (:func:`~hmora_ds.methods.freeze_bank_tensors`: they are
  saved with the adapter but never train). Every site a LoRA adapts carries the N of them as
  one bank, ``o = W₀x + s Σ_i G_i · B_i A_i x``, dense (every LoRA weighted by its gate);
- gates: one gating function per decoder layer (the paper's layer-wise MoLE; the official
  code's one ``wg`` per encoder layer, shared by its adapted projections), per token,
  ``G = softmax(W_g normalize(u) / τ)`` with a learnable temperature τ per gate, clamped to
  ``[temperature_min, temperature_max]`` (the code clamps it to [1, 3] after every step) and
  ``W_g`` bias-free, each expert's row initialised to norm 0.01 (the code's
  ``normalized_columns_initializer``); ``u`` the block's input after its input norm
  (``options.gate_input=block``, the code's ``layer_norm1`` output) or, with ``site``, each
  adapted linear's own input (one gate per adapted linear then: the paper's matrix-wise MoLE);
- loss: the gating balance loss ``L_balance = −Σ_i log q_i``, q_i the mean gate value of LoRA i
  over every gate and real token of the (global) batch (the paper's eq. with q^(i) averaged
  over the M gating functions), with its gradient, weighted by ``options.balance_weight`` (the
  paper's α = 0.5). The official code computes its entropy loss from ``.data`` (no gradient).

docs/methods.md ("MoLE") lists every difference from the paper and the official code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hmora_ds import losses
from hmora_ds.base_model import decoder_layers
from hmora_ds.config import TARGETS
from hmora_ds.experts import DispatchPlan
from hmora_ds.methods.base import Method, freeze_bank_tensors, register_method
from hmora_ds.routing.context import RouterId, RoutingRecord

#: The record kind of the gates (the routing statistics read it like token routers').
GATE_KIND = "token"
#: The loss kind of the gating balance loss.
BALANCE_KIND = "balance"


@dataclass
class MoLEOptions:
    """MoLE's settings (``options.<field>=…``).

    Attributes:
        library: the LoRA library's directory (required; ``python -m hmora_ds.library build``).
        tasks: the library's tasks to compose, in expert order (empty: every entry). A saved
            adapter records the tasks it was built from.
        gate_input: ``block`` (one gate per decoder layer on the block's normalised input, as
            the official code) or ``site`` (one gate per adapted linear on its own input).
        temperature_init: τ at initialisation (the official code: 1).
        temperature_min: the lower bound τ is clamped to (the official code: 1; > 0).
        temperature_max: the upper bound (the official code: 3).
        balance_weight: α of the gating balance loss (the paper: 0.5; 0 turns it off).
    """

    library: str | None = None
    tasks: list[str] = field(default_factory=list)
    gate_input: Literal["block", "site"] = "block"
    temperature_init: float = 1.0
    temperature_min: float = 1.0
    temperature_max: float = 3.0
    balance_weight: float = 0.5


def init_rows(weight: torch.Tensor, norm: float, generator: torch.Generator | None = None) -> None:
    """Each row (an expert's gate weights) Gaussian, rescaled to L2 norm ``norm`` (the official
    code's ``normalized_columns_initializer`` with std 0.01)."""
    if weight.device.type == "meta":
        return
    w = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
    w *= norm / w.pow(2).sum(1, keepdim=True).sqrt()
    with torch.no_grad():
        weight.copy_(w)


def gate_probs(
    logits: torch.Tensor, temperature: torch.Tensor | None, lo: float, hi: float | None
) -> torch.Tensor:
    """``softmax(logits / τ)`` over the last dim in fp32 at least, τ clamped to [lo, hi]."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature is not None:
        t = temperature.to(logits.dtype)
        # The clamped value, with the gradient passed straight through: a τ pushed outside the
        # interval acts as its bound and can come back (the official code clamps the value
        # after every optimizer step, which leaves the gradient at the bound intact too).
        t = t + (t.clamp(min=lo, max=hi) - t).detach()
        logits = logits / t
    return torch.softmax(logits, dim=-1)


def balance_loss(records: list[RoutingRecord], *, group: Any = None) -> torch.Tensor | None:
    """``L_balance = −Σ_i log q_i`` over every gate's records (probs (B, T, N), mask (B, T)).

    q_i: the mean of G_i over every gate and real token of the global batch (one differentiable
    all-reduce of the sums and the count over ``group``), so N ranks equal one process holding
    the concatenated batch. Its minimum, N log N, is every LoRA weighted 1/N on average.
    """
    if not records:
        return None
    sums, count = None, None
    for rec in records:
        p = rec.probs.to(torch.promote_types(rec.probs.dtype, torch.float32))
        m = (torch.ones(p.shape[:-1], dtype=p.dtype, device=p.device) if rec.mask is None
             else rec.mask.to(p.dtype))  # fmt: skip
        s = torch.einsum("btn,bt->n", p, m)
        c = m.sum().detach().reshape(1)
        sums, count = (s, c) if sums is None else (sums + s, count + c)
    total = losses._all_reduce(torch.cat([sums, count]), group)
    q = total[:-1] / total[-1].detach().clamp_min(1.0)
    return -q.clamp_min(torch.finfo(q.dtype).tiny).log().sum()


class LayerGate(nn.Module):
    """A dense gate over a site's N library experts: ``softmax(W normalize(u) / τ)`` per token.

    ``block=True``: ``u`` is the block's input after its input norm, captured by a forward hook
    on the decoder layer's ``input_layernorm`` (:meth:`capture`) and shared by every adapted
    linear of the layer (computed once per capture). ``block=False``: ``u`` is the adapted
    linear's own input. ``temperature_init=None``: no temperature (a plain softmax).
    Subclasses may change the gates (:meth:`select`) and observe the logits (:meth:`observe`).
    """

    top_k = None  # every expert has a gate (dense)
    sparse_gates = False

    def __init__(
        self, rid: RouterId, in_features: int, num_experts: int, context: Any, *,
        block: bool, temperature_init: float | None = 1.0, temperature_min: float = 1.0,
        temperature_max: float | None = 3.0, bias: bool = False, row_norm: float | None = 0.01,
    ) -> None:  # fmt: skip
        super().__init__()
        self.rid, self.layer, self.targets = rid, rid.layer, rid.targets
        self.block = block
        self.linear = nn.Linear(in_features, num_experts, bias=bias)
        if row_norm is not None:
            init_rows(self.linear.weight, row_norm)
        self.temperature = (
            None if temperature_init is None else nn.Parameter(torch.tensor([temperature_init]))
        )
        self.t_min, self.t_max = temperature_min, temperature_max
        self.num_experts = num_experts
        self._ctx = context
        self._slot = context.slot()  # this router's records (see routing.context)
        self._input: torch.Tensor | None = None
        self._memo: torch.Tensor | None = None
        self.shared = False

    def new_round(self, *_: object) -> None:
        """Nothing to forget per parent call: a block gate is recomputed per :meth:`capture`."""

    def capture(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        """Forward hook of the decoder layer's input norm: the block's gate input (kept until
        its gates are computed, so no layer's input outlives its forward)."""
        self._input = output
        self._memo = None

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        if not self.block:
            return self(x)
        u = self._input
        if u is None:
            memo = self._memo
            if memo is not None and memo.shape[:-1] == x.shape[:-1]:
                return memo
            raise RuntimeError(
                f"{self.rid}: no block input of the current forward was captured (is the "
                "decoder layer's input_layernorm hook registered?)"
            )
        if u.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(f"{self.rid}: block input {tuple(u.shape)} vs site {tuple(x.shape)}")
        self._memo = self(u)
        self._input = None
        return self._memo

    def dispatch(self, gates: torch.Tensor, num_tokens_per_row: int) -> DispatchPlan:
        return DispatchPlan.build(gates, None, num_tokens_per_row)

    def logits(self, u: torch.Tensor) -> torch.Tensor:
        """``W normalize(u)`` in the gate's dtype (u may be the base's bf16 hidden states)."""
        return self.linear(F.normalize(u.to(self.linear.weight.dtype), dim=-1))

    def observe(self, u: torch.Tensor, logits: torch.Tensor) -> None:
        """A subclass's view of the logits (Mixture-of-LoRAs: its routing loss)."""

    def select(self, probs: torch.Tensor) -> torch.Tensor:
        """The gates applied to the experts, from the probabilities (MoLE: themselves)."""
        return probs

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        logits = self.logits(u)
        self.observe(u, logits)
        probs = gate_probs(logits, self.temperature, self.t_min, self.t_max)
        self._ctx.record(self.rid, probs, self._ctx.token_mask_for(u), self._slot)
        return self.select(probs)


def register_block_inputs(model: nn.Module) -> None:
    """Hook every block gate of ``model.routers`` to its decoder layer's ``input_layernorm``."""
    layers = decoder_layers(model.base_model)
    for gate in model.routers.values():
        if isinstance(gate, LayerGate) and gate.block:
            layers[gate.layer].input_layernorm.register_forward_hook(gate.capture)


class LibraryMethod(Method):
    """What MoLE and Mixture-of-LoRAs share: a library's LoRAs as the experts of every site
    they adapt (the wrapper model reads the library, see :attr:`Method.library_experts`),
    dense soft gates, no task encoder, no expert parallelism (every token uses every expert)."""

    def validate(self) -> None:
        c = self.config
        self.require("routing.mode", c.routing.mode == "soft",
                     f"must be soft: {self.name} weights every library LoRA by its gate "
                     "(expert parallelism, which needs top-k, is refused with it)")  # fmt: skip
        self.require("routing.task_encoder", c.routing.task_encoder == "none",
                     f"must be none: {self.name} gates tokens only")  # fmt: skip
        self.require("adapter.hydra", not c.adapter.hydra,
                     "must be false: each library LoRA has its own A")  # fmt: skip
        self.require("loss.aux", c.loss.aux == "none",
                     f"must be none: {self.name} has its own auxiliary loss")  # fmt: skip

    @property
    def block_gates(self) -> bool:
        return True

    def router_groups(self, layer: int) -> list[tuple[str, ...]]:
        routed = [t for t in TARGETS if (self.experts_at(layer, t) or 0) > 1]
        if self.block_gates:
            return [tuple(routed)] if routed else []
        return [(t,) for t in routed]

    def gate_features(self, in_features: int) -> int:
        """A block gate reads the hidden state; a site gate its linear's input."""
        return self.hidden_size if self.block_gates else in_features

    def build_modules(self, model: nn.Module, tokenizer: Any, task_token_id: int | None) -> None:
        register_block_inputs(model)

    @property
    def stats_top_k(self) -> int | None:
        return None

    def component_of(self, name: str) -> str:
        # The gates are the routers (``train.router_lr_mult`` scales their lr as others').
        return "token routers" if name.startswith("routers.") else super().component_of(name)


@register_method
class MoLE(LibraryMethod):
    name = "mole"
    preset = "mole"
    presets = {"mole": "MoLE"}  # noqa: RUF012
    order = 90
    options_class = MoLEOptions
    library_experts = "frozen"
    components = ("token routers", "base model")

    def validate(self) -> None:
        super().validate()
        o = self.options
        self.require("options.temperature_min", o.temperature_min > 0,
                     f"must be > 0, got {o.temperature_min}")  # fmt: skip
        self.require("options.temperature_max", o.temperature_max >= o.temperature_min,
                     f"must be >= options.temperature_min ({o.temperature_min}), got "
                     f"{o.temperature_max}")  # fmt: skip
        self.require("options.temperature_init",
                     o.temperature_min <= o.temperature_init <= o.temperature_max,
                     f"must lie in [temperature_min, temperature_max] = [{o.temperature_min}, "
                     f"{o.temperature_max}], got {o.temperature_init}")  # fmt: skip
        self.require("options.balance_weight", o.balance_weight >= 0,
                     f"must be >= 0, got {o.balance_weight}")  # fmt: skip

    @property
    def block_gates(self) -> bool:
        return self.options.gate_input == "block"

    def build_router(
        self, model: nn.Module, layer: int, targets: tuple[str, ...], in_features: int,
        num_experts: int,
    ) -> nn.Module:  # fmt: skip
        o = self.options
        return LayerGate(
            RouterId(layer, targets, GATE_KIND), self.gate_features(in_features), num_experts,
            model.routing_context, block=self.block_gates, temperature_init=o.temperature_init,
            temperature_min=o.temperature_min, temperature_max=o.temperature_max,
        )  # fmt: skip

    def build_modules(self, model: nn.Module, tokenizer: Any, task_token_id: int | None) -> None:
        super().build_modules(model, tokenizer, task_token_id)
        for bank in model.adapted_modules().values():
            freeze_bank_tensors(bank)  # the library's LoRAs: part of the adapter, never trained

    def aux_losses(self, records: list[RoutingRecord], group: Any) -> dict[str, torch.Tensor]:
        """``balance``: L_balance over every gate of the forward (none with weight 0)."""
        if self.options.balance_weight <= 0:
            return {}
        loss = balance_loss([r for r in records if r.kind == GATE_KIND], group=group)
        return {} if loss is None else {BALANCE_KIND: loss}

    def aux_weight(self, kind: str) -> float:
        return self.options.balance_weight

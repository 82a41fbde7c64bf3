"""Regional ``torch.compile`` of an adapted model (``train.compile``).

``blocks`` compiles each decoder layer's adapted sub-blocks (attention and MLP: the modules that
hold the adapted linears and the pre-call hook of their shared router); ``layers`` compiles
whole decoder layers (norms, attention, MLP, residuals). Each region is compiled once and reused
by every layer of the same shape, as torchtitan compiles per transformer block: compile time stays
that of one layer, not of the model, and the embedding, LM head, losses and the task encoder stay
eager.

The routing code compiles as one graph (``fullgraph=True``): the routers, the hybrid mix, top-k,
the routing records and the dense dispatcher have no host syncs and no data-dependent Python
branches. Two things are dynamic by nature, and are marked so:

- the sparse dispatcher's slices (how many tokens each expert got) are data: its grouped GEMM is
  one custom op (``hmora_ds::sliced_mm``) whose output shape depends only on the input's;
- a variable number of experts per token (AdaMoLE's thresholds) uses ``nonzero``, whose output
  length is data: :func:`configure_dynamo` lets dynamo capture such ops
  (``capture_dynamic_output_shape_ops``) instead of breaking the graph there.

Sequence lengths vary from batch to batch; dynamo recompiles once and then treats them as dynamic
(its automatic dynamic shapes).

Under ZeRO-3 DeepSpeed gathers and releases parameters in hooks around every module call, which
dynamo cannot trace: a compiled layer would break into a graph per adapted linear and router,
each recompiled for every parameter shape, input and grad mode (about 200 compiles per rank on a
4-layer model, most steps of a short run spent compiling). So each decoder layer becomes a ZeRO-3
*leaf* (:func:`gather_layers_whole`): DeepSpeed gathers all of its parameters, and those of the
routers its adapted linears call, in one hook at the layer's entry. A compiled layer is then one
graph between its own entry and exit hooks, which run eagerly (:func:`leave_hooks_eager`), and
compiled blocks run no hook at all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from hmora_ds.base_model import decoder_layers
from hmora_ds.experts import MoRALinear

logger = logging.getLogger(__name__)

COMPILE_MODES = ("none", "blocks", "layers")
RECOMPILE_LIMIT = 64


def configure_dynamo() -> None:
    """Let dynamo capture data-dependent output shapes (``nonzero``) and scalars (``.item()``
    inside custom ops' fake implementations) instead of breaking the graph."""
    import torch._dynamo

    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True
    # With gradient checkpointing the checkpoint is inside the compiled layer: the routers'
    # records are a forward side effect that the recomputation must not repeat (as in eager,
    # where the routing context stops recording after the forward).
    # (A torch older than the pinned one may lack this switch: then checkpointing inside a
    # compiled layer is what breaks, not compilation itself.)
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    # One compiled variant per distinct layer structure (HMoRA's token / hybrid / task layers,
    # MoLA's expert counts), × the first layer (whose input needs no gradient) × static and
    # dynamic sequence length: more than dynamo's default limit of 8 per code object, and
    # every layer shares one code object (``nn.Module._call_impl``).
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
    )
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT
    )


def compile_regions(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules each mode compiles: ``layers`` the decoder layers, ``blocks`` the children
    of each decoder layer that hold an adapted linear (attention, MLP)."""
    base = getattr(model, "base_model", model)
    layers = list(decoder_layers(base))
    blocks = [
        child
        for layer in layers
        for child in layer.children()
        if any(isinstance(m, MoRALinear) for m in child.modules())
    ]
    return {"layers": layers, "blocks": blocks}


def compile_model(
    model: nn.Module,
    mode: str,
    *,
    fullgraph: bool = True,
    backend: str = "inductor",
    compile_mode: str | None = None,
) -> int:
    """Compile ``model``'s regions in place (``nn.Module.compile``: parameter names, state
    dicts and checkpoints are unchanged). Returns the number of compiled modules.
    ``compile_mode`` is ``torch.compile``'s ``mode`` (the step benchmark tries
    ``reduce-overhead``, CUDA graphs).

    Raises:
        ValueError: an unknown ``mode``, or ``blocks`` on a model with no adapted linear.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile: must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "none":
        return 0
    configure_dynamo()
    regions = compile_regions(model)[mode]
    if not regions:
        raise ValueError(
            "train.compile=blocks: the model has no adapted linear to compile; "
            "use train.compile=layers (a full fine-tune) or none"
        )
    for module in regions:
        module.compile(fullgraph=fullgraph, backend=backend, mode=compile_mode)
    logger.info(
        "torch.compile: %d %s (backend %s, fullgraph %s); the first steps compile them",
        len(regions),
        mode,
        backend,
        fullgraph,
    )
    return len(regions)


def gather_layers_whole(model: nn.Module) -> list[nn.Module]:
    """Under ZeRO-3 with ``train.compile``, make each decoder layer gather its parameters at
    once, so that no DeepSpeed hook runs inside a compiled layer or block; call before
    ``deepspeed.initialize``. Returns the router modules the layers now gather, whose own
    DeepSpeed hooks :func:`leave_hooks_eager` then removes.

    - Each decoder layer is a ZeRO-3 leaf module (``set_z3_leaf_module``): DeepSpeed hooks the
      layer and none of its submodules, and gathers every parameter under it at its entry.
    - The routers live outside the decoder layers (``model.routers``) and are called from the
      adapted linears inside them: their parameters are registered as the calling layer's
      external parameters (``register_external_parameter``), gathered and released with it. A
      router also called from outside the layers keeps its own hooks.
    - DeepSpeed reduces a leaf's gradients in a full backward hook on the module, which fires
      when the gradient of the module's positional inputs is ready, or, if none requires a
      gradient, when that of its outputs is: before its parameters' gradients exist. So a
      layer's hidden states that require no gradient (the first layer's, from the frozen
      embedding) enter it as a leaf that requires one (:func:`_hidden_states_require_grad`),
      as transformers' ``enable_input_require_grads`` does for gradient checkpointing, but
      for the decoder only (the task encoder reads the same embeddings). That gradient costs
      the first layer's input-gradient products, about 1 / layers of the backward's. (The
      attention block is called with keyword inputs only: the layer, not the block, is the
      unit gathered under ``blocks`` too.)
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    from deepspeed.utils import set_z3_leaf_module

    layers = compile_regions(model)["layers"]
    inside: dict[int, nn.Module] = {}
    banks_inside: set[int] = set()
    for layer in layers:
        set_z3_leaf_module(layer, True)
        layer.register_forward_pre_hook(_hidden_states_require_grad)
        banks = _banks(layer)
        banks_inside.update(id(b) for b in banks)
        routers = {id(b.router): b.router for b in banks if b.router is not None}
        for router in routers.values():
            for param in router.parameters():
                register_external_parameter(layer, param)
        inside.update(routers)
    called_outside = {
        id(b.router) for b in _banks(model) if b.router is not None and id(b) not in banks_inside
    }
    return [router for key, router in inside.items() if key not in called_outside]


def _banks(module: nn.Module) -> list[MoRALinear]:
    return [m for m in module.modules() if isinstance(m, MoRALinear)]


@torch.compiler.disable
def _hidden_states_require_grad(module: nn.Module, args: tuple) -> tuple | None:
    """A decoder layer's pre-hook under ZeRO-3 gathering (:func:`gather_layers_whole`): in
    training, hidden states that require no gradient are replaced by a detached leaf that
    does (they have no graph to lose). Eager, beside DeepSpeed's own entry hooks: traced, it
    would be one more compiled frame per variant of its input."""
    if not torch.is_grad_enabled():
        return None
    if not args or not torch.is_tensor(args[0]):
        raise RuntimeError(
            f"train.compile under ZeRO-3: {type(module).__name__} was called in training "
            "without its hidden states as the first positional input, so DeepSpeed would "
            "reduce its gradients before they exist; use train.compile=none with this model"
        )
    if args[0].requires_grad:
        return None
    return (args[0].detach().requires_grad_(True), *args[1:])


def leave_hooks_eager(
    model: nn.Module, package: str = "deepspeed", gathered: Sequence[nn.Module] = ()
) -> int:
    """Run the module hooks that ``package`` registered on ``model`` eagerly inside compiled
    regions (``torch.compiler.disable``); returns how many were wrapped. The hooks of the
    modules in ``gathered`` and their submodules (routers whose parameters their calling layer
    gathers, see :func:`gather_layers_whole`) are removed instead.

    DeepSpeed marks only some of its ZeRO-3 hooks disabled. Dynamo traces the others (the
    post-forward release, the pre-backward hook), whose guards on the module they were called
    for fail for every other module: each hook was compiled again per module, up to the
    recompile limit (64 × per hook and rank, most of a small run's time), only to break the
    graph where it calls into DeepSpeed anyway. The hooks are looked up at call time, so
    wrapping them in place after ``deepspeed.initialize`` takes effect in the compiled regions.
    """
    removed = {id(m) for module in gathered for m in module.modules()}
    wrapped = 0
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, fn in list(hooks.items()):
                if (getattr(fn, "__module__", None) or "").partition(".")[0] != package:
                    continue
                if id(module) in removed:
                    del hooks[key]
                    continue
                if getattr(fn, "_hmora_eager", False):
                    continue
                eager = torch.compiler.disable(fn)
                eager._hmora_eager = True
                hooks[key] = eager
                wrapped += 1
    return wrapped

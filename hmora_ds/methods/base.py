"""The method interface: what a LoRA-mixture method decides, and the registry of methods.

A method is one class, in one file, registered with :func:`register_method`. The wrapper model
(:class:`hmora_ds.model.HMoRAModel`) owns everything that is the same for every method — the
frozen base, injection into its dense layers, the expert banks and their dispatchers
(:mod:`hmora_ds.experts`), the routing context, the LM loss, generation — and asks the method:

============================  ==================================================================
``validate``                  check the config's sections for this method (one-line errors
                              naming the dotted field) and parse ``options`` into
                              :attr:`Method.options_class`
``experts_at(layer, target)`` how many experts sit at a site: None (no adapter), 1 (a plain
                              LoRA, no router) or E ≥ 2 (a routed bank; E may differ per layer)
``router_groups(layer)``      which routed targets of a layer share one router (one input)
``build_router``              the module that turns a site's input into gates (B, T|1, E), with
                              zeros for unused experts (any number per token)
``build_modules``             extra trainable modules on the model (e.g. a task encoder)
``routing_inputs``            what the routers route on, from the batch (:class:`RoutingBatch`:
                              embeddings, masks, the ``batch_inputs`` it asks for), bound in the
                              routing context for the forward (HMoRA: the task representation)
``aux_losses``                auxiliary losses, pure functions of the forward's routing records
                              (+ the data-parallel group), by kind; ``aux_weight(kind)`` is λ
``component_of(name)``        which component a trainable parameter belongs to (TP report)
============================  ==================================================================

The objective ``L = L_LM + Σ_k λ_k · L_aux,k`` is formed in one place,
:func:`hmora_ds.losses.total_loss`, for training, evaluation and the model's own forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from hmora_ds.config import (
    SHARED_GROUPS,
    TARGETS,
    HMoRAConfig,
    _fail,
    check_sections,
    check_types,
    load_config,
)
from hmora_ds.routing.context import RoutingRecord

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a :class:`Method` subclass under ``cls.name`` (usable as a class decorator).

    Raises:
        ValueError: the class has no name, or another class is registered under it.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or not (isinstance(cls, type) and
                                                      issubclass(cls, Method)):  # fmt: skip
        raise ValueError(f"register_method: {cls!r} must be a Method subclass with a name")
    other = _REGISTRY.get(name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(
            f"register_method: {name!r} is already {other.__module__}.{other.__name__}"
        )
    _REGISTRY[name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (ValueError listing the known ones)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"method: {name!r} is not a registered method; available: {available_methods()}"
        ) from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_presets() -> list[tuple[str, str, type[Method]]]:
    """``(preset, label, method class)`` of every registered method's shipped presets, in
    table order (:attr:`Method.order`, then name): what the step benchmark and the baselines
    study run, so a new method with a preset joins them by registering."""
    classes = sorted(_REGISTRY.values(), key=lambda c: (c.order, c.name))
    # A method's own presets only: a subclass does not re-list its parent's.
    return [
        (preset, label, cls)
        for cls in classes
        for preset, label in cls.__dict__.get("presets", {}).items()
    ]


def library_missing(config: HMoRAConfig) -> str | None:
    """Why ``config`` cannot build a model on its own: a method that composes a LoRA library
    (:attr:`Method.library_experts`) with no ``options.library`` (its shipped preset leaves
    it to the user). None when nothing is missing. Tools that run every preset (the step
    benchmark, the methods and baselines studies) skip such a preset with this reason."""
    cls = get_method(config.method)
    if cls.library_experts is None or config.options.get("library"):
        return None
    return (
        f"method {cls.name} composes the LoRAs of a library and its preset leaves "
        "method.options.library unset (build one with python -m hmora_ds.library build --out "
        "DIR, then set method.options.library=DIR)"
    )


def build_method(config: HMoRAConfig) -> Method:
    """The validated method object of a config."""
    return get_method(config.method)(config)


def import_plugins(specs: list[str]) -> None:
    """Import the modules that register methods of your own: dotted module names
    (``my_pkg.my_method``) or paths to ``.py`` files. Each is imported once per process.

    Raises:
        ValueError: a plug-in cannot be found or fails to import (naming it).
    """
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    for spec in specs:
        name = ""
        try:
            if spec.endswith(".py"):
                path = Path(spec).resolve()
                if not path.is_file():
                    raise FileNotFoundError(f"{path} does not exist")
                name = f"hmora_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
                if name in sys.modules:
                    continue
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except Exception as err:  # any failure of user code: one line naming the plug-in
            sys.modules.pop(name, None)
            msg = f"plugins: could not import {spec!r}: {type(err).__name__}: {err}"
            raise ValueError(msg) from None


#: The batch input that carries each sequence's cluster in a method's first training stage
#: (:meth:`Method.stage1_steps`).
CLUSTER_INPUT = "cluster"


@dataclass
class RoutingBatch:
    """What a method may route on, per forward (see :meth:`Method.routing_inputs`).

    Attributes:
        embeds: (B, T, D) input embeddings.
        attention_mask: (B, T) bool, real tokens.
        prompt_mask: (B, T) bool, the tokens the task encoder reads: the raw instruction's
            tokens or every prompt token, per ``routing.task_input`` (never the targets:
            routing must not see them).
        extras: the batch tensors the method asks for in :attr:`Method.batch_inputs`
            (e.g. domain labels), by name.
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class of methods; the defaults are those of a routed LoRA mixture.

    Subclasses set :attr:`name` and override what differs. ``self.config`` is the validated
    :class:`~hmora_ds.config.HMoRAConfig`; ``self.options`` the parsed method options.
    """

    name: ClassVar[str] = ""
    #: The preset with this method's published settings (its default configuration).
    preset: ClassVar[str | None] = None
    #: Every shipped preset of the method → its label in tables (paper layout); not inherited.
    presets: ClassVar[dict[str, str]] = {}
    #: Position in comparison tables (the HMoRA paper's table 3 order for the built-ins).
    order: ClassVar[int] = 100
    #: Extra per-batch tensors the method routes on (keyword arguments of the model's forward
    #: and ``generate``, e.g. ``("domain",)``), handed to :meth:`routing_inputs`.
    batch_inputs: ClassVar[tuple[str, ...]] = ()
    #: Per-batch tensors the method routes on when a batch carries them (keyword arguments of
    #: forward / ``generate`` that may be left out, e.g. HiMoLE's stage-1 ``cluster``); the
    #: routers read them with :meth:`~hmora_ds.routing.context.RoutingContext.batch_input`.
    optional_batch_inputs: ClassVar[tuple[str, ...]] = ()
    #: A dataclass of method-specific settings (``options.<field>=…``), or None.
    options_class: ClassVar[type | None] = None
    #: Display order of parameter components in the TP report.
    components: ClassVar[tuple[str, ...]] = ("lora A", "lora B", "token routers", "base model")
    #: Whether the method composes the LoRAs of a library (``options.library``, a directory
    #: built by ``python -m hmora_ds.library build``; ``options.tasks`` selects entries): the
    #: wrapper model reads it when it is built, takes the adapter's rank, alpha, targets and
    #: expert count from it, and loads task i's LoRA as expert i of every site it adapts.
    #: ``"frozen"``: the library's tensors stay fixed (they are saved with the adapter as
    #: :func:`frozen_adapter_tensors`); ``"trainable"``: they only initialise the experts.
    library_experts: ClassVar[str | None] = None

    def __init__(self, config: HMoRAConfig) -> None:
        self.config = config
        self.options = self._parse_options(config.options)
        check_sections(self.validate)  # every refused setting in one error

    # ------------------------------------------------------------------ configuration
    @classmethod
    def default_config(cls) -> HMoRAConfig:
        """The method's default configuration: its preset, else the shared defaults."""
        if cls.preset is not None:  # its own, or its parent's with this method named
            return load_config(cls.preset, {"method": cls.name})
        return HMoRAConfig(method=cls.name)

    def _parse_options(self, values: dict[str, Any]) -> Any:
        if self.options_class is None:
            if values:
                _fail(f"options.{sorted(values)[0]}", f"method {self.name} takes no options")
            return None
        valid = {f.name for f in dataclasses.fields(self.options_class)}
        unknown = sorted(set(values) - valid)
        if unknown:
            _fail(
                f"options.{unknown[0]}", f"unknown for method {self.name}; valid: {sorted(valid)}"
            )
        options = self.options_class(**values)
        check_types(options, "options")  # typed like every config section
        return options

    def validate(self) -> None:
        """Method-specific checks of the config (one-line ValueError naming the field)."""

    def require(self, field: str, ok: bool, msg: str) -> None:
        """Refuse a setting this method does not have (``method <name>: …`` in the message)."""
        if not ok:
            _fail(field, f"{msg} (method {self.name})")

    def bind(self, hidden_size: int, num_layers: int) -> None:
        """Learn the base model's shape (before injection): sets :attr:`hidden_size` and
        :attr:`num_layers` (per-layer decisions may depend on depth), then
        :meth:`validate_for_model`."""
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.validate_for_model(hidden_size, num_layers)

    def validate_for_model(self, hidden_size: int, num_layers: int) -> None:
        """Checks that need the base model's shape (one-line ValueError naming the field)."""

    # ------------------------------------------------------------------ structure
    @property
    def has_mixture(self) -> bool:
        """Whether any site carries a routed bank (and so routers and aux losses)."""
        return self.config.has_mixture

    #: The task encoder the model builds (``"transformer"``…), None without one.
    task_encoder_kind: str | None = None

    @property
    def trains_base(self) -> bool:
        return self.config.full_finetune

    def experts_at(self, layer: int, target: str) -> int | None:
        """Experts at a site: None = not adapted, 1 = plain LoRA (no router), E >= 2 routed."""
        a = self.config.adapter
        if target not in a.targets:
            return None
        return a.num_experts if target in a.mixture_targets else 1

    def router_groups(self, layer: int) -> list[tuple[str, ...]]:
        """The routed targets of a layer, grouped by shared router (``routing.share_routers``:
        q, k, v read one input, as do gate and up)."""
        routed = [t for t in TARGETS if (self.experts_at(layer, t) or 0) > 1]
        if not self.config.routing.share_routers:
            return [(t,) for t in routed]
        groups = [tuple(t for t in shared if t in routed) for shared in SHARED_GROUPS]
        groups = [g for g in groups if g]
        grouped = {t for g in groups for t in g}
        groups += [(t,) for t in routed if t not in grouped]
        return sorted(groups, key=lambda g: TARGETS.index(g[0]))

    def build_router(
        self, model: nn.Module, layer: int, targets: tuple[str, ...], in_features: int,
        num_experts: int,
    ) -> nn.Module:  # fmt: skip
        """The router module of one group (token routing by default)."""
        return self.router_group(model, layer, targets, in_features, num_experts)

    def router_group(
        self, model: nn.Module, layer: int, targets: tuple[str, ...], in_features: int,
        num_experts: int, layer_mode: str = "token", alpha: float = 0.0, learn_alpha: bool = False,
    ) -> nn.Module:  # fmt: skip
        """A :class:`~hmora_ds.routing.gates.RouterGroup` with the config's routing settings
        (soft or top-k, renormalisation, router dropout) in ``layer_mode``."""
        from hmora_ds.routing.gates import RouterGroup

        r = self.config.routing
        return RouterGroup(
            layer=layer,
            targets=targets,
            in_features=in_features,
            task_features=model.base_model.config.hidden_size,
            layer_mode=layer_mode,
            alpha=alpha,
            num_experts=num_experts,
            mode=r.mode,
            top_k=r.top_k,
            topk_renorm=r.topk_renorm,
            dropout=r.router_dropout,
            learn_alpha=learn_alpha,
            context=model.routing_context,
        )

    def build_modules(self, model: nn.Module, tokenizer: Any, task_token_id: int | None) -> None:
        """Attach extra trainable modules to ``model`` (none by default)."""

    def routing_inputs(self, model: nn.Module, batch: RoutingBatch) -> torch.Tensor | None:
        """The per-sequence input (B, …) bound in the routing context for every router of the
        forward (HMoRA: the task representation), or None."""
        return None

    # ------------------------------------------------------------------ training stages
    def stage1_steps(self, max_steps: int) -> int:
        """Optimizer steps of a first training stage in which each sequence trains only the
        expert group of its cluster (the trainer clusters the training prompts before the model
        is built and feeds each record's cluster as the batch input ``cluster``; HiMoLE).
        0 (the default): one stage."""
        return 0

    def lr_scale(self, step: int, max_steps: int) -> float:
        """Multiplier of the scheduled learning rate at optimizer step ``step`` (0-based) of
        ``max_steps`` (HiMoLE: ``stage2_lr_scale`` in stage 2). A pure function of the step, so
        a resumed run's schedule is the uninterrupted one's."""
        return 1.0

    def start_training(self, model: nn.Module) -> None:
        """Called once on the freshly initialised model of a training run that starts from
        scratch (never on ``--resume``, a loaded adapter or an export), before the optimizer
        is built (HiMoLE: each group's experts copied from one initial expert)."""

    # ------------------------------------------------------------------ losses
    @property
    def step_aux_kinds(self) -> frozenset[str]:
        """Record kinds whose auxiliary statistics cover the whole optimizer step (every
        micro-batch of every rank) instead of one micro-batch: the per-sequence ``task``
        routers with ``loss.task_stats=step`` (see :meth:`step_records`)."""
        return frozenset({"task"}) if self.config.loss.task_stats == "step" else frozenset()

    def step_records(self, model: nn.Module, batch: RoutingBatch) -> list[RoutingRecord]:
        """The per-sequence (``task``) router probabilities of the optimizer step's *other*
        micro-batches, ``batch`` (their prompts concatenated): the routing input computed once
        more (HMoRA: the task encoder over those prompts, as the official training loop does)
        and every task router applied to it. Token routers are not re-run."""
        routers = [g for g in model.routers.values() if getattr(g, "task_router", None)]
        if not routers:
            return []
        rep = self.routing_inputs(model, batch)
        if rep is None:
            return []
        return [RoutingRecord(g.task_id, g.task_router(rep), None) for g in routers]

    def aux_losses(self, records: list[RoutingRecord], group: Any) -> dict[str, torch.Tensor]:
        """Unweighted auxiliary losses by kind (``loss.aux``: cgjs, blc or none); routers of
        one kind and shape form one stack with one all-reduce (see losses). L_blc leaves the
        task routers out unless ``loss.blc_task_routers`` (the official code's choice)."""
        from hmora_ds.losses import stacked_cgjs_loss, stacked_load_balance_loss

        lc = self.config.loss
        out: dict[str, torch.Tensor] = {}
        if lc.aux == "none":
            return out
        if lc.aux == "blc" and not lc.blc_task_routers:
            records = [r for r in records if r.kind != "task"]
        for kind, probs, mask in stack_records(records):
            if lc.aux == "cgjs":
                values = stacked_cgjs_loss(
                    probs, mask, gamma_b=lc.gamma_b, gamma_c=lc.gamma_c, group=group
                )
            else:
                values = stacked_load_balance_loss(probs, self.config.routing.top_k, mask,
                                                   group=group)  # fmt: skip
            out[kind] = out[kind] + values.sum() if kind in out else values.sum()
        return out

    def aux_weight(self, kind: str) -> float:
        """λ of the auxiliary loss of ``kind`` in the objective."""
        return self.config.loss.aux_weight

    @property
    def stats_top_k(self) -> int | None:
        """The k of expert-load shares (None with soft routing: load = mean probability)."""
        r = self.config.routing
        return r.top_k if r.mode == "topk" else None

    # ------------------------------------------------------------------ parameters
    def component_of(self, name: str) -> str:
        """Which component a trainable parameter (wrapper-relative name) belongs to."""
        if name.endswith("lora_A"):
            return "lora A"
        if name.endswith("lora_B"):
            return "lora B"
        if ".token_router." in name:
            return "token routers"
        return "base model"


def stack_records(
    records: list[RoutingRecord],
) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Records of one kind, shape and mask stacked: ``[(kind, probs (R, N…, E), mask)]``."""
    stacks: dict[tuple, list[RoutingRecord]] = {}
    for rec in records:
        key = (rec.kind, tuple(rec.probs.shape), None if rec.mask is None else id(rec.mask))
        stacks.setdefault(key, []).append(rec)
    return [
        (kind, torch.stack([r.probs for r in recs]), recs[0].mask)
        for (kind, _, _), recs in stacks.items()
    ]


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable tensors of a model, by wrapper-relative name, each once.

    The one definition used by the TP report, optimizer groups, adapter export and loading,
    the expert-parallel split and checkpoint filtering: what trains is what the adapter holds.
    """
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


#: The names of an expert bank's tensors (``MoRALinear.lora_A`` / ``lora_B``).
BANK_TENSORS = ("lora_A", "lora_B")


def freeze_bank_tensors(bank: nn.Module) -> None:
    """Make a bank's ``lora_A`` / ``lora_B`` frozen adapter tensors: persistent buffers of the
    same name, shape, dtype and device (see :func:`frozen_adapter_tensors`)."""
    for name in BANK_TENSORS:
        tensor = getattr(bank, name).detach()
        delattr(bank, name)
        bank.register_buffer(name, tensor, persistent=True)


def frozen_adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors that do not train, by wrapper-relative name: expert banks'
    ``lora_A`` / ``lora_B`` held as buffers (:func:`freeze_bank_tensors`; MoLE's library
    experts). Empty for every method whose experts train.

    Part of the adapter (saved, exported and loaded with it, so an adapter never needs the
    files it was built from) but never of :func:`adapter_parameters`: the optimizer, the TP
    report and the checkpoint filter see trainable tensors only. As persistent buffers they
    are in the module's state, so a DeepSpeed checkpoint stores them and a resumed run gets
    them back (``exclude_frozen_parameters`` drops frozen *parameters* only).
    """
    return {n: b for n, b in model.named_buffers() if n.rpartition(".")[2] in BANK_TENSORS}

"""Validated configuration of an HMoRA adapter: experts, routing and auxiliary losses.

Every field maps to a symbol of ``shared/spec/method.md``. User errors raise ``ValueError``
naming the dotted field (``routing.top_k``) and what to do; ``assert`` is kept for internal
invariants only.

A config is loaded from a preset name, a YAML/JSON file or a dict, and refined with dotted
overrides (``routing.eps=2``), exactly like the command-line tools accept them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

#: The seven dense layers of a Qwen2 / LLaMA decoder layer that can carry adapters.
TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
#: Router-sharing groups (spec §6): q, k, v read one input, as do gate and up.
SHARED_GROUPS: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("gate", "up"))

PRESETS_DIR = Path(__file__).parent / "presets"


#: The errors of the validation in progress (see :func:`collect_errors`), or None: raise at once.
_COLLECTING: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "hmora_config_errors", default=None
)


def _fail(name: str, msg: str) -> None:
    """Report a bad field: raise, or record it while :func:`collect_errors` is active (the
    first message per field is kept)."""
    errors = _COLLECTING.get()
    if errors is None:
        raise ValueError(f"{name}: {msg}")
    errors.setdefault(name, f"{name}: {msg}")


@contextlib.contextmanager
def collect_errors() -> Iterator[None]:
    """Validate several fields and sections, then raise ONE ``ValueError`` listing every bad
    field (``a.b: …; c.d: …``), so a config with three mistakes needs one run to fix, not three.

    A section whose check stops on a value of the wrong type (a ``TypeError`` after its first
    error was recorded) is left there; the other sections are still checked.
    """
    if _COLLECTING.get() is not None:  # nested: the outermost one reports
        yield
        return
    errors: dict[str, str] = {}
    token = _COLLECTING.set(errors)
    try:
        yield
    finally:
        _COLLECTING.reset(token)
    if errors:
        raise ValueError("; ".join(errors.values()))


def check_sections(*checks: Any) -> None:
    """Run each check (a callable) under :func:`collect_errors`, one after the other; a check
    that raises ``ValueError`` itself (code that does not report through ``_fail``) adds its
    message and the next check still runs."""
    with collect_errors():
        errors = _COLLECTING.get()
        for check in checks:
            try:
                check()
            except ValueError as err:
                errors.setdefault(str(err), str(err))
            except TypeError:
                if not errors:  # a TypeError that does not follow a reported error: a bug
                    raise


#: Spellings of a boolean setting. YAML already reads true/false, yes/no and on/off (any case)
#: as booleans; 1 / 0 and those words given as strings (JSON, Python dicts) are accepted too.
#: Anything else (``gradient_checkpointing=abc``, ``2``) is an error, never "truthy".
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
              "false": False, "no": False, "off": False, "0": False}  # fmt: skip

_HINTS: dict[type, dict[str, Any]] = {}
_PLURAL = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (``{}`` when they cannot be resolved)."""
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except Exception:  # a plugin's annotation that does not resolve: left unchecked
            _HINTS[cls] = {}
    return _HINTS[cls]


def describe_type(tp: Any) -> str:
    """What a declared field type accepts, in words (for error messages)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        words = " or ".join(describe_type(a) for a in rest)
        return words + " or null" if len(rest) < len(args) else words
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length
            kinds = {_PLURAL.get(a, describe_type(a)) for a in args}
            return f"a list of {len(args)} {kinds.pop() if len(kinds) == 1 else 'values'}"
        return f"a list of {_PLURAL.get(args[0], 'values')}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any) -> tuple[bool, Any]:
    """``(ok, value converted to tp)`` for a declared field type (see :func:`check_types`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return True, value
    if origin is Literal:
        return value in args, value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, None
        for arg in args:
            if arg is not type(None):
                ok, converted = _convert(value, arg)
                if ok:
                    return True, converted
        return False, value
    if tp is bool:
        if isinstance(value, bool):
            return True, value
        key = str(value).strip().lower() if isinstance(value, (str, int)) else None
        return (True, BOOL_WORDS[key]) if key in BOOL_WORDS else (False, value)
    if isinstance(value, bool):  # a boolean is never a number or a string here
        return False, value
    if tp is int:
        if isinstance(value, int):
            return True, value
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                return False, value
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return True, int(number)
        return False, value
    if tp is float:
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value.strip())
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        if isinstance(value, str):
            return True, value
        return (True, str(value)) if isinstance(value, (int, float)) else (False, value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return False, value
            items = list(zip(value, args, strict=True))
        else:
            items = [(v, args[0] if args else Any) for v in value]
        converted = [_convert(v, a) for v, a in items]
        if not all(ok for ok, _ in converted):
            return False, value
        return True, origin(v for _, v in converted)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return True, value  # a type this check does not know: the section's own checks decide


def check_types(obj: Any, section: str) -> None:
    """Check every field of a config dataclass against its declared type, in place.

    Generic, from the dataclass annotations: a value of another type is reported as
    ``<section>.<field>: must be <what the type accepts>, got <value>`` (collected, see
    :func:`collect_errors`), and a convertible one is converted: numeric strings to numbers
    (YAML 1.1 reads ``5e-3`` as a string), an integral float to an integer, a list to a tuple,
    a number to a string, the spellings of :data:`BOOL_WORDS` to booleans. A NaN is refused
    everywhere. Nested sections (dataclass-typed fields) are checked by their own section.
    """
    hints = _field_types(type(obj))
    for f in fields(obj):
        name = f"{section}.{f.name}" if section else f.name
        value = getattr(obj, f.name)
        if isinstance(value, float) and math.isnan(value):
            _fail(name, "is NaN")
            continue
        tp = hints.get(f.name, Any)
        ok, converted = _convert(value, tp)
        if not ok:
            example = ""
            if typing.get_origin(tp) in (list, tuple):  # the default as an example (YAML)
                if f.default is not dataclasses.MISSING:
                    example = f" such as {json.dumps(list(f.default))}"
                elif f.default_factory is not dataclasses.MISSING and f.default_factory():
                    example = f" such as {json.dumps(list(f.default_factory()))}"
            got = list(value) if isinstance(value, tuple) else value
            _fail(name, f"must be {describe_type(tp)}{example}, got {got!r}")
        elif isinstance(converted, float) and math.isnan(converted):
            _fail(name, "is NaN")
        elif converted is not value:
            setattr(obj, f.name, converted)


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        _fail(name, f"must lie in [0, 1], got {value}")


@dataclass
class AdapterConfig:
    """The LoRA experts (spec §1, §6).

    Attributes:
        rank: LoRA rank ``r`` of every expert.
        alpha: LoRA ``lora_alpha``; the scaling is ``alpha / r`` (``alpha / sqrt(r)`` with rslora).
        rslora: rank-stabilised scaling (PEFT's ``use_rslora``).
        dropout: dropout on the experts' input, applied once per block.
        num_experts: experts ``e`` per MoRA block.
        targets: which dense layers get an adapter (subset of ``q k v o gate up down``).
        hydra: one shared ``A`` and ``e`` heads ``B_i`` (Hydra LoRA).
        single_lora_layers: targets that get one plain LoRA (no router) instead of a mixture.
        eta_b: LoRA+ learning-rate ratio for the ``B`` matrices (1 = plain LoRA).
        compute: how a top-k mixture is computed (same numbers either way): ``dense`` (all
            experts, two GEMMs), ``sparse`` (each expert only on the tokens routed to it,
            batched GEMMs over per-expert buckets) or ``auto`` (sparse where the benchmark
            shows it faster, see :func:`hmora_ds.experts.prefer_sparse`). Soft routing is dense.
    """

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.1
    num_experts: int = 8
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    hydra: bool = False
    single_lora_layers: list[str] = field(default_factory=list)
    eta_b: float = 1.0
    compute: Literal["auto", "dense", "sparse"] = "auto"

    def validate(self) -> None:
        check_types(self, "adapter")
        if self.compute not in ("auto", "dense", "sparse"):
            _fail("adapter.compute", f"must be auto, dense or sparse, got {self.compute!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            _fail("adapter.rank", f"must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            _fail("adapter.alpha", f"must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            _fail("adapter.dropout", f"must lie in [0, 1), got {self.dropout}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            _fail("adapter.num_experts", f"must be a positive integer, got {self.num_experts!r}")
        for key in ("targets", "single_lora_layers"):
            names = getattr(self, key)
            if isinstance(names, str) or not isinstance(names, list):
                _fail(f"adapter.{key}", f"must be a list of layer names, got {names!r}")
                continue
            unknown = [t for t in names if t not in TARGETS]
            if unknown:
                _fail(f"adapter.{key}", f"unknown layer(s) {unknown}; choose from {list(TARGETS)}")
            if len(set(names)) != len(names):
                _fail(f"adapter.{key}", f"lists a layer twice: {names}")
        lists = isinstance(self.targets, list) and isinstance(self.single_lora_layers, list)
        outside = [t for t in self.single_lora_layers if t not in self.targets] if lists else []
        if outside:
            _fail(
                "adapter.single_lora_layers",
                f"{outside} are not in adapter.targets {self.targets}; add them there or drop them",
            )
        if self.eta_b <= 0:
            _fail("adapter.eta_b", f"must be > 0, got {self.eta_b}")

    @property
    def mixture_targets(self) -> list[str]:
        """Targets carrying a routed mixture of experts (not single LoRA), in TARGETS order."""
        return [t for t in TARGETS if t in self.targets and t not in self.single_lora_layers]


@dataclass
class RoutingConfig:
    """Routers, the task encoder and hierarchical hybrid routing (spec §2–4).

    Attributes:
        mode: ``soft`` (eq. 14) or ``topk`` (eqs. 15–16).
        top_k: experts kept per decision with ``topk`` (also ``k`` of L_blc).
        topk_renorm: ``paper`` (softmax over the kept probabilities, eq. 15) or ``sum``.
        task_encoder: ``transformer`` | ``mean_pool`` | ``none`` (token routing only).
        encoder_layers: transformer layers of the task encoder.
        encoder_heads: attention heads of the task encoder (must divide the hidden size).
        encoder_ffn_mult: the task encoder's feed-forward width, as a multiple of the hidden size.
        encoder_dropout: dropout inside the task encoder.
        task_input: what the task encoder reads (spec §3): ``instruction`` (default, as the
            official HMoRA code: only the tokens of the raw instruction / source text inside
            the templated prompt, without the chat template's system and role wrapper) or
            ``prompt`` (every prompt token, wrapper included). Needs the collator's
            ``instruction_mask``; a caller that passes none falls back to the prompt tokens
            with a one-time warning. Adapters saved before this option existed load as
            ``prompt``.
        task_slot_position: add the sinusoidal position to the ``e_task`` slot too. ``false``
            (default, as the official code): only the input tokens get positions. ``true``
            (earlier behaviour): the slot gets the position of the input length, which at
            initialisation makes H_task mostly a code of the prompt length (see the
            "Task representation at init" section of docs/ablations.md). Adapters saved
            before this option existed load as ``true``.
        router_dropout: dropout on the router input, ``h(x) = Linear(dropout(x))``.
        eps, mu: α(l) = σ(−ε + 2ε·l/(L−1) + μ).
        beta_low, beta_high: α < β_low → token routing only; α > β_high → task routing only.
        learn_alpha: make α(l) of hybrid layers a trainable parameter.
        share_routers: one router for q, k, v and one for gate, up, computed once per layer.
    """

    mode: Literal["soft", "topk"] = "topk"
    top_k: int = 2
    topk_renorm: Literal["paper", "sum"] = "paper"
    task_encoder: Literal["transformer", "mean_pool", "none"] = "transformer"
    encoder_layers: int = 1
    encoder_heads: int = 16
    encoder_ffn_mult: float = 2.0
    encoder_dropout: float = 0.1
    task_input: Literal["instruction", "prompt"] = "instruction"
    task_slot_position: bool = False
    router_dropout: float = 0.1
    eps: float = 4.0
    mu: float = -2.0
    beta_low: float = 0.2
    beta_high: float = 0.8
    learn_alpha: bool = False
    share_routers: bool = False

    def validate(self) -> None:
        check_types(self, "routing")
        if self.mode not in ("soft", "topk"):
            _fail("routing.mode", f"must be 'soft' or 'topk', got {self.mode!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            _fail("routing.top_k", f"must be an integer >= 1, got {self.top_k!r}")
        if self.topk_renorm not in ("paper", "sum"):
            _fail("routing.topk_renorm", f"must be 'paper' or 'sum', got {self.topk_renorm!r}")
        if self.task_encoder not in ("transformer", "mean_pool", "none"):
            _fail(
                "routing.task_encoder",
                f"must be 'transformer', 'mean_pool' or 'none', got {self.task_encoder!r}",
            )
        if self.task_input not in ("instruction", "prompt"):
            _fail(
                "routing.task_input",
                f"must be 'instruction' or 'prompt', got {self.task_input!r}",
            )
        if not isinstance(self.task_slot_position, bool):
            _fail(
                "routing.task_slot_position",
                f"must be true or false, got {self.task_slot_position!r}",
            )
        if not isinstance(self.encoder_layers, int) or self.encoder_layers < 1:
            _fail("routing.encoder_layers", f"must be an integer >= 1, got {self.encoder_layers!r}")
        if not isinstance(self.encoder_heads, int) or self.encoder_heads < 1:
            _fail("routing.encoder_heads", f"must be an integer >= 1, got {self.encoder_heads!r}")
        if self.encoder_ffn_mult <= 0:
            _fail("routing.encoder_ffn_mult", f"must be > 0, got {self.encoder_ffn_mult}")
        for name in ("encoder_dropout", "router_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail(f"routing.{name}", f"must lie in [0, 1), got {getattr(self, name)}")
        _check_prob("routing.beta_low", self.beta_low)
        _check_prob("routing.beta_high", self.beta_high)
        if self.beta_low > self.beta_high:
            _fail(
                "routing.beta_low",
                f"({self.beta_low}) must not exceed routing.beta_high ({self.beta_high})",
            )


@dataclass
class LossConfig:
    """Language-model and auxiliary losses (spec §5).

    Attributes:
        aux: ``cgjs`` (L_aux, eq. 12), ``blc`` (load balancing, eqs. 17–19) or ``none``.
        gamma_b, gamma_c: CGJS balance and certainty bounds, 0 <= γ_c <= γ_b <= 1.
        aux_weight: λ in L = L_LM + λ Σ_R L_aux^(R).
        label_smoothing: label smoothing of the LM cross-entropy on target tokens.
        task_stats: the sequences a task router's auxiliary statistics (M, mean H) are taken
            over. ``step`` (the paper's): every sequence of the optimizer step, across
            gradient-accumulation micro-steps and data-parallel ranks, with the exact gradient
            of that global loss (the step's other prompts are encoded once more by the task
            encoder). ``micro``: each micro-batch's sequences (× ranks) only; with fewer
            sequences than experts the balance target H(M) = γ_b·log E is out of reach there.
            Token routers are always per micro-batch (their statistics already cover thousands
            of tokens, and a step-level version would keep every micro-step's activations).
        blc_task_routers: with ``aux=blc``, apply L_blc to the task routers too. Off by default,
            as in the official code, which balances token routers only.
    """

    aux: Literal["cgjs", "blc", "none"] = "cgjs"
    gamma_b: float = 1.0
    gamma_c: float = 0.4
    aux_weight: float = 0.003
    label_smoothing: float = 0.1
    task_stats: Literal["step", "micro"] = "step"
    blc_task_routers: bool = False

    def validate(self) -> None:
        check_types(self, "loss")
        if self.aux not in ("cgjs", "blc", "none"):
            _fail("loss.aux", f"must be 'cgjs', 'blc' or 'none', got {self.aux!r}")
        _check_prob("loss.gamma_b", self.gamma_b)
        _check_prob("loss.gamma_c", self.gamma_c)
        if self.gamma_c > self.gamma_b:
            _fail("loss.gamma_c", f"({self.gamma_c}) must not exceed loss.gamma_b ({self.gamma_b})")
        if self.aux_weight < 0:
            _fail("loss.aux_weight", f"must be >= 0, got {self.aux_weight}")
        if not 0.0 <= self.label_smoothing < 1.0:
            _fail("loss.label_smoothing", f"must lie in [0, 1), got {self.label_smoothing}")
        if self.task_stats not in ("step", "micro"):
            _fail("loss.task_stats", f"must be 'step' or 'micro', got {self.task_stats!r}")
        if not isinstance(self.blc_task_routers, bool):
            _fail("loss.blc_task_routers", f"must be true or false, got {self.blc_task_routers!r}")


@dataclass
class HMoRAConfig:
    """The configuration of a method: which one, its adapters, routing and losses.

    Attributes:
        method: the registered method (``hmora_ds.methods.available_methods()``); it decides
            where experts and routers go, how gates and auxiliary losses are computed, and
            validates the sections below for itself (when it is built).
        adapter / routing / loss: the shared vocabulary of LoRA-mixture methods.
        options: method-specific settings, validated by the method's own options dataclass.
        full_finetune: train every weight of the base model instead of adapters (method
            ``full_ft``; needs ``adapter.targets=[]``).
        preset: the preset this config was loaded from (recorded, not an input: choose the
            preset with the run config's ``preset`` or ``params --preset``).
    """

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    full_finetune: bool = False
    preset: str | None = None
    method: str = "hmora"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field and every cross-field combination that needs no model shape;
        every bad field is reported in one error (:func:`collect_errors`)."""
        check_sections(
            self._validate_own, self.adapter.validate, self.routing.validate,
            self.loss.validate, self._validate_across,
        )  # fmt: skip

    def _validate_own(self) -> None:
        check_types(self, "")
        if not isinstance(self.method, str) or not self.method:
            _fail("method", f"must name a registered method, got {self.method!r}")
        if not isinstance(self.options, dict):
            _fail("options", f"must be a mapping of method options, got {self.options!r}")

    def _validate_across(self) -> None:
        if self.full_finetune and self.adapter.targets:
            _fail(
                "full_finetune",
                "trains the base model itself; set adapter.targets=[] (no adapters) with it",
            )
        if not self.full_finetune and not self.adapter.targets:
            _fail("adapter.targets", "is empty: name at least one layer, or set full_finetune=true")
        if self.has_mixture and self.routing.mode == "topk":
            e = self.adapter.num_experts
            if self.routing.top_k > e:
                _fail(
                    "routing.top_k",
                    f"({self.routing.top_k}) exceeds adapter.num_experts ({e}); use top_k <= {e}",
                )

    @property
    def has_mixture(self) -> bool:
        """Whether any target carries a routed mixture (and so routers and aux losses)."""
        return not self.full_finetune and bool(self.adapter.mixture_targets)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HMoRAConfig:
        """Build from a nested dict; unknown keys are errors naming the key."""
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a mapping, got {type(data).__name__}")
        sections = {"adapter": AdapterConfig, "routing": RoutingConfig, "loss": LossConfig}
        top = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - top)
        if unknown:
            raise ValueError(
                f"config: unknown key(s) {unknown}; valid top-level keys: {sorted(top)}"
            )
        kwargs: dict[str, Any] = {}
        if "method" not in data:
            # Configs written before methods were named (adapters, runs): today's general
            # implementation of those configs is the method ``hmora``.
            kwargs["method"] = "full_ft" if data.get("full_finetune") else "hmora"
        for key, value in data.items():
            if key in sections:
                kwargs[key] = _build_section(key, sections[key], value or {})
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> HMoRAConfig:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return cls.from_dict(data or {})

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> HMoRAConfig:
        """A new validated config with dotted ``key=value`` overrides applied."""
        data = self.to_dict()
        apply_overrides(data, overrides)
        return HMoRAConfig.from_dict(data)


def _build_section(name: str, klass: type, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{name}: expected a mapping, got {values!r}")
    valid = {f.name for f in fields(klass)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    return klass(**values)


def parse_override(item: str) -> tuple[str, Any]:
    """``"routing.eps=2"`` → ``("routing.eps", 2)``; values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key=value, e.g. routing.eps=2")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {item!r}: empty key")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> None:
    """Apply dotted overrides in place to a nested dict, refusing keys that do not exist."""
    pairs = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in pairs:
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            # Method options (``options.x``, a run config's ``method.options.x``): checked by
            # the method's own options class.
            free = depth >= 1 and parts[depth - 1] == "options"
            if not isinstance(node, dict) or (part not in node and not free):
                where = ".".join(parts[: depth + 1])
                raise ValueError(f"override {key}: unknown key {where!r}")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(
    source: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> HMoRAConfig:
    """Load a config from a preset name, a YAML/JSON path or a dict, then apply overrides.

    Args:
        source: preset name (``hmora_lw``), file path, dict, or None for the defaults.
        overrides: dotted ``key=value`` strings or a ``{dotted_key: value}`` dict.
    """
    if source is None:
        cfg = HMoRAConfig()
    elif isinstance(source, dict):
        cfg = HMoRAConfig.from_dict(source)
    elif Path(source).suffix in (".yaml", ".yml", ".json"):
        cfg = HMoRAConfig.from_file(source)
    else:
        path = PRESETS_DIR / f"{source}.yaml"
        if not path.is_file():
            raise ValueError(f"preset {source!r} does not exist; available: {available_presets()}")
        cfg = HMoRAConfig.from_file(path)
        cfg.preset = str(source)
    return cfg.with_overrides(overrides) if overrides else cfg

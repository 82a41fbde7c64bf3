"""The ablation studies: named grids of run-config overrides, rows in the paper's layout.

Every row is a set of dotted overrides of the *run* config (``preset=hmora``,
``method.routing.mode=soft``), applied on top of the study's base overrides. Values come from
the paper (tables 2, 3, 9, 10, 11; appendix E) and ``shared/spec/method.md``:

* ``routing`` (table 2): soft / top-2 × no auxiliary loss / L_blc (λ = 0.01) / L_aux
  (λ = 0.003, γ_c = 0.4, γ_b = 1); token-level routing only, all seven layers, e = r = 8.
  The paper has no "soft + L_blc" row; the grid keeps the full 2 × 3 cross.
* ``gamma_c`` (table 9): γ_c ∈ {0, 0.2, 0.4, 0.6, 0.8} for top-2 and soft, same setup.
* ``alpha`` (table 10): constant α (ε = 0, μ chosen so σ(μ) ≈ 0, 0.2, 0.4, 0.6, 0.8, 1 after
  the β thresholds) and hierarchical α (ε = ±4), HMoRA without the lightweight designs.
* ``lightweight`` (table 11): each lightweight design alone, the LoRA+ η_B sweep, and all.
* ``task_encoder`` (ablation plan A): transformer / mean_pool / none.
* ``experts`` (ablation plan B): e ∈ {4, 8, 16, 32}.
* ``baselines`` (table 3): LoRA r = 8 / 64, MoLoRA, MixLoRA, HydraLoRA, HMoRA w LW / w/o LW,
  full fine-tuning at ``--scale paper`` only.
* ``learning``: does routing learn at CPU scale (a recipe that makes routers move in 40 steps).
* ``ood`` (HiMoLE's protocol): train on 7 of the offline mixture's 9 tasks, evaluate on held-out
  questions of the trained tasks (in distribution) and on tasks never trained (out of
  distribution); HiMoLE, HiMoLE one-stage, MixLoRA, HydraLoRA, LoRA r = 8, HMoRA w LW.
* ``methods``: every registered method with its default preset, trained alike (at CPU scale the
  ``learning`` recipe), tabulated with TP, step time, validation loss, accuracy with intervals
  and routing statistics (:mod:`hmora_ds.ablate.methods_table`).
* ``composition``: composing trained LoRAs on a task none of them saw. A library of plain LoRAs
  is built on the offline mixture's tasks minus one held-out task; on that task the table
  compares the base model, each library LoRA alone, LoraHub, MoLE, Mixture-of-LoRAs and a LoRA
  trained on the held-out task itself (the upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Token-level routing only (§4.1 "we only use token-level routing in this section"): no task
#: encoder, and β_high = 1 so no layer asks for a task router (the model validates that).
TOKEN_ONLY: dict[str, Any] = {
    "method.routing.task_encoder": "none",
    "method.routing.beta_high": 1.0,
}
#: The auxiliary losses as the paper runs them (§4.1): λ differs per loss.
AUX = {
    "none": {"method.loss.aux": "none"},
    "blc": {"method.loss.aux": "blc", "method.loss.aux_weight": 0.01},
    "aux": {
        "method.loss.aux": "cgjs",
        "method.loss.aux_weight": 0.003,
        "method.loss.gamma_b": 1.0,
        "method.loss.gamma_c": 0.4,
    },
}
MODES = {"soft": ("Soft", {"method.routing.mode": "soft"}), "topk": ("Top-k", {})}


#: What a row does before its evaluation (:class:`Row`).
ROW_KINDS = ("train", "base", "library", "lorahub")
#: In a composition study's row overrides: replaced by the study's library directory.
LIBRARY_DIR = "<library>"


@dataclass(frozen=True)
class Row:
    """One grid point.

    Attributes:
        name: slug used for its directory and ``--rows`` (unique in the study).
        labels: the paper's label columns for this row (column name → cell).
        overrides: dotted run-config overrides on top of the study's base overrides.
        paper_only: only part of the grid at ``--scale paper``.
        unsupported: why this row cannot run with the current entry points (None = runs).
        kind: what the row does before its evaluation (:data:`ROW_KINDS`): ``train`` (the
            default: train with its overrides), ``base`` (nothing: the base model is
            evaluated), ``library`` (the study's library LoRA of ``task`` is evaluated) or
            ``lorahub`` (LoraHub composes the library's LoRAs on few-shot examples of the
            study's held-out task, then that adapter is evaluated).
        task: with ``kind=library``, the library task whose LoRA is evaluated.
    """

    name: str
    labels: dict[str, str]
    overrides: dict[str, Any] = field(default_factory=dict)
    paper_only: bool = False
    unsupported: str | None = None
    kind: str = "train"
    task: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROW_KINDS:
            raise ValueError(f"Row {self.name}: kind must be one of {ROW_KINDS}, got {self.kind!r}")
        if (self.kind == "library") != (self.task is not None):
            raise ValueError(f"Row {self.name}: a task is given exactly with kind=library")


@dataclass(frozen=True)
class Study:
    """A named grid: base overrides shared by every row, then one row per grid point."""

    name: str
    title: str
    columns: tuple[str, ...]
    base: dict[str, Any]
    rows: tuple[Row, ...]
    #: ``--data`` of the routing analysis when ``--analysis-data`` is not given (None: MMLU,
    #: the paper's unseen tasks; ``benchmarks``: the evaluated benchmarks' questions).
    analysis_data: str | None = None
    #: Per scale, defaults that replace the scale's (``benchmarks``, ``max_questions``,
    #: ``max_per_task``); the command line still wins.
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The in/out-of-distribution protocol (:mod:`hmora_ds.eval.ood`): checkpoints are
    #: selected on the ID benchmarks only, and the table reports ID and OOD accuracy.
    ood: bool = False
    #: Per scale, overrides applied after ``base`` (a recipe meant for one scale only).
    scale_base: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Which table the study writes: ``default`` (:mod:`hmora_ds.ablate.table`) or
    #: ``methods`` (:mod:`hmora_ds.ablate.methods_table`); the ``ood`` flag has its own.
    table: str = "default"
    #: With ``table="methods"``: the row every other row's accuracy is compared with (None:
    #: :data:`METHODS_REFERENCE`).
    reference: str | None = None
    #: A composition study's held-out task: the runner first builds a library of plain LoRAs
    #: on the other tasks of the offline mixture (``<out>/library``) and writes LoraHub's
    #: few-shot examples of this task (``<out>/lorahub_examples.jsonl``).
    held_out: str | None = None

    def base_for(self, scale: str) -> dict[str, Any]:
        """``base`` with this scale's own overrides on top."""
        return {**self.base, **self.scale_base.get(scale, {})}

    def rows_for(self, scale: str) -> list[Row]:
        return [r for r in self.rows if scale == "paper" or not r.paper_only]

    def varied_keys(self) -> set[str]:
        """Keys some row sets (``--set`` may not touch them: it would flatten the grid)."""
        return {k for r in self.rows for k in r.overrides}


def _routing() -> Study:
    rows = []
    for mode, (label, mode_ov) in MODES.items():
        for aux in ("none", "blc", "aux"):
            name = mode if aux == "none" else f"{mode}-{aux}"
            labels = {
                "RM": label,
                "L_aux": "yes" if aux == "aux" else "-",
                "L_blc": "yes" if aux == "blc" else "-",
            }
            rows.append(Row(name, labels, {**mode_ov, **AUX[aux]}))
    return Study(
        "routing",
        "Routing methods (paper table 2): soft / top-2 × none / L_blc / L_aux, token routing",
        ("RM", "L_aux", "L_blc"),
        {"preset": "hmora", **TOKEN_ONLY},
        tuple(rows),
    )


def _gamma_c() -> Study:
    rows = []
    for mode, label in (("topk", "Top-2"), ("soft", "Soft")):
        for gc in (0.0, 0.2, 0.4, 0.6, 0.8):
            ov = {**MODES[mode][1], "method.loss.gamma_c": gc}
            rows.append(Row(f"{mode}-gc{gc:g}", {"Routing": label, "γ_c": f"{gc:g}"}, ov))
    return Study(
        "gamma_c",
        "Certainty bound γ_c of L_aux (paper table 9), top-2 and soft, token routing",
        ("Routing", "γ_c"),
        {"preset": "hmora", **TOKEN_ONLY, **AUX["aux"]},
        tuple(rows),
    )


#: Table 10: (manner, ε, μ, α column). Constant α = σ(μ); "0" and "1" are σ(∓2) = 0.12 / 0.88,
#: which the β thresholds 0.2 / 0.8 turn into token-only and task-only routing.
ALPHA_GRID = (
    ("Constant", 0.0, -2.0, "0"),
    ("Constant", 0.0, -1.35, "0.2"),
    ("Constant", 0.0, -0.4, "0.4"),
    ("Constant", 0.0, 0.4, "0.6"),
    ("Constant", 0.0, 1.35, "0.8"),
    ("Constant", 0.0, 2.0, "1"),
    ("Hierarchical", -4.0, 0.0, "↓"),
    ("Hierarchical", 4.0, 0.0, "↑"),
    ("Hierarchical", 4.0, -2.0, "↑"),
    ("Hierarchical", 4.0, 2.0, "↑"),
)


def _alpha() -> Study:
    rows = [
        Row(
            f"eps{eps:g}_mu{mu:g}",
            {"Manner": manner, "ε": f"{eps:g}", "μ": f"{mu:g}", "α(l)": alpha},
            {"method.routing.eps": eps, "method.routing.mu": mu},
        )
        for manner, eps, mu, alpha in ALPHA_GRID
    ]
    return Study(
        "alpha",
        "Constant vs hierarchical α(l) (paper table 10), HMoRA w/o LW, β 0.2 / 0.8",
        ("Manner", "ε", "μ", "α(l)"),
        {"preset": "hmora", **AUX["aux"]},
        tuple(rows),
    )


def _lightweight() -> Study:
    rows = [
        Row("base", {"Method": "Base", "η_B": "-"}),
        Row(
            "router-sharing",
            {"Method": "+ Router Sharing", "η_B": "-"},
            {"method.routing.share_routers": True},
        ),
        Row(
            "single-lora",
            {"Method": "+ Single LoRA", "η_B": "-"},
            {"method.adapter.single_lora_layers": ["o", "down"]},
        ),
        Row("hydra", {"Method": "+ Hydra LoRA", "η_B": "-"}, {"method.adapter.hydra": True}),
    ]
    for eta in (1.2, 1.4, 1.6, 1.8, 2.0):
        rows.append(
            Row(
                f"hydra-lora+{eta:.1f}",
                {"Method": "+ Hydra LoRA+", "η_B": f"{eta:.1f}"},
                {"method.adapter.hydra": True, "method.adapter.eta_b": eta},
            )
        )
    # "+ All" is the hmora_lw preset; spelled out so the row shows what it changes.
    rows.append(
        Row(
            "all",
            {"Method": "+ All", "η_B": "2.0"},
            {
                "method.routing.share_routers": True,
                "method.adapter.single_lora_layers": ["o", "down"],
                "method.adapter.hydra": True,
                "method.adapter.eta_b": 2.0,
            },
        )
    )
    return Study(
        "lightweight",
        "Lightweight designs (paper table 11): each alone, LoRA+ η_B sweep, all four",
        ("Method", "η_B"),
        {"preset": "hmora", **AUX["aux"]},
        tuple(rows),
    )


ENCODER = "method.routing.task_encoder"


def _task_encoder() -> Study:
    rows = [
        Row("transformer", {"Task encoder": "transformer"}, {}),
        Row("mean_pool", {"Task encoder": "mean_pool"}, {ENCODER: "mean_pool"}),
        # No task representation: every layer falls back to token routing (β_high = 1 says
        # no layer is task-only, which the model requires without an encoder).
        Row("none", {"Task encoder": "none (token routing)"}, TOKEN_ONLY),
    ]
    return Study(
        "task_encoder",
        "Task encoder (ablation A): transformer / masked mean pool / none, HMoRA w/o LW",
        ("Task encoder",),
        {"preset": "hmora", **AUX["aux"]},
        tuple(rows),
    )


def _experts() -> Study:
    rows = [Row(f"e{e}", {"e": str(e)}, {"method.adapter.num_experts": e}) for e in (4, 8, 16, 32)]
    return Study(
        "experts",
        "Number of experts (ablation B): e = 4, 8, 16, 32, HMoRA w/o LW, top-2",
        ("e",),
        {"preset": "hmora", **AUX["aux"]},
        tuple(rows),
    )


def _baselines() -> Study:
    """Every registered method's shipped presets (the built-ins are table 3's rows)."""
    from hmora_ds.methods import method_presets

    rows = []
    for preset, label, _ in method_presets():
        name = preset.replace("_", "-")
        if preset == "full_ft":
            rows.append(
                Row(
                    name,
                    {"Method": label},
                    {"preset": preset, "train.gradient_checkpointing": True},
                )
            )
        else:
            rows.append(Row(name, {"Method": label}, {"preset": preset}))
    return Study(
        "baselines",
        "Baselines (paper table 3), each preset as shipped (spec §8)",
        ("Method",),
        {},
        tuple(rows),
    )


#: The recipe of the ``learning`` study (docs/ablations.md, "Does routing learn?"): what makes
#: routers leave their initialisation in minutes on 2 CPU cores. Deviations from the paper, each
#: for a reason: 40 steps instead of up to 10,000, so the routing parameters train at 20 × lr
#: (``train.router_lr_mult``); 2 × 2 micro-batches on 2 ranks = 8 sequences per step (the
#: paper: 12), enough for a task router's balance term to reach its target with 8 experts.
LEARNING_RECIPE: dict[str, Any] = {
    "train.max_steps": 40,
    "train.grad_accum": 2,
    "train.warmup_steps": 4,
    "train.schedule": "constant",
    "train.router_lr_mult": 20.0,
    "train.router_stats_every": 20,
    "eval.every": 20,
    "checkpoint.every": 20,
}


def _learning() -> Study:
    """Does routing learn? HMoRA w LW with no auxiliary loss, L_blc and L_aux, and LoRA r = 8,
    trained with :data:`LEARNING_RECIPE`; analysed on the training mixture's own tasks."""
    rows = [
        Row(f"lw-{aux}", {"Method": "HMoRA w LW", "Aux": {"none": "-", "blc": "L_blc",
                                                          "aux": "L_aux"}[aux]},
            {"preset": "hmora_lw", **AUX[aux]})
        for aux in ("none", "blc", "aux")
    ]  # fmt: skip
    rows.append(Row("lora-r8", {"Method": "LoRA r=8", "Aux": "-"}, {"preset": "lora_r8"}))
    return Study(
        "learning",
        "Does routing learn? HMoRA w LW × none / L_blc / L_aux, and LoRA r = 8 (same steps)",
        ("Method", "Aux"),
        dict(LEARNING_RECIPE),
        tuple(rows),
        analysis_data="offline",
    )


#: The ``ood`` study's training tasks: 7 of the offline mixture's 9. Held out: CommonsenseQA and
#: HellaSwag (SWAG's offline stand-in), whose benchmarks, with MMLU (never in the mixture), are
#: the out-of-distribution ones; ARC-C, ARC-E and OpenBookQA are evaluated on their held-out
#: questions (in distribution). See docs/ablations.md for why this split.
OOD_TRAIN_TASKS = (
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "piqa",
    "social_iqa",
    "boolq",
    "winogrande",
)
#: What the ``ood`` study evaluates at CPU scale: every benchmark the offline source has.
OOD_BENCHMARKS = "mmlu,arc-c,arc-e,obqa,swag,csqa"
#: The ``ood`` study's data at every scale: the 7 tasks of the offline mixture's cached build
#: (``data.path: null``), also at ``--scale paper``, whose config trains on Flan v2 (a mixture
#: without this task mapping). At ``--scale cpu`` training follows the ``learning`` study's
#: recipe (routers at 20 × lr, 8 sequences per step, constant lr), so that routing can differ
#: between methods at all; at ``--scale paper`` the paper config's own training.
OOD_DATA: dict[str, Any] = {
    "data.kind": "offline",
    "data.path": None,
    "data.tasks": list(OOD_TRAIN_TASKS),
}
#: Training records of a CPU-scale ``ood`` row: the first 1,000 of the 7 tasks' 7,000 (the
#: mixture is shuffled, so ≈ 140 per task). A row sees 40 × 8 = 320 sequences, less than one
#: pass over either pool; the cap is for HiMoLE's stage 1, which embeds every training prompt
#: with the base model before training (7,000 prompts: tens of minutes on 2 CPU cores).
OOD_CPU_RECORDS = 1000
#: The ``ood`` study's rows: (row name, preset, label when the preset is not registered).
OOD_ROWS = (
    ("himole", "himole", "HiMoLE"),
    ("himole-one-stage", "himole_one_stage", "HiMoLE one-stage"),
    ("mixlora", "mixlora", "MixLoRA"),
    ("hydralora", "hydralora", "HydraLoRA"),
    ("lora-r8", "lora_r8", "LoRA r = 8"),
    ("hmora-lw", "hmora_lw", "HMoRA w LW"),
)
#: The row every other row's accuracy is compared with (paired, per question).
OOD_REFERENCE = "lora-r8"


def registered_presets() -> dict[str, str]:
    """Preset → label of every registered method's shipped presets."""
    from hmora_ds.methods import method_presets

    return {preset: label for preset, label, _ in method_presets()}


def unregistered_preset(row: Row) -> str | None:
    """Why ``row`` cannot run when it names a preset no registered method ships, else None."""
    preset = row.overrides.get("preset")
    known = registered_presets()
    if preset is None or preset in known:
        return None
    return (
        f"preset {preset!r} is not registered in this checkout (no registered method ships it; "
        f"registered: {', '.join(known)})"
    )


def _ood() -> Study:
    """HiMoLE's evaluation: in and out of distribution (docs/ablations.md)."""
    labels = registered_presets()
    rows = tuple(
        Row(name, {"Method": labels.get(preset, label)}, {"preset": preset})
        for name, preset, label in OOD_ROWS
    )
    return Study(
        "ood",
        "In and out of distribution (HiMoLE's protocol): 7 training tasks; ID = their held-out "
        "questions, OOD = tasks never trained",
        ("Method",),
        dict(OOD_DATA),
        rows,
        analysis_data="benchmarks",
        defaults={
            "cpu": {"benchmarks": OOD_BENCHMARKS, "max_questions": 100, "max_per_task": 20},
            "paper": {"benchmarks": "all"},
        },
        ood=True,
        scale_base={"cpu": {**LEARNING_RECIPE, "data.max_records": OOD_CPU_RECORDS}},
    )


#: The ``methods`` study's reference row: every other row's average is compared with it.
METHODS_REFERENCE = "lora"


def _methods() -> Study:
    """Every registered method with its default preset (:attr:`Method.preset`), in table order,
    trained alike; full fine-tuning only at ``--scale paper`` (as in ``baselines``)."""
    from hmora_ds.methods import available_methods, get_method

    rows = []
    for name in sorted(available_methods(), key=lambda n: (get_method(n).order, n)):
        cls = get_method(name)
        if cls.preset is None:
            continue
        label = cls.presets.get(cls.preset, name)
        row = name.replace("_", "-")
        if name == "full_ft":
            rows.append(
                Row(
                    row,
                    {"Method": label},
                    {"preset": cls.preset, "train.gradient_checkpointing": True},
                )
            )
        else:
            rows.append(Row(row, {"Method": label}, {"preset": cls.preset}))
    return Study(
        "methods",
        "Every registered method, its default preset, trained alike",
        ("Method",),
        {},
        tuple(rows),
        analysis_data="benchmarks",
        scale_base={"cpu": dict(LEARNING_RECIPE)},
        table="methods",
    )


#: The ``composition`` study's held-out task: CommonsenseQA, evaluated by the ``csqa``
#: benchmark (its test questions, never trained on); the library holds the other eight tasks.
COMPOSITION_HELD_OUT = "commonsense_qa"
#: LoraHub's few-shot examples of the held-out task (the paper's setting: 5).
COMPOSITION_SHOTS = 5


def _composition() -> Study:
    """Composing trained LoRAs on a held-out task (docs/ablations.md)."""
    from hmora_ds.data.offline_tasks import TASKS

    held = COMPOSITION_HELD_OUT
    rows = [Row("base", {"Method": "Base model (no adapter)"}, kind="base")]
    rows += [
        Row(f"lib-{task.replace('_', '-')}", {"Method": f"Library LoRA: {task}"},
            kind="library", task=task)
        for task in TASKS
        if task != held
    ]  # fmt: skip
    rows.append(Row("lorahub", {"Method": f"LoraHub ({COMPOSITION_SHOTS}-shot)"}, kind="lorahub"))
    on_library = {"method.options.library": LIBRARY_DIR, "data.exclude_tasks": [held]}
    rows += [
        Row("mole", {"Method": "MoLE"}, {"preset": "mole", **on_library}),
        Row("mixture-of-loras", {"Method": "Mixture-of-LoRAs"},
            {"preset": "mixture_of_loras", **on_library}),
        Row("lora-held-out", {"Method": "LoRA r = 8 trained on the held-out task"},
            {"preset": "lora_r8", "data.tasks": [held]}),
    ]  # fmt: skip
    return Study(
        "composition",
        f"Composing trained LoRAs on a held-out task ({held}): library = the other tasks",
        ("Method",),
        {"data.kind": "offline", "data.path": None},
        tuple(rows),
        defaults={"cpu": {"benchmarks": "csqa", "max_questions": 300}},
        scale_base={"cpu": dict(LEARNING_RECIPE)},
        table="methods",
        reference="base",
        held_out=held,
    )


STUDIES: dict[str, Study] = {
    s.name: s
    for s in (
        _routing(),
        _gamma_c(),
        _alpha(),
        _lightweight(),
        _task_encoder(),
        _experts(),
        _baselines(),
        _learning(),
        _ood(),
        _methods(),
        _composition(),
    )
}


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; valid studies: {', '.join(STUDIES)}")
    return STUDIES[name]


def render_value(value: Any) -> str:
    """A command-line ``key=value`` value that the config's YAML parser reads back as ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def as_overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={render_value(v)}" for k, v in values.items()]

"""The run configuration: the one place batch sizes, lr, clipping and precision come from.

A run config is a YAML file (``configs/*.yaml``) plus dotted overrides on the command line::

    train.lr=1e-4 train.max_steps=300 method.routing.eps=2 data.kind=local data.path=my.jsonl

``preset`` names the HMoRA method preset; ``method`` holds dotted overrides of it. The DeepSpeed
JSON only says *how* to shard (ZeRO stage, offload); its batch / clipping fields are ``"auto"``
and filled from here (see :mod:`hmora_ds.train.deepspeed_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hmora_ds.config import (
    HMoRAConfig,
    _fail,
    apply_overrides,
    check_sections,
    check_types,
    load_config,
    parse_override,
)
from hmora_ds.lm_head import DEFAULT_CHUNK_TOKENS


@dataclass
class ModelConfig:
    """The base model.

    Attributes:
        name_or_path: HF hub name, local directory, or a GGUF file path.
        gguf_file: GGUF file name inside ``name_or_path`` (dequantised on load).
        tokenizer: tokenizer name/dir (default: the model's).
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32`` or ``bfloat16`` for the frozen base.
        attn_implementation: ``sdpa`` or ``eager``.
        adapter: an exported adapter directory to start from (its method config replaces
            ``preset`` / ``method``); loads into any ``parallel.ep_size``.
    """

    name_or_path: str = "smollm2-135m-instruct"
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    adapter: str | None = None

    def validate(self) -> None:
        check_types(self, "model")
        if not self.name_or_path:
            _fail("model.name_or_path", "is empty; give an HF name, a directory or a GGUF file")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            _fail("model.dtype", f"must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            _fail(
                "model.attn_implementation",
                f"must be sdpa or eager, got {self.attn_implementation!r}",
            )


@dataclass
class DataConfig:
    """Training data.

    Attributes:
        kind: ``offline`` (the real offline mixture, built on first use), ``flan`` (a Flan v2
            build directory) or ``local`` (your own data: a JSONL / JSON / Parquet file or
            directory, or a Hugging Face dataset; see docs/data.md, "Your own data").
        path: the file or directory for ``local`` / ``flan``; for ``offline`` an optional
            build directory (default: in the cache). With ``local`` also a Hugging Face
            dataset: a hub name (``org/name``, read with ``datasets.load_dataset``) or a
            ``save_to_disk`` directory (read offline).
        format: with ``local``: ``auto`` (decided per file from its first record's keys),
            ``records`` (``source`` / ``target``), ``alpaca`` (``instruction``, optional
            ``input``, ``output``), ``messages`` (OpenAI ``messages``: role / content, loss on
            the assistant turns only) or ``sharegpt`` (``conversations``: from / value).
        columns: with ``local``: your column names for ours, applied before the format is
            detected, e.g. ``{instruction: question, output: answer}`` or
            ``{messages: dialog}`` (on the command line
            ``data.columns='{instruction: question, output: answer}'``); null = none.
        split: with a Hugging Face dataset: the split to train on (``data.val_path`` naming
            a dataset reads its ``validation`` split).
        subset: with a Hugging Face dataset: its configuration (``load_dataset``'s second
            argument); null = the default one.
        chat_template: the chat template of every prompt, in training and in its
            evaluations: null (the tokenizer's own; a tokenizer without one is an error),
            ``chatml``, ``llama3``, ``plain`` (for base models: the prompt is the source and a
            newline, the answer ends with the eos token) or a path to a Jinja file.
        val_path: held-out records for validation (default: ``val_fraction`` of the training set);
            read like ``path`` (same format and columns).
        val_fraction: share of training records held out when ``val_path`` is unset.
        max_records: cap on training records (None = all).
        max_input_tokens / max_output_tokens: prompt and target limits (paper: 1024 / 512).
        group_by_length: length-grouped batching.
        offline_per_task: records per task when the offline mixture is built here.
        tasks: train only on the records of these tasks (their ``task_name``); null = every
            task. With ``offline`` the names must be the mixture's tasks (``arc_easy``,
            ``arc_challenge``, ``openbookqa``, ``commonsense_qa``, ``hellaswag``, ``piqa``,
            ``social_iqa``, ``boolq``, ``winogrande``); with ``flan`` / ``local`` each must
            match some record. Validation records come from the same tasks.
        exclude_tasks: leave the records of these tasks out (after ``tasks``): the held-out
            tasks of an out-of-distribution evaluation (``python -m hmora_ds.ablate ood``).
    """

    kind: str = "offline"
    path: str | None = None
    format: str = "auto"
    columns: dict[str, str] | None = None
    split: str = "train"
    subset: str | None = None
    chat_template: str | None = None
    val_path: str | None = None
    val_fraction: float = 0.02
    max_records: int | None = None
    max_input_tokens: int = 1024
    max_output_tokens: int = 512
    group_by_length: bool = True
    offline_per_task: int | None = 2000
    tasks: list[str] | None = None
    exclude_tasks: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check_types(self, "data")
        if self.tasks is not None or self.exclude_tasks:
            from hmora_ds.data.offline_tasks import task_selection_problems

            for name, message in task_selection_problems(self.kind, self.tasks, self.exclude_tasks):
                _fail(name, message)
        if self.kind not in ("offline", "flan", "local"):
            _fail("data.kind", f"must be offline, flan or local, got {self.kind!r}")
        if self.kind in ("flan", "local") and not self.path:
            _fail("data.path", f"is required with data.kind={self.kind}")
        self._check_sources()
        if not 0.0 <= self.val_fraction < 0.5:
            _fail("data.val_fraction", f"must lie in [0, 0.5), got {self.val_fraction}")
        for name in ("max_input_tokens", "max_output_tokens", "max_records", "offline_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                none = " or null (all)" if name in ("max_records", "offline_per_task") else ""
                _fail(f"data.{name}", f"must be a positive integer{none}, got {value}")

    def _check_sources(self) -> None:
        """``format``, ``columns``, ``split``, ``subset`` and ``chat_template``."""
        from hmora_ds.data.chat_templates import template_problem
        from hmora_ds.data.formats import COLUMN_FIELDS, FORMATS

        if self.format not in FORMATS:
            _fail("data.format", f"must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.columns is not None:
            for ours, theirs in self.columns.items():
                if ours not in COLUMN_FIELDS:
                    _fail(
                        "data.columns",
                        f"{ours!r} is not one of our fields ({', '.join(COLUMN_FIELDS)}); map "
                        "ours to yours, e.g. {instruction: question, output: answer}",
                    )
                elif not isinstance(theirs, str) or not theirs:
                    _fail(
                        "data.columns",
                        f"{ours}: must name one of your columns (a string), got {theirs!r}",
                    )
        if not self.split:
            _fail("data.split", "is empty; give a split name such as train")
        if self.kind != "local":
            defaults = {"format": "auto", "columns": None, "split": "train", "subset": None}
            for name, default in defaults.items():
                if getattr(self, name) != default:
                    _fail(
                        f"data.{name}",
                        f"applies to data.kind=local only (data.kind={self.kind}); remove it "
                        "or set data.kind=local",
                    )
        problem = template_problem(self.chat_template)
        if problem:
            _fail("data.chat_template", problem)


#: ``train.max_steps`` at its default: the value ``train.epochs`` may replace.
DEFAULT_MAX_STEPS = 10000


@dataclass
class TrainConfig:
    """Optimisation (paper §4.1: AdamW, lr 2e-5, 500 warm-up steps, global batch 12).

    Attributes:
        micro_batch_size: sequences per rank per forward (DeepSpeed
            ``train_micro_batch_size_per_gpu``).
        grad_accum: micro-batches accumulated per optimizer step; the global batch is
            ``micro_batch_size × grad_accum × ranks``.
        max_steps: optimizer steps to train (fewer if early stopping ends the run); with
            ``epochs`` leave it at its default (it is then derived from the data).
        epochs: passes over the training data, or null (train ``max_steps`` steps). When set,
            ``max_steps = ceil(epochs × training examples / global batch)``, computed once the
            data is encoded (the log states it); may be fractional (0.5 = half the data).
        lr: peak learning rate (LoRA+ multiplies it by ``method.adapter.eta_b`` for ``B``).
        router_lr_mult: multiplies ``lr`` for the routers: token, task and sentence
            routers and a learnable α (1 = the paper); the task encoder and ``e_task`` keep
            ``lr`` (at a multiplied lr the encoder's H_task collapses to one direction). A
            compression knob for short runs, not the paper's setting: the paper trains up to
            10,000 steps at lr 2e-5, and in a run of a few hundred steps the routers barely
            leave their initialisation; a higher router lr (e.g. 10) makes them move. The
            schedule scales it with every other group (warm-up and decay keep the ratio).
        warmup_steps: linear warm-up steps from 0 to ``lr``.
        schedule: after warm-up: ``linear`` or ``cosine`` decay to ``min_lr_ratio × lr`` at
            ``max_steps``, or ``constant``.
        min_lr_ratio: the decayed schedules end at this fraction of ``lr``.
        weight_decay: AdamW weight decay (not on norms or ``e_task``).
        adam_betas: AdamW ``(beta1, beta2)``; on the command line ``train.adam_betas=[0.9,0.95]``.
        grad_clip: global gradient-norm clipping (0 = off).
        seed: seed of initialisation and data order (dropout adds the rank).
        precision: ``auto`` (bf16 autocast on GPU, fp32 on CPU), ``fp32`` or ``bf16``; the
            adapters' weights stay fp32.
        gradient_checkpointing: recompute the base model's activations in the backward pass
            (less memory, more compute).
        ce_chunk_tokens: the LM loss of a training step is computed this many tokens at a
            time, with its gradient, so the (tokens × vocabulary) logits never exist in full
            (``hmora_ds/lm_head.py``); 0 computes it from the full logits, as ZeRO-3 always
            does (there DeepSpeed gathers the head's weight around the module's own call).
        compile: ``torch.compile`` of regions of the model (``docs/performance.md``):
            ``none``, ``blocks`` (each decoder layer's attention and MLP, where the adapters
            and routers are) or ``layers`` (whole decoder layers; the one to use with
            ``gradient_checkpointing``). The first steps are slower while the regions compile.
            Under ZeRO-3 each decoder layer's parameters are then gathered at once.
        compile_backend: the ``torch.compile`` backend (``inductor``; ``aot_eager`` or
            ``eager`` to tell a compiler problem from a capture problem).
        max_nonfinite_steps: stop the run after this many non-finite losses in a row.
        log_every: steps between metric logs. Metrics are read back from the device once per
            window (and before every evaluation / checkpoint), so the step never waits on
            the device and divergence is noticed at the end of the window it happened in.
        router_stats_every: steps between routing statistics (expert load, certainty).
    """

    micro_batch_size: int = 4
    grad_accum: int = 3
    max_steps: int = DEFAULT_MAX_STEPS
    epochs: float | None = None
    lr: float = 2e-5
    router_lr_mult: float = 1.0
    warmup_steps: int = 500
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    seed: int = 42
    precision: str = "auto"
    gradient_checkpointing: bool = False
    ce_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    compile: str = "none"
    compile_backend: str = "inductor"
    max_nonfinite_steps: int = 5
    log_every: int = 10
    router_stats_every: int = 50

    def validate(self) -> None:
        check_types(self, "train")
        for name in (
            "micro_batch_size",
            "grad_accum",
            "max_steps",
            "log_every",
            "router_stats_every",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(f"train.{name}", f"must be a positive integer, got {value!r}")
        if self.epochs is not None:
            if not 0 < self.epochs < math.inf:
                _fail("train.epochs", f"must be > 0 and finite, or null, got {self.epochs}")
            elif self.max_steps != DEFAULT_MAX_STEPS:
                _fail(
                    "train.epochs",
                    f"{self.epochs:g} and train.max_steps={self.max_steps} are both set; keep "
                    "one: drop train.epochs, or train.max_steps (a config file's is reset with "
                    f"train.max_steps={DEFAULT_MAX_STEPS}, its default)",
                )
        if not 0 < self.lr < math.inf:
            _fail("train.lr", f"must be > 0 and finite, got {self.lr}")
        if not 0 < self.router_lr_mult < float("inf"):
            _fail(
                "train.router_lr_mult",
                f"must be > 0 and finite (1 = the paper), got {self.router_lr_mult}",
            )
        if self.warmup_steps < 0:
            _fail("train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.schedule not in ("linear", "cosine", "constant"):
            _fail("train.schedule", f"must be linear, cosine or constant, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            _fail("train.precision", f"must be auto, fp32 or bf16, got {self.precision!r}")
        if not isinstance(self.ce_chunk_tokens, int) or self.ce_chunk_tokens < 0:
            _fail(
                "train.ce_chunk_tokens",
                f"must be an integer >= 0 (0 = full logits), got {self.ce_chunk_tokens!r}",
            )
        if self.compile not in ("none", "blocks", "layers"):
            _fail("train.compile", f"must be none, blocks or layers, got {self.compile!r}")
        if self.compile == "blocks" and self.gradient_checkpointing:
            _fail(
                "train.compile",
                "blocks cannot run inside checkpointed layers (the recomputation would trace "
                "other graphs); use train.compile=layers with train.gradient_checkpointing",
            )
        if self.grad_clip < 0:
            _fail("train.grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        if not 0 <= self.weight_decay < math.inf:
            _fail("train.weight_decay", f"must be >= 0 and finite, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail("train.min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            _fail("train.adam_betas", f"each beta must lie in [0, 1), got {list(self.adam_betas)}")
        if self.max_nonfinite_steps < 1:
            _fail("train.max_nonfinite_steps", f"must be >= 1, got {self.max_nonfinite_steps}")


@dataclass
class EvalConfig:
    """Validation every ``every`` steps; early stopping after ``patience`` evaluations.

    Attributes:
        every: steps between evaluations (the best one selects the best checkpoint).
        patience: stop after this many evaluations without improvement.
        batch_size: sequences (``loss``) or questions (``benchmarks``) per evaluation batch.
        max_batches: with ``kind=loss``, evaluate at most this many validation batches
            (None = all).
        kind: ``loss`` (held-out LM loss, lower is better) or ``benchmarks`` (the paper's:
            mean accuracy over the benchmarks' validation subsets, higher is better; see
            ``docs/eval.md``).
        benchmarks: with ``kind=benchmarks``: ``all`` or a comma list (``arc_easy,csqa``).
        source: where benchmark questions come from: ``offline``, ``hub`` or ``local``
            (as ``launchers/eval.py --source``).
        local_dir: with ``source=local``: ``<dir>/<benchmark>/<split>.jsonl``.
        mode: benchmark scoring, ``letter`` or ``loglik`` (as ``launchers/eval.py --mode``).
        shots: k-shot examples per benchmark question (0 = zero-shot).
        max_questions: cap on questions per benchmark (None = the whole validation subset).
        seed: seed of benchmark subset sampling and shot selection.
    """

    every: int = 200
    patience: int = 10
    batch_size: int = 8
    max_batches: int | None = None
    kind: str = "loss"
    benchmarks: str = "all"
    source: str = "offline"
    local_dir: str | None = None
    mode: str = "letter"
    shots: int = 0
    max_questions: int | None = None
    seed: int = 0

    def validate(self) -> None:
        from hmora_ds.eval.benchmarks import SOURCES, EvalError, parse_benchmarks

        check_types(self, "eval")
        for name in ("every", "patience", "batch_size", "max_batches", "max_questions"):
            value = getattr(self, name)
            if value is not None and value < 1:
                none = " or null (all)" if name in ("max_batches", "max_questions") else ""
                _fail(f"eval.{name}", f"must be a positive integer{none}, got {value}")
        if self.shots < 0:
            _fail("eval.shots", f"must be >= 0 (0 = zero-shot), got {self.shots}")
        if self.kind not in ("loss", "benchmarks"):
            _fail("eval.kind", f"must be 'loss' or 'benchmarks', got {self.kind!r}")
        # The benchmark settings are checked whatever the kind: a typo fails now, not after
        # the model has loaded (the benchmark evaluator is built last).
        try:
            parse_benchmarks(self.benchmarks)
        except EvalError as err:
            _fail("eval.benchmarks", str(err))
        if self.source not in SOURCES:
            _fail("eval.source", f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.mode not in ("letter", "loglik"):
            _fail("eval.mode", f"must be letter or loglik, got {self.mode!r}")
        if self.kind == "benchmarks" and self.source == "local" and not self.local_dir:
            _fail("eval.local_dir", "is required with eval.source=local (<dir>/<benchmark>/…)")


@dataclass
class ParallelConfig:
    """Parallelism beyond data parallelism.

    Attributes:
        ep_size: expert-parallel group size: each MoRA block's experts are split over this
            many ranks (1 = replicated). Needs ZeRO ≤ 2 and top-k routing.
    """

    ep_size: int = 1

    def validate(self) -> None:
        check_types(self, "parallel")
        if not isinstance(self.ep_size, int) or self.ep_size < 1:
            _fail("parallel.ep_size", f"must be a positive integer, got {self.ep_size!r}")


@dataclass
class DistConfig:
    """The distributed runtime: how long a rank may stop answering before the run ends.

    Attributes:
        timeout_s: seconds a collective (all-reduce, barrier) waits for the other ranks before
            the process group gives up (``deepspeed.init_distributed(timeout=...)``; DeepSpeed's
            own default is 600). It bounds every wait, including the other ranks waiting while
            rank 0 downloads or builds assets on a cold cache (``make train`` prepares them
            first). Rank 0's watchdog ends the run (exit code 4) once a rank has not reported
            for this long, naming the rank and its last step.
        watchdog_fraction: rank 0's watchdog warns once a rank has not reported, or has sat at
            the same line, for this fraction of ``timeout_s`` (0 < f <= 1).
        watchdog: run the heartbeats and rank 0's watchdog (multi-rank runs only).
    """

    timeout_s: float = 300.0
    watchdog_fraction: float = 0.5
    watchdog: bool = True

    def validate(self) -> None:
        check_types(self, "dist")  # also refuses a non-boolean watchdog
        if not 0 < self.timeout_s < float("inf"):
            _fail("dist.timeout_s", f"must be > 0 seconds and finite, got {self.timeout_s}")
        if not 0 < self.watchdog_fraction <= 1:
            _fail("dist.watchdog_fraction", f"must lie in (0, 1], got {self.watchdog_fraction}")


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints every ``every`` steps, the last ``keep_last`` kept (plus the best).

    Attributes:
        every: steps between checkpoints (and one at the last step).
        keep_last: newest complete checkpoints kept on disk; the best one is kept as well.
    """

    every: int = 200
    keep_last: int = 2

    def validate(self) -> None:
        check_types(self, "checkpoint")
        if self.every < 1:
            _fail("checkpoint.every", f"must be a positive integer, got {self.every}")
        if self.keep_last < 1:
            _fail("checkpoint.keep_last", f"must be a positive integer, got {self.keep_last}")


#: ``log.progress`` values.
PROGRESS_MODES = ("auto", "bar", "lines", "none")
#: ``log.wandb_mode`` values.
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LogConfig:
    """What a run prints while it trains and where its metrics go besides TensorBoard
    (docs/reliability.md, "Logs"). Nothing here changes what is trained.

    Attributes:
        progress: how rank 0 shows training progress: ``auto`` (a tqdm bar when stderr is a
            terminal; plain log lines otherwise, as under SLURM or ``make train > log``),
            ``bar``, ``lines`` (``step 40/200 (20%) | loss … | ETA 12m50s``) or ``none`` (no
            progress; other log lines, such as evaluations, are still printed). Evaluations
            during training follow it: a bar over the benchmarks, or a line per benchmark.
        progress_every: steps between progress lines; null = ``train.log_every``. Lines are
            also printed at step 1 and at the last step.
        wandb: also log to Weights & Biases (rank 0): the TensorBoard scalars and the run
            config. Needs ``pip install wandb`` (or ``pip install hmora-ds[wandb]``).
        wandb_project: the W&B project.
        wandb_run_name: the W&B run name; null = the name of ``output_dir``.
        wandb_mode: ``offline`` (no network: the run is written under
            ``<output_dir>/wandb``, uploaded later with ``wandb sync``), ``online`` (streams to
            W&B; needs ``wandb login`` or ``WANDB_API_KEY``) or ``disabled``.
    """

    progress: str = "auto"
    progress_every: int | None = None
    wandb: bool = False
    wandb_project: str = "hmora-ds"
    wandb_run_name: str | None = None
    wandb_mode: str = "offline"

    def validate(self) -> None:
        check_types(self, "log")
        if self.progress not in PROGRESS_MODES:
            _fail(
                "log.progress",
                f"must be {', '.join(PROGRESS_MODES[:-1])} or none, got {self.progress!r}",
            )
        every = self.progress_every
        if every is not None and (not isinstance(every, int) or every < 1):
            _fail(
                "log.progress_every",
                f"must be a positive integer or null (train.log_every), got {every!r}",
            )
        if self.wandb_mode not in WANDB_MODES:
            _fail("log.wandb_mode", f"must be offline, online or disabled, got {self.wandb_mode!r}")
        if not self.wandb_project:
            _fail("log.wandb_project", "is empty; give a W&B project name")
        if self.wandb is True:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                _fail(
                    "log.wandb",
                    "is true but wandb is not installed: pip install wandb (or pip install "
                    "hmora-ds[wandb]), or set log.wandb=false",
                )


@dataclass
class RunConfig:
    """Everything one training run needs; saved resolved next to every checkpoint.

    Attributes:
        model: the base model.
        preset: the HMoRA method preset (``hmora_ds/presets/<name>.yaml``: ``hmora_lw``,
            ``hmora``, ``lora_r8`` …) or a YAML / JSON method file; ``method.*`` refine it.
        method: dotted overrides of the preset's method config (adapters, routing, losses).
            In a run-config YAML a mapping without the prefix (``routing.eps: 2``); on the
            command line ``method.routing.eps=2``.
        data: training data.
        train: optimisation.
        eval: validation and early stopping.
        checkpoint: DeepSpeed checkpoints.
        parallel: parallelism beyond data parallelism.
        dist: the distributed runtime (collective timeout, rank 0's watchdog).
        log: progress lines or bar, Weights & Biases (``trainer_log.jsonl``, TensorBoard and
            ``loss_curve.png`` are always written).
        output_dir: the run directory: checkpoints, exported adapters, TensorBoard logs,
            ``summary.json``.
        plugins: Python modules (``my_pkg.my_method``) or ``.py`` files imported before the
            method is resolved, so a run can use a method registered outside hmora-ds
            (``hmora_ds.methods.register_method``; see docs/methods.md). They are code you
            name in your run config; adapters and checkpoints never import anything themselves.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    preset: str = "hmora_lw"
    # ``keys_of``: the dict holds dotted keys of that dataclass (docs/config.md lists them).
    method: dict[str, Any] = field(default_factory=dict, metadata={"keys_of": HMoRAConfig})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output_dir: str = "runs/default"
    plugins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.train.adam_betas, list):
            self.train.adam_betas = tuple(self.train.adam_betas)
        parts = (self.model, self.data, self.train, self.eval, self.checkpoint, self.parallel)
        parts += (self.dist, self.log)
        # Every bad key of every section in one error; then preset + method overrides.
        check_sections(
            lambda: check_types(self, ""),
            *(part.validate for part in parts),
            self._check_combinations,
            self.hmora_config,
        )

    def _check_combinations(self) -> None:
        """Settings of two sections that do not go together."""
        if self.train.compile != "none" and self.parallel.ep_size > 1:
            _fail(
                "train.compile",
                "not available with expert parallelism (parallel.ep_size > 1: its all-to-all "
                "runs inside the adapted blocks); use train.compile=none",
            )

    def hmora_config(self) -> HMoRAConfig:
        """The resolved method config: the preset with ``method`` overrides applied, checked by
        its method (``plugins`` are imported first: they may register it)."""
        from hmora_ds.methods import build_method, import_plugins

        if not isinstance(self.plugins, list) or not all(isinstance(p, str) for p in self.plugins):
            raise ValueError(
                f"plugins: must be a list of modules or .py files, got {self.plugins!r}"
            )
        import_plugins(self.plugins)
        config = load_config(self.preset, dict(self.method) or None)
        build_method(config)
        return config

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["train"]["adam_betas"] = list(self.train.adam_betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        sections = {
            "model": ModelConfig,
            "data": DataConfig,
            "train": TrainConfig,
            "eval": EvalConfig,
            "checkpoint": CheckpointConfig,
            "parallel": ParallelConfig,
            "dist": DistConfig,
            "log": LogConfig,
        }
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"run config: unknown key(s) {unknown}; valid: {sorted(valid)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sections:
                klass = sections[key]
                names = {f.name for f in fields(klass)}
                bad = sorted(set(value or {}) - names)
                if bad:
                    raise ValueError(f"{key}: unknown key(s) {bad}; valid keys: {sorted(names)}")
                kwargs[key] = klass(**(value or {}))
            else:
                kwargs[key] = value
        return cls(**kwargs)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config YAML (or the defaults) and apply dotted overrides.

    ``method.<key>=value`` overrides go to the method config (``method.routing.eps=2``); an
    unknown one is an error naming it as written, and a method key without its ``method.``
    prefix (``routing.eps=2``, as ``python -m hmora_ds.params`` also takes it) an error naming
    the run-config key. The keys are listed in ``docs/config.md``.
    """
    data: dict[str, Any] = RunConfig().to_dict() if path is None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--config: {path} does not exist")
        data = RunConfig.from_dict(yaml.safe_load(path.read_text()) or {}).to_dict()
    method_overrides: dict[str, Any] = dict(data.get("method") or {})
    method_keys = {"method": HMoRAConfig().to_dict()}
    method_top = {f.name for f in fields(HMoRAConfig)}
    plain: list[str] = []
    for item in overrides or []:
        key, value = parse_override(item)
        top = key.split(".")[0]
        if key.startswith("method."):
            apply_overrides(copy.deepcopy(method_keys), {key: value})  # unknown: named as written
            method_overrides[key[len("method.") :]] = value
        elif top not in data and top in method_top:
            raise ValueError(
                f"override {key}: a method key; in a run config write method.{key} "
                "(python -m hmora_ds.params takes both)"
            )
        else:
            plain.append(item)
    apply_overrides(data, plain)
    data["method"] = method_overrides
    return RunConfig.from_dict(data)

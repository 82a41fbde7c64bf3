"""Two sizes of every study: ``cpu`` (the embedded default, minutes per row on 2 cores) and
``paper`` (the paper's protocol, spec §7).

A scale fixes the run config a study starts from, the training overrides that shrink (or
keep) it, and how each trained adapter is evaluated and analysed. Every value can still be
changed from the command line (``--config``, ``--set``, ``--benchmarks`` …).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hmora_ds.resources import CONFIGS_DIR


@dataclass(frozen=True)
class Scale:
    """Defaults of one scale.

    Attributes:
        config: the run config the studies start from.
        overrides: run-config overrides applied before the study's own.
        seeds: default ``--seeds``.
        benchmarks / split / mode / max_questions / max_input_tokens: ``launchers/eval.py``.
        max_per_task: ``--max-per-task`` of the routing analysis (MMLU questions per subject).
        nproc_cpu: ranks per row on a machine without CUDA.
    """

    name: str
    config: Path
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    benchmarks: str
    split: str
    mode: str
    max_questions: int | None
    max_input_tokens: int
    max_per_task: int | None
    nproc_cpu: int


# Measured sizing (docs/ablations.md): SmolLM2-135M + the offline mixture, 2 CPU ranks under
# ZeRO-2. Shorter sequences and 40 steps keep a row (train + evaluate + analyse) to about six
# minutes on 2 busy cores, so a study of 3-10 rows takes tens of minutes. The offline mixture
# keeps the default's size (offline_per_task=1000), so the cached build is reused.
CPU = Scale(
    name="cpu",
    config=CONFIGS_DIR / "default.yaml",
    overrides=(
        "data.max_input_tokens=128",
        "data.max_output_tokens=32",
        "train.max_steps=40",
        "train.warmup_steps=4",
        "train.log_every=5",
        "train.router_stats_every=20",
        "eval.every=20",
        "eval.max_batches=2",
        "checkpoint.every=20",
        "checkpoint.keep_last=1",
    ),
    seeds=(0,),
    # The benchmarks whose train splits the offline mixture holds; option log-likelihood,
    # since a 135 M model does not answer with letters (docs/eval.md). MMLU stays unseen and
    # is where the routing analysis looks for task recognition.
    benchmarks="arc-c,arc-e,obqa,csqa",
    split="test",
    mode="loglik",
    max_questions=60,
    max_input_tokens=512,
    max_per_task=4,
    nproc_cpu=2,
)

# The paper: Qwen2-1.5B, its run config as it is (lr 2e-5 after 500 warm-up steps, then
# constant, ≤ 10,000 steps, the best checkpoint by mean validation accuracy of the benchmarks
# every 200 steps, patience 10), tested on the full test subsets, 5 seeds, 100 MMLU questions
# per subject for the routing analysis (appendix E.8). The runner points the validation at the
# study's --benchmarks / --mode / --source.
PAPER = Scale(
    name="paper",
    config=CONFIGS_DIR / "paper_qwen2_1.5b.yaml",
    overrides=(),
    seeds=(0, 1, 2, 3, 4),
    benchmarks="all",
    split="test",
    mode="letter",
    max_questions=None,
    max_input_tokens=1024,
    max_per_task=100,
    nproc_cpu=2,
)

SCALES = {"cpu": CPU, "paper": PAPER}

"""The paper's evaluation subsets (spec §7) and the manifest of the chosen question ids.

Each benchmark's ``validation`` and ``test`` subset is drawn from an original split:

| benchmark | validation | test |
|---|---|---|
| MMLU | 300 sampled from validation | 2000 sampled from test |
| MMLU-Pro | validation (70) | 2000 sampled from test |
| ARC-C / ARC-E / OpenBookQA | validation | test |
| SWAG | 300 sampled from validation | 2000 sampled from validation, disjoint |
| CommonsenseQA | 300 sampled from validation | 900 sampled from validation, disjoint |

Sampling is a seeded permutation of the original split (seed string
``"<seed>:<benchmark>:<original split>"``, independent of everything else). When both subsets
come from one original split, validation takes the permutation's first ``n_val`` questions and
test the next ``n_test``: disjoint by construction. A sampled subset keeps the permutation's
order (so ``max_questions`` takes a uniform sample of it); a whole split keeps its own order.
A split smaller than the paper's subsets (e.g. a small local file) is shared in the paper's
proportion; the manifest records the sizes actually used.

The manifest (``manifest.json``, written with every result) lists the ids evaluated; passing it
back (``--manifest``) evaluates exactly the same questions.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmora_ds.eval.benchmarks import BenchmarkData, EvalError, Question

SPLITS = ("validation", "test")


@dataclass(frozen=True)
class SubsetSpec:
    """Where one paper subset comes from: original split and size (``None``: all of it)."""

    split: str
    size: int | None = None


#: Spec §7, per benchmark and paper split.
PAPER_SUBSETS: dict[str, dict[str, SubsetSpec]] = {
    "mmlu": {"validation": SubsetSpec("validation", 300), "test": SubsetSpec("test", 2000)},
    "mmlu_pro": {"validation": SubsetSpec("validation"), "test": SubsetSpec("test", 2000)},
    "arc_challenge": {"validation": SubsetSpec("validation"), "test": SubsetSpec("test")},
    "arc_easy": {"validation": SubsetSpec("validation"), "test": SubsetSpec("test")},
    "openbookqa": {"validation": SubsetSpec("validation"), "test": SubsetSpec("test")},
    "swag": {"validation": SubsetSpec("validation", 300), "test": SubsetSpec("validation", 2000)},
    "commonsense_qa": {
        "validation": SubsetSpec("validation", 300),
        "test": SubsetSpec("validation", 900),
    },
}


def subset_spec(bench: str, split: str) -> SubsetSpec:
    if split not in SPLITS:
        raise EvalError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return PAPER_SUBSETS[bench][split]


def _permutation(n: int, seed: int, bench: str, orig_split: str) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}:{bench}:{orig_split}").shuffle(order)
    return order


def _window(bench: str, split: str, n: int) -> tuple[int, int]:
    """Start and size of ``split``'s subset in the permutation of an ``n``-question split.

    Validation comes first, then test: disjoint when both come from one original split. A
    split smaller than both subsets together (a small local file) is divided in the paper's
    proportion, each side keeping at least one question.
    """
    spec = PAPER_SUBSETS[bench][split]
    assert spec.size is not None
    val, test = PAPER_SUBSETS[bench]["validation"], PAPER_SUBSETS[bench]["test"]
    if val.split != test.split or val.size is None or test.size is None:
        return 0, min(spec.size, n)
    if n < 2:
        raise EvalError(f"{bench} [{val.split}] has {n} question(s): too few for two subsets")
    n_val = val.size
    if val.size + test.size > n:
        n_val = min(n - 1, max(1, round(n * val.size / (val.size + test.size))))
    if split == "validation":
        return 0, n_val
    return n_val, min(test.size, n - n_val)


def select_subset(
    data: BenchmarkData, split: str, seed: int = 0, max_questions: int | None = None
) -> list[Question]:
    """The paper's ``split`` subset of ``data`` (an original split loaded for it).

    Args:
        data: The original split :func:`subset_spec` names.
        split: ``validation`` or ``test`` (the paper's).
        seed: Sampling seed.
        max_questions: Keep at most this many (a prefix of the subset, see module docstring).
    """
    spec = subset_spec(data.benchmark, split)
    if data.split != spec.split:
        raise EvalError(
            f"{data.benchmark} {split} subset comes from {spec.split!r}, got {data.split!r}"
        )
    qs = data.questions
    if spec.size is not None:
        order = _permutation(len(qs), seed, data.benchmark, spec.split)
        start, size = _window(data.benchmark, split, len(qs))
        qs = [qs[i] for i in order[start : start + size]]
    if max_questions is not None:
        if max_questions < 1:
            raise EvalError(f"max_questions must be >= 1, got {max_questions}")
        qs = qs[:max_questions]
    return list(qs)


def select_from_manifest(data: BenchmarkData, ids: list[str]) -> list[Question]:
    """The questions named by a manifest, in its order (every id must exist)."""
    by_id = {q.id: q for q in data.questions}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise EvalError(
            f"{data.benchmark}: {len(missing)} manifest ids are not in {data.source} "
            f"(e.g. {missing[:3]})"
        )
    return [by_id[i] for i in ids]


def manifest_entry(
    data: BenchmarkData, split: str, questions: list[Question], seed: int, max_questions: int | None
) -> dict[str, Any]:
    spec = subset_spec(data.benchmark, split)
    return {
        "split": split,
        "source_split": data.split,
        "source": data.source,
        "stand_in": data.stand_in,
        "paper_size": spec.size if spec.size is not None else len(data.questions),
        "source_size": len(data.questions),
        "seed": seed,
        "max_questions": max_questions,
        "num_questions": len(questions),
        "ids": [q.id for q in questions],
    }


def write_manifest(path: Path, entries: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps({**meta, "benchmarks": entries}, indent=1) + "\n")


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EvalError(f"cannot read the manifest {path}: {err}") from None
    if not isinstance(m.get("benchmarks"), dict):
        raise EvalError(f"{path}: not an evaluation manifest (no 'benchmarks' object)")
    return m

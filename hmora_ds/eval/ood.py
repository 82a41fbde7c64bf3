"""In and out of distribution: which evaluation benchmarks a run trained on, and proof that the
others share nothing with its training data.

The offline mixture's tasks (:data:`hmora_ds.data.offline_tasks.TASKS`) and the evaluation
benchmarks (:data:`hmora_ds.eval.benchmarks.BENCHMARKS`) have different names; this is the one
mapping between them:

| offline task | benchmark | note |
|---|---|---|
| ``arc_easy`` | ``arc_easy`` (ARC-E) | one ARC question pool with ARC-C, split by difficulty |
| ``arc_challenge`` | ``arc_challenge`` (ARC-C) | |
| ``openbookqa`` | ``openbookqa`` (OpenBook) | |
| ``commonsense_qa`` | ``commonsense_qa`` (Comm) | |
| ``hellaswag`` | ``swag`` (SWAG) | offline HellaSwag is SWAG's stand-in; the hub has SWAG |
| ``piqa``, ``social_iqa``, ``boolq``, ``winogrande`` | none | training only |
| none | ``mmlu``, ``mmlu_pro`` | never in the mixture: always out of distribution |

A benchmark is **in distribution** (ID) when its task is among the run's training tasks: its
evaluation questions are then held-out questions of a trained task (the mixture's builder
drops every training document that matches one of the task's evaluation documents). It is
**out of distribution** (OOD) when no training task maps to it. :func:`shared_questions`
checks the second claim on the records a run really trains on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hmora_ds.eval.benchmarks import BENCHMARKS, DISPLAY, OFFLINE_TASK, Question

#: offline task → the benchmark that evaluates it (the inverse of ``OFFLINE_TASK``).
TASK_BENCHMARK: dict[str, str] = {task: bench for bench, task in OFFLINE_TASK.items()}
#: Tasks drawn from one question pool: training one of them makes the other a near neighbour
#: rather than a new distribution (ARC-Easy and ARC-Challenge split the ARC questions by
#: difficulty).
SAME_POOL: dict[str, str] = {"arc_easy": "arc_challenge", "arc_challenge": "arc_easy"}


def training_tasks(data: Any) -> list[str]:
    """The offline tasks a run's data config trains on (``data.tasks`` minus
    ``data.exclude_tasks``; every task of the mixture when ``data.tasks`` is null)."""
    from hmora_ds.data.offline_tasks import TASKS

    include = list(TASKS) if data.tasks is None else list(data.tasks)
    return [t for t in include if t not in set(data.exclude_tasks)]


@dataclass(frozen=True)
class Split:
    """The evaluated benchmarks divided by whether the run trained on their task.

    Attributes:
        id: benchmarks whose task is a training task (paper order).
        ood: benchmarks with no training task.
        notes: caveats in words (a held-out benchmark that shares its question pool with a
            trained one).
    """

    id: tuple[str, ...]
    ood: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def of(self, bench: str) -> str:
        return "ID" if bench in self.id else "OOD"


def split_benchmarks(benchmarks: Iterable[str], train_tasks: Iterable[str]) -> Split:
    """Divide ``benchmarks`` into ID and OOD for a run that trains on ``train_tasks``."""
    trained = set(train_tasks)
    chosen = set(benchmarks)
    ordered = [b for b in BENCHMARKS if b in chosen]
    ident = tuple(b for b in ordered if OFFLINE_TASK.get(b) in trained)
    ood = tuple(b for b in ordered if b not in ident)
    notes = []
    for b in ood:
        sibling = SAME_POOL.get(OFFLINE_TASK.get(b, ""))
        if sibling in trained:
            notes.append(
                f"{DISPLAY[b]} is held out but {sibling} trains, and both come from one question "
                "pool: a near neighbour, not a new distribution"
            )
    return Split(ident, ood, tuple(notes))


def _question_text(q: Question) -> str:
    from hmora_ds.data.offline_tasks import norm_text

    # HellaSwag's question is "<activity label>: <context>"; the context is what a training
    # record would hold.
    text = q.question.partition(": ")[2] if q.id.startswith("hellaswag/") else q.question
    return norm_text(text)


def shared_questions(
    questions: Iterable[Question],
    records: Iterable[dict],
    min_chars: int = 20,
    require_answer: bool = True,
) -> list[tuple[str, str]]:
    """Evaluation questions that a training record holds: ``(question id, record id)`` pairs.

    A record holds a question when its normalised text (prompt and target, lower case,
    alphanumerics only) contains the question's normalised text and, with ``require_answer``,
    its correct answer's: a template may leave the other options out but shows the question
    and, as text or as a letter, the answer. ``require_answer=False`` is the stricter check
    (the question alone); it also reports different questions that share a generic stem.
    Questions whose normalised text is shorter than ``min_chars`` (stems such as "Which is
    true?") are not searched: any record could contain them.
    """
    from hmora_ds.data.offline_tasks import norm_text

    texts = [
        (str(r.get("id")), norm_text(f"{r.get('source', '')} {r.get('target', '')}"))
        for r in records
    ]
    # One string to search: C-speed substring search instead of a loop over records.
    starts, pos = [], 0
    for _, t in texts:
        starts.append(pos)
        pos += len(t) + 1
    joined = "\x00".join(t for _, t in texts)
    import bisect

    hits = []
    for q in questions:
        needle = _question_text(q)
        if len(needle) < min_chars:
            continue
        answer = norm_text(q.options[q.answer])
        i = joined.find(needle)
        while i != -1:
            k = bisect.bisect_right(starts, i) - 1
            rid, text = texts[k]
            if not require_answer or answer in text:
                hits.append((q.id, rid))
                break
            i = joined.find(needle, starts[k] + len(text) + 1)  # the next record on
    return hits

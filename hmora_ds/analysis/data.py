"""Labelled prompts for the routing analysis: MMLU subjects, a user file, or the training mixture.

* ``mmlu`` (default): the 57 MMLU subjects from the offline evaluation packages, each subject a
  task — the paper's appendix E.8 setting (tasks unseen in training, 100 questions each);
* a ``.jsonl`` / ``.json`` file whose records carry a task column and a prompt;
* ``offline``: the offline training mixture of ``make train`` (its ``task_name`` per record).

At most ``max_per_task`` examples per task are drawn with a seeded sample, so the same command
analyses the same prompts.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hmora_ds.analysis.collect import AnalysisError, RoutingExample

logger = logging.getLogger(__name__)

#: Prompt fields tried in order when ``prompt_field`` is not given.
PROMPT_FIELDS = ("prompt", "question", "source")
#: The offline mixture ``make train`` builds (configs/default.yaml: offline_per_task, seed).
OFFLINE_PER_TASK = 1000
OFFLINE_SEED = 42


def question_prompt(question: str, options: Iterable[str] = ()) -> str:
    """A multiple-choice question as the user message: question, lettered options, ``Answer:``.

    No subject line: evaluation prompts name the MMLU subject, which would hand the task label
    to the task encoder; the analysis asks whether routing tells the tasks apart from the
    questions alone.
    """
    from hmora_ds.eval.benchmarks import LETTERS

    lines = [f"Question: {question.strip()}"]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    lines.append("Answer:")
    return "\n".join(lines)


def sample_per_task(
    examples: list[RoutingExample], max_per_task: int | None, seed: int
) -> list[RoutingExample]:
    """At most ``max_per_task`` examples of each task (a seeded sample; input order kept)."""
    if max_per_task is None:
        return examples
    if max_per_task < 1:
        raise AnalysisError("--max-per-task: must be a positive number of examples")
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.task, []).append(i)
    keep: set[int] = set()
    for task in sorted(by_task):
        idx = by_task[task]
        # One RNG per task, seeded by (seed, task): adding a task does not change the others.
        rng = random.Random(f"{seed}:{task}")
        keep.update(idx if len(idx) <= max_per_task else rng.sample(idx, max_per_task))
    return [ex for i, ex in enumerate(examples) if i in keep]


def mmlu_examples(split: str = "test") -> list[RoutingExample]:
    """Every MMLU question of ``split`` from the offline packages, task = subject."""
    from hmora_ds.eval.benchmarks import load_benchmark

    data = load_benchmark("mmlu", split, "offline")
    return [
        RoutingExample(q.subject or "all", question_prompt(q.question, q.options))
        for q in data.questions
    ]


def _read_file(path: Path) -> list[Any]:
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise AnalysisError(
                            f"--data: {path}:{n} is not valid JSON ({err})"
                        ) from None
        return rows
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise AnalysisError(f"--data: {path} must hold a JSON list of records")
        return rows
    raise AnalysisError(f"--data: {path} must be .jsonl or .json (or 'mmlu' / 'offline')")


def file_examples(
    path: str | Path, task_field: str = "task", prompt_field: str | None = None
) -> list[RoutingExample]:
    """Records of a JSONL / JSON file: ``task_field`` and a prompt field (``options`` optional).

    Raises:
        AnalysisError: unreadable file, or a record without the task or prompt field.
    """
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(
            f"--data: {path} does not exist (give a .jsonl/.json file, 'mmlu' or 'offline')"
        )
    rows = _read_file(path)
    if not rows:
        raise AnalysisError(f"--data: {path} has no records")
    fields = (prompt_field,) if prompt_field else PROMPT_FIELDS
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{path} record {n}"
        if not isinstance(row, dict):
            raise AnalysisError(f"--data: {where} is not an object")
        if row.get(task_field) is None:
            raise AnalysisError(
                f"--data: {where} has no task column {task_field!r}; name it with --task-field "
                f"(fields here: {sorted(row)})"
            )
        key = next((k for k in fields if isinstance(row.get(k), str) and row[k].strip()), None)
        if key is None:
            raise AnalysisError(
                f"--data: {where} has no prompt (a non-empty {' / '.join(fields)} field); "
                "name it with --prompt-field"
            )
        options = row.get("options")
        prompt = (
            question_prompt(row[key], options)
            if isinstance(options, list) and options
            else row[key]
        )
        out.append(RoutingExample(str(row[task_field]), prompt))
    return out


def offline_examples() -> list[RoutingExample]:
    """The offline training mixture of ``make train`` (built into the cache if missing)."""
    from hmora_ds.data.offline import ensure_offline_mixture
    from hmora_ds.data.records import DATA_FILE

    directory = ensure_offline_mixture(OFFLINE_PER_TASK, OFFLINE_SEED)
    return file_examples(directory / DATA_FILE, task_field="task_name", prompt_field="source")


def load_examples(
    data: str,
    *,
    task_field: str = "task",
    prompt_field: str | None = None,
    max_per_task: int | None = 100,
    seed: int = 0,
    mmlu_split: str = "test",
) -> list[RoutingExample]:
    """The examples named by ``--data`` (``mmlu``, ``offline`` or a file), sampled per task."""
    if data == "mmlu":
        examples = mmlu_examples(mmlu_split)
    elif data == "offline":
        examples = offline_examples()
    else:
        examples = file_examples(data, task_field, prompt_field)
    picked = sample_per_task(examples, max_per_task, seed)
    logger.info(
        "data %s: %d examples of %d tasks (of %d)",
        data,
        len(picked),
        len({ex.task for ex in picked}),
        len(examples),
    )
    return picked

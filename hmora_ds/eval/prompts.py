"""One prompt per benchmark: the *user message*; the tokenizer's chat template wraps it exactly
as training wraps a source (:class:`hmora_ds.data.collate.ChatEncoder`).

Two styles:

* ``letter`` (default mode): the options are listed with letters and the prompt ends with
  ``Answer:``; the assistant's first token is the predicted letter::

      The following are multiple choice questions about high school physics. Answer with the
      letter of the correct option.

      Question: <shot question>
      A. <option>
      B. <option>
      Answer: B

      Question: <question>
      A. ...
      Answer:

* ``cloze`` (log-likelihood mode, lm-eval / OLMES style): ``Question: <q>\nAnswer:`` with no
  options and no instruction (MMLU keeps its subject line); each option text is scored as the
  assistant's answer. Shots show ``Answer: <option text>``.

k-shot examples come from the benchmark's training / dev split, sampled per question with a
seed derived from the question id (so a question gets the same shots on every rank and run);
for MMLU / MMLU-Pro from the question's own subject when that subject has examples.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from hmora_ds.eval.benchmarks import LETTERS, EvalError, Question

_TOPIC = {
    "arc_challenge": "science",
    "arc_easy": "science",
    "openbookqa": "elementary science",
    "commonsense_qa": "commonsense knowledge",
}


def _header(q: Question, style: str) -> str:
    if q.benchmark == "swag":
        head = "Each of the following describes the start of a situation; choose its most "
        head += "plausible continuation."
    elif q.subject is not None:
        head = f"The following are multiple choice questions about {q.subject.replace('_', ' ')}."
    else:
        head = f"The following are multiple choice questions about {_TOPIC[q.benchmark]}."
    if style == "letter":
        head += " Answer with the letter of the correct option."
    return head


def _block(q: Question, style: str, with_answer: bool) -> str:
    label = "Context" if q.benchmark == "swag" else "Question"
    lines = [f"{label}: {q.question.strip()}"]
    if style == "letter":
        lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(q.options)]
        answer = LETTERS[q.answer]
    else:
        answer = q.options[q.answer]
    lines.append(f"Answer: {answer}" if with_answer else "Answer:")
    return "\n".join(lines)


def build_prompt(q: Question, style: str = "letter", shots: Sequence[Question] = ()) -> str:
    """The user message for ``q`` (``style``: ``letter`` or ``cloze``) with k-shot examples."""
    if style not in ("letter", "cloze"):
        raise EvalError(f"prompt style must be 'letter' or 'cloze', got {style!r}")
    # Cloze prompts follow lm-eval / OLMES: a subject line for MMLU only, no instruction.
    parts = [_header(q, style)] if style == "letter" or q.subject is not None else []
    parts += [_block(s, style, with_answer=True) for s in shots]
    parts.append(_block(q, style, with_answer=False))
    return "\n\n".join(parts)


class ShotSampler:
    """Picks ``k`` examples for a question from a pool (never the question itself)."""

    def __init__(self, pool: Sequence[Question], k: int, seed: int = 0) -> None:
        if k < 0:
            raise EvalError(f"shots must be >= 0, got {k}")
        if k and not pool:
            raise EvalError("k-shot prompting needs a non-empty pool of examples")
        self.k = k
        self.seed = seed
        self.pool = list(pool)
        self.by_subject: dict[str | None, list[Question]] = {}
        for q in self.pool:
            self.by_subject.setdefault(q.subject, []).append(q)

    def __call__(self, q: Question) -> list[Question]:
        if not self.k:
            return []
        pool = self.by_subject.get(q.subject) or self.pool
        pool = [p for p in pool if p.id != q.id and p.question != q.question]
        if len(pool) < self.k:
            raise EvalError(f"{q.benchmark}: only {len(pool)} examples for {self.k}-shot prompts")
        return random.Random(f"{self.seed}:{q.benchmark}:{q.id}").sample(pool, self.k)

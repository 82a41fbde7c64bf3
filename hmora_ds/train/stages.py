"""Two-stage training (HiMoLE, section 3.3, algorithm 1), decided before the model is built.

A method with a first stage (:meth:`~hmora_ds.methods.Method.stage1_steps` > 0) needs the
number of expert groups N before its model exists (``adapter.num_experts = N·M``), so the
trainer calls :func:`plan_stages` after the data are encoded and before the engine is built:

* a fresh run: rank 0 embeds the training prompts (``options.sentence_encoder``: the frozen
  base model, loaded once more outside ZeRO, or a sentence-transformers model) and clusters
  them with K-means (:mod:`hmora_ds.cluster`: N fixed, or chosen by silhouette among
  ``options.cluster_candidates``), with a progress bar, and saves the clustering as
  ``<output_dir>/clustering.json``; the other ranks wait at a barrier (the run's
  ``dist.timeout_s``, or the rank watch) and load that file;
* ``--resume``: every rank loads the clustering saved in the checkpoint (never clusters again);
  a config that does not allow its N, other training data or another encoder is refused.

The method config is then rebuilt with ``options.groups = N`` and ``adapter.num_experts =
N·M``; each training example's cluster reaches its batches as ``cluster`` for the first
``stage1_steps`` optimizer steps (the trainer drops it afterwards).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmora_ds.config import HMoRAConfig
from hmora_ds.methods.base import CLUSTER_INPUT, build_method  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

#: The clustering's file in the run directory and in every checkpoint.
CLUSTERING_FILE = "clustering.json"


@dataclass(frozen=True)
class StagePlan:
    """A two-stage run.

    Attributes:
        stage1_steps: optimizer steps 0 … stage1_steps − 1 route each sequence to its cluster.
        clustering: the K-means partition of the training examples (labels in dataset order).
        method: the method config with ``groups`` = N and ``adapter.num_experts`` = N·M.
        document: the clustering file's content (saved again in every checkpoint).
        stage2_lr_scale: stage 2's learning-rate multiplier.
    """

    stage1_steps: int
    clustering: Any
    method: HMoRAConfig
    document: dict[str, Any]
    stage2_lr_scale: float

    def summary(self) -> dict[str, Any]:
        """The ``clustering`` entry of ``summary.json``."""
        c = self.clustering
        return {
            "chosen_n": int(c.chosen_n),
            "groups": int(c.chosen_n),
            "num_experts": self.method.adapter.num_experts,
            "sizes": [int(s) for s in c.sizes],
            "silhouette": {str(k): float(v) for k, v in sorted(c.silhouette.items())},
            "encoder": c.encoder,
            "seed": int(c.seed),
            "stage1_steps": self.stage1_steps,
            "stage2_lr_scale": self.stage2_lr_scale,
            "file": CLUSTERING_FILE,
        }


def with_groups(config: HMoRAConfig, n: int) -> HMoRAConfig:
    """``config`` with ``options.groups = n`` and ``adapter.num_experts = n·M``."""
    data = config.to_dict()
    m = int(data["options"].get("experts_per_group", 4))
    data["options"] = {**data["options"], "groups": n}
    data["adapter"] = {**data["adapter"], "num_experts": n * m}
    return HMoRAConfig.from_dict(data)


def _check_saved(c: Any, options: Any, n_examples: int, path: Path) -> None:
    """The resumed run's clustering must fit this run's config and data (one-line errors)."""
    n, cands = c.chosen_n, list(options.cluster_candidates)
    if (cands and n not in cands) or (not cands and n != options.groups):
        field = "cluster_candidates" if cands else "groups"
        allowed = cands if cands else options.groups
        raise ValueError(
            f"method.options.{field}: the run being resumed clustered its prompts into N={n} "
            f"({path}), this config asks for {allowed}; resume with a setting that allows "
            f"N={n} or start a new run"
        )
    if len(c.labels) != n_examples:
        raise ValueError(
            f"data: the run being resumed clustered {len(c.labels)} training examples "
            f"({path}), this run has {n_examples}; resume with the same data settings"
        )
    base = options.sentence_encoder == "base"
    if base != c.encoder.startswith("base:") or (
        not base and c.encoder != options.sentence_encoder
    ):
        raise ValueError(
            f"method.options.sentence_encoder: {options.sentence_encoder!r}, but the run being "
            f"resumed embedded its prompts with {c.encoder!r} ({path}); resume with that encoder"
        )


def _compute(run: Any, options: Any, info: Any, checkpoint: str, tokenizer: Any,
             prompts: list[str]) -> Any:  # fmt: skip
    """Embed and cluster the training prompts (rank 0)."""
    import torch

    from hmora_ds.cluster import cluster_prompts
    from hmora_ds.runtime.loading import load_base_model, torch_dtype

    model = None
    if options.sentence_encoder == "base":
        dtype = torch_dtype(run.model.dtype, info.device.type == "cuda")
        model = load_base_model(checkpoint, dtype, run.model.attn_implementation, None)
        model.to(info.device)
    cands = list(options.cluster_candidates)
    logger.info(
        "HiMoLE stage 1: embedding %d training prompts (%s) and clustering them (N %s)",
        len(prompts),
        options.sentence_encoder,
        f"by silhouette among {cands}" if cands else f"= {options.groups}",
    )
    try:
        c, _ = cluster_prompts(
            prompts,
            cands or options.groups,
            encoder=options.sentence_encoder,
            model=model,
            tokenizer=tokenizer,
            seed=options.cluster_seed,
            max_groups=options.max_experts // options.experts_per_group,
            max_tokens=run.data.max_input_tokens,
            device=info.device,
            progress=True,
        )
    except ValueError as err:
        field = "cluster_candidates" if cands else "groups"
        raise ValueError(f"method.options.{field}: stage-1 clustering failed: {err}") from None
    finally:
        del model
        if info.device.type == "cuda":
            torch.cuda.empty_cache()
    return c


def plan_stages(
    run: Any, method: HMoRAConfig, info: Any, checkpoint: str, tokenizer: Any,
    prompts: list[str], resume: Any,
) -> StagePlan | None:  # fmt: skip
    """The run's two stages (see the module doc), or None for a one-stage method.

    Args:
        run: the run config.
        method: the method config (``groups`` not yet the clustering's).
        info: this process's rank and device.
        checkpoint, tokenizer: the base model (the ``base`` encoder embeds with them).
        prompts: the raw prompt of every training example, in dataset order.
        resume: the checkpoint to resume from, or None.

    Raises:
        ValueError: one line naming the setting (a starting adapter, a clustering that does
            not fit the config, a checkpoint without one, a failed clustering).
    """
    from hmora_ds.cluster import Clustering
    from hmora_ds.runtime.dist import rank0_first

    obj = build_method(method)
    steps = obj.stage1_steps(run.train.max_steps)
    options = obj.options
    if steps == 0:
        if getattr(options, "stage1_fraction", 0) > 0:
            raise ValueError(
                f"method.options.stage1_fraction: {options.stage1_fraction} × train.max_steps="
                f"{run.train.max_steps} leaves no stage-1 step; raise one or set it to 0"
            )
        return None
    if run.model.adapter:
        raise ValueError(
            f"model.adapter: method {method.method} trains in two stages from fresh adapters "
            "(its config says options.stage1_fraction > 0); continue that run with --resume, "
            "or start from an adapter trained in one stage"
        )
    out = Path(run.output_dir) / CLUSTERING_FILE

    def resolve() -> Clustering:
        if resume is not None:
            saved = Path(resume.tag_dir) / CLUSTERING_FILE
            if not saved.is_file():
                raise ValueError(
                    f"--resume: {resume.tag_dir} has no {CLUSTERING_FILE} (not a two-stage "
                    f"run's checkpoint); resume it with method.options.stage1_fraction=0"
                )
            c = Clustering.load(saved)
            _check_saved(c, options, len(prompts), saved)
            if info.rank == 0 and not (out.is_file() and Clustering.load(out) == c):
                c.save(out)  # the run directory's copy (a checkpoint of another directory)
            return c
        if info.rank != 0:
            return Clustering.load(out)
        c = _compute(run, options, info, checkpoint, tokenizer, prompts)
        out.parent.mkdir(parents=True, exist_ok=True)
        c.save(out)
        return c

    clustering = rank0_first(resolve, info.rank) if info.world_size > 1 else resolve()
    logger.info(
        "HiMoLE two-stage training: %s; steps 1-%d stage 1 (each group trained on its "
        "cluster), %d-%d stage 2 (all experts and both routers, lr x %s)%s",
        clustering.summary(),
        steps,
        steps + 1,
        run.train.max_steps,
        options.stage2_lr_scale,
        " (resumed: clustering loaded)" if resume is not None else "",
    )
    document = json.loads(out.read_text(encoding="utf-8"))
    return StagePlan(
        steps, clustering, with_groups(method, clustering.chosen_n), document,
        options.stage2_lr_scale,
    )  # fmt: skip

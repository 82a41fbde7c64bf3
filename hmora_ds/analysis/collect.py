"""Run an HMoRA model over labelled prompts and summarise its routing (spec §9).

Shapes: ``B`` batch, ``T`` tokens, ``E`` experts, ``N`` analysed examples.

:func:`collect_routing` runs the model (eval mode, no grad, batched) on the prompts only — what
the model sees at generation time, so the task routers read exactly the task representation they
use when answering — and keeps, per router, the Σ-moments of :class:`RouterStatsAccumulator`
(balance, certainty, top-k load over every valid token or sequence) and, per task router, the
(N, E) probabilities of every example (for the main expert pairs and t-SNE).
:func:`summarize_routing` turns that into the ``routing.json`` document (schema in
``docs/analysis.md``); :func:`analyze_routing` does both.

Which router the MEP and t-SNE use: the paper's figure 4 takes "the final task router", "the
task router in the last layer", and appendix E.8 analyses "the task router's routing results"
with the same setup. Here that is the task router of the last layer that has task routers,
and within that layer the router serving the last dense layer in forward order (q, k, v, o,
gate, up, down) — with the lightweight design's router sharing, ``layerNN.gate_up.task``. It
can be overridden (``router=``). The pair is read from the router's own probabilities p: in the
paper's last layers (α > β_high, task routing only) the top-k of p are exactly the experts that
the gate activates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hmora_ds.analysis.stats import between_task_share, main_expert_pairs, recognition_rates
from hmora_ds.config import TARGETS
from hmora_ds.metrics import RouterStatsAccumulator
from hmora_ds.routing.context import RouterId, RoutingRecord

logger = logging.getLogger(__name__)


#: ``layer03.q_k_v.token``: layer index, the dense layers served, router kind.
class AnalysisError(ValueError):
    """A user error in the routing analysis inputs (data, router, adapter)."""


@dataclass(frozen=True)
class RoutingExample:
    """One prompt to route and the task it belongs to (never shown to the model)."""

    task: str
    prompt: str


def parse_router_name(name: str) -> tuple[int, str, str]:
    """``layer03.q_k_v.token`` → ``(3, "q_k_v", "token")`` (see :class:`RouterId`)."""
    rid = RouterId.parse(name)
    return rid.layer, "_".join(rid.targets), rid.kind


def _router_order(name: str) -> tuple[int, int, int]:
    rid = RouterId.parse(name)
    last = rid.targets[-1]
    pos = TARGETS.index(last) if last in TARGETS else len(TARGETS)
    return rid.layer, pos, 0 if rid.kind == "token" else 1


def sorted_routers(names: Sequence[str]) -> list[str]:
    """Router names in forward order: by layer, then dense layer, token before task."""
    return sorted(names, key=_router_order)


def final_task_router(names: Sequence[str]) -> str | None:
    """The paper's "final task router" among ``names`` (see the module docstring), or None."""
    task = [n for n in names if parse_router_name(n)[2] == "task"]
    return sorted_routers(task)[-1] if task else None


@dataclass
class RoutingCollection:
    """What one pass over the examples gathered.

    Attributes:
        tasks: task of each analysed example (N), in the order of the input examples.
        stats: router → ``balance``, ``certainty``, ``load`` (E,), ``count`` (tensors).
        task_gates: task router → (N, E) probabilities, rows aligned with ``tasks``.
        top_k: experts per decision used for loads and pairs.
        routing_mode: ``topk`` or ``soft``.
        skipped: examples whose prompt could not fit ``max_input_tokens``.
        task_stats: with ``per_task``: task → router → the same statistics over that task's
            examples only (None without).
    """

    tasks: list[str]
    stats: dict[str, dict[str, torch.Tensor]]
    task_gates: dict[str, torch.Tensor]
    top_k: int
    routing_mode: str
    skipped: int = 0
    notes: list[str] = field(default_factory=list)
    task_stats: dict[str, dict[str, dict[str, torch.Tensor]]] | None = None


def _as_example(ex: Any, i: int) -> RoutingExample:
    if isinstance(ex, RoutingExample):
        return ex
    if isinstance(ex, Mapping) and "task" in ex and "prompt" in ex:
        return RoutingExample(str(ex["task"]), str(ex["prompt"]))
    raise AnalysisError(f"examples[{i}]: needs a 'task' and a 'prompt' (got {type(ex).__name__})")


def _encode(tokenizer: Any, examples: list[RoutingExample], max_input_tokens: int):
    from hmora_ds.data.collate import ChatEncoder, EncodeConfig

    # The prompt exactly as training and generation wrap a source (chat template, left cut).
    encoder = ChatEncoder(tokenizer, EncodeConfig(max_input_tokens=max_input_tokens))
    encoded, skipped = [], 0
    for i, ex in enumerate(examples):
        enc = encoder.encode_generation_prompt(ex.prompt)
        if enc is None:
            skipped += 1
        else:
            encoded.append((i, enc))
    return encoded, skipped


@torch.no_grad()
def collect_routing(
    model: Any,
    tokenizer: Any,
    examples: Sequence[RoutingExample | Mapping[str, str]],
    *,
    batch_size: int = 8,
    max_input_tokens: int = 512,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
    per_task: bool = False,
) -> RoutingCollection:
    """Route every example's prompt through ``model`` and gather the statistics.

    Args:
        model: an :class:`~hmora_ds.model.HMoRAModel` (e.g. from ``load_adapter``); put in
            eval mode here (router and adapter dropout off).
        tokenizer: its tokenizer (with a chat template).
        examples: :class:`RoutingExample` or mappings with ``task`` and ``prompt``.
        batch_size: prompts per forward (grouped by length to limit padding).
        max_input_tokens: longer prompts are cut from the left like in training.
        progress: show a tqdm bar.
        autocast_dtype: bf16 autocast on GPU as in training and evaluation (None: off); the
            routers compute their softmax in fp32 either way.
        per_task: also every router's statistics over each task's examples alone
            (:attr:`RoutingCollection.task_stats`).
    """
    from tqdm.auto import tqdm

    from hmora_ds.data.collate import DataCollator
    from hmora_ds.model import HMoRAModel

    if not isinstance(model, HMoRAModel):
        raise AnalysisError(
            f"model: routing analysis needs an HMoRAModel, got {type(model).__name__}; "
            "load the base with hmora_ds.adapter_io.load_adapter(base, adapter_dir)"
        )
    if batch_size < 1 or max_input_tokens < 1:
        raise AnalysisError("batch_size and max_input_tokens must be positive")
    exs = [_as_example(ex, i) for i, ex in enumerate(examples)]
    if not exs:
        raise AnalysisError("examples: nothing to analyse")
    routing = model.config.routing
    top_k = routing.top_k
    encoded, skipped = _encode(tokenizer, exs, max_input_tokens)
    if not encoded:
        raise AnalysisError(
            f"examples: none of {len(exs)} prompts fits max_input_tokens={max_input_tokens}; "
            "raise --max-input-tokens"
        )
    if skipped:
        logger.warning("skipped %d prompt(s) longer than %d tokens", skipped, max_input_tokens)
    model.eval()
    device = next(model.parameters()).device
    collator = DataCollator.from_tokenizer(tokenizer, padding_side="right")
    # Longest first: similar lengths share a batch, and an out-of-memory shows up at once.
    encoded.sort(key=lambda item: -len(item[1]["input_ids"]))
    acc = RouterStatsAccumulator(top_k)
    task_acc: dict[str, RouterStatsAccumulator] = {}
    gates: dict[str, list[torch.Tensor]] = {}
    order: list[int] = []
    batches = range(0, len(encoded), batch_size)
    for start in tqdm(batches, desc="routing", unit="batch", disable=not progress):
        chunk = encoded[start : start + batch_size]
        batch = collator([enc for _, enc in chunk])
        with torch.autocast(
            device.type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
            out = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                prompt_mask=batch["prompt_mask"].to(device),
                instruction_mask=batch["instruction_mask"].to(device),
                return_router_stats=False,
                logits_to_keep=1,  # only the routing matters: skip the (B, T, V) logits
            )
        acc.add(out.routing_records)
        if per_task:
            rows_of: dict[str, list[int]] = {}
            for row, (i, _) in enumerate(chunk):
                rows_of.setdefault(exs[i].task, []).append(row)
            for task, rows in rows_of.items():
                idx = torch.as_tensor(rows, device=device)
                task_acc.setdefault(task, RouterStatsAccumulator(top_k)).add(
                    [_rows(rec, idx) for rec in out.routing_records]
                )
        for rec in out.routing_records:
            if rec.kind == "task":
                gates.setdefault(rec.name, []).append(rec.probs.detach().float().cpu())
        order.extend(i for i, _ in chunk)
    # Back to the input order (ties in length keep it too): reproducible tables and plots.
    perm = torch.as_tensor(order).argsort()
    task_gates = {name: torch.cat(parts)[perm] for name, parts in gates.items()}
    return RoutingCollection(
        tasks=[exs[order[j]].task for j in perm.tolist()],
        stats=acc.finalize(),
        task_gates=task_gates,
        top_k=top_k,
        routing_mode=routing.mode,
        skipped=skipped,
        task_stats={t: a.finalize() for t, a in sorted(task_acc.items())} if per_task else None,
    )


def _rows(rec: RoutingRecord, idx: torch.Tensor) -> RoutingRecord:
    """The record restricted to the batch rows ``idx`` (one task's examples)."""
    mask = None if rec.mask is None else rec.mask.index_select(0, idx)
    return RoutingRecord(rec.id, rec.probs.index_select(0, idx), mask)


def router_names(model: Any) -> list[str]:
    """Every router of an HMoRA model, as its routing records name them, in forward order."""
    names = []
    for group in getattr(model, "routers", {}).values():
        if getattr(group, "token_router", None) is not None:
            names.append(str(group.token_id))
        if getattr(group, "task_router", None) is not None:
            names.append(str(group.task_id))
    return sorted_routers(names)


def resolve_mep_router(names: Sequence[str], router: str | None) -> str | None:
    """The task router for MEP and t-SNE among ``names``: ``router`` (checked) or the final one.

    Raises:
        AnalysisError: ``router`` is unknown or a token router.
    """
    task_routers = [n for n in sorted_routers(list(names)) if n.endswith(".task")]
    if router is None:
        return final_task_router(task_routers)
    if router in task_routers:
        return router
    have = task_routers or "none: this adapter has no task routers"
    if router in names:
        raise AnalysisError(
            f"--router: {router!r} is a token router; MEP and t-SNE need a task router ({have})"
        )
    raise AnalysisError(f"--router: no router {router!r} in this adapter; task routers: {have}")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_routing(
    coll: RoutingCollection, meta: Mapping[str, Any] | None = None, *, router: str | None = None
) -> dict[str, Any]:
    """The ``routing.json`` document of a collection (schema in ``docs/analysis.md``).

    Args:
        coll: from :func:`collect_routing`.
        meta: ``model``, ``adapter``, ``data`` descriptions (copied into ``meta``).
        router: task router for the MEP (default: the final task router).
    """
    mep_router = resolve_mep_router(list(coll.stats), router)
    notes = list(coll.notes)
    routers: dict[str, dict[str, Any]] = {}
    by_kind: dict[str, dict[str, list[float]]] = {"token": {}, "task": {}}
    active: list[float] = []
    for name in sorted_routers(list(coll.stats)):
        layer, layer_type, kind = parse_router_name(name)
        s = coll.stats[name]
        entry = {
            "kind": kind,
            "layer": layer,
            "layer_type": layer_type,
            "balance": float(s["balance"]),
            "certainty": float(s["certainty"]),
            "load": [float(x) for x in s["load"]],
        }
        if "active_experts" in s:  # a variable number of experts per token (AdaMoLE)
            entry["active_experts"] = float(s["active_experts"])
            active.append(entry["active_experts"])
        routers[name] = entry
        for key in ("balance", "certainty"):
            by_kind[kind].setdefault(key, []).append(entry[key])
    task_counts: dict[str, int] = {}
    for t in coll.tasks:
        task_counts[t] = task_counts.get(t, 0) + 1
    tasks: dict[str, dict[str, Any]]
    if mep_router is None:
        notes.append("no task routers in this adapter: MEP, recognition and t-SNE skipped")
        logger.warning(notes[-1])
        tasks = {t: {"n": n, "mep": None, "share": None} for t, n in sorted(task_counts.items())}
        recognition = None
        distinct = None
        gate_share = None
    else:
        meps = main_expert_pairs(coll.tasks, coll.task_gates[mep_router], coll.top_k)
        tasks = {t: {"n": m.n, "mep": list(m.pair), "share": m.share} for t, m in meps.items()}
        recognition = recognition_rates(meps)
        # a router that routes every task alike "recognises" them all: report the spread too
        distinct = len({m.pair for m in meps.values() if m.pair is not None})
        # How much of the task router's gate variation is between tasks (vs within a task).
        gate_share = between_task_share(coll.task_gates[mep_router].float().numpy(), coll.tasks)
        if math.isnan(gate_share):
            notes.append(
                f"{mep_router} gives every prompt the same gates: the between-task share of "
                "their variance is undefined (null)"
            )
            gate_share = None
        tied = [t for t, m in meps.items() if m.tied]
        if tied:
            notes.append(
                f"{len(tied)} task(s) have several equally frequent expert pairs; the smallest "
                f"pair is reported (e.g. {tied[0]}: {[list(meps[tied[0]].pair)]} + "
                f"{[list(p) for p in meps[tied[0]].tied]})"
            )
    per_task_routers = None
    if coll.task_stats is not None:
        per_task_routers = _add_task_routing(coll, tasks, mep_router)
    return {
        "meta": {
            **dict(meta or {}),
            **({"per_task_routers": per_task_routers} if per_task_routers else {}),
            "num_examples": len(coll.tasks),
            "num_tasks": len(task_counts),
            "top_k": coll.top_k,
            "routing_mode": coll.routing_mode,
            "mep_router": mep_router,
            "skipped_examples": coll.skipped,
            "notes": notes,
        },
        "routers": routers,
        "summary": {
            "token_balance": _mean(by_kind["token"].get("balance", [])),
            "token_certainty": _mean(by_kind["token"].get("certainty", [])),
            "task_balance": _mean(by_kind["task"].get("balance", [])),
            "task_certainty": _mean(by_kind["task"].get("certainty", [])),
            "recognition": recognition,
            "distinct_meps": distinct,
            "task_gate_between_share": gate_share,
            "active_experts": _mean(active),
        },
        "tasks": tasks,
    }


def _add_task_routing(
    coll: RoutingCollection, tasks: dict[str, dict[str, Any]], mep_router: str | None
) -> dict[str, str | None]:
    """``tasks.<t>.routing``: the statistics of the task's own examples: token-router balance
    and certainty (means over the token routers, as the summary's), the expert activation
    shares of the last token router (forward order) and of the MEP router. Returns which
    routers the shares are of."""
    token = [n for n in sorted_routers(list(coll.stats)) if parse_router_name(n)[2] == "token"]
    last_token = token[-1] if token else None
    for task, entry in tasks.items():
        stats = coll.task_stats.get(task, {})
        mine = [stats[n] for n in token if n in stats]
        entry["routing"] = {
            "token_balance": _mean([float(s["balance"]) for s in mine]),
            "token_certainty": _mean([float(s["certainty"]) for s in mine]),
            "token_load": [float(x) for x in stats[last_token]["load"]]
            if last_token in stats
            else None,
            "task_load": [float(x) for x in stats[mep_router]["load"]]
            if mep_router in stats
            else None,
        }
    return {"token": last_token, "task": mep_router}


def analyze_routing(
    model: Any,
    tokenizer: Any,
    examples: Sequence[RoutingExample | Mapping[str, str]],
    *,
    batch_size: int = 8,
    max_input_tokens: int = 512,
    router: str | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
    per_task: bool = False,
) -> dict[str, Any]:
    """:func:`collect_routing` then :func:`summarize_routing`: the ``routing.json`` document."""
    resolve_mep_router(router_names(model), router)  # a wrong router fails before the run
    coll = collect_routing(
        model,
        tokenizer,
        examples,
        batch_size=batch_size,
        max_input_tokens=max_input_tokens,
        progress=progress,
        autocast_dtype=autocast_dtype,
        per_task=per_task,
    )
    return summarize_routing(coll, meta, router=router)

"""LoRAMoE: the localized balancing constraint, the expert groups, the ``knowledge`` batch
input from the records to the routers, the model's gates and the refused settings."""

from __future__ import annotations

import json
import logging
import types

import numpy as np
import pytest
import torch

from hmora_ds.config import load_config
from hmora_ds.data.records import knowledge_flags, validate_record
from hmora_ds.methods.loramoe import (
    coefficients,
    importance,
    localized_balancing_loss,
    weighted_importance,
)
from tests._dist import run_ranks
from tests.conftest import batch, randomize_adapters, tiny_hmora

NO_DROPOUT = {"adapter.dropout": 0.0, "routing.router_dropout": 0.0}


def _by_hand(z: torch.Tensor, form: str = "cv_squared") -> torch.Tensor:
    """The official code's ``cv_squared`` (torch.var, unbiased) of the flattened Z."""
    v = z.double().flatten()
    if form == "cv_squared":
        return v.var() / (v.mean() ** 2 + 1e-10)
    return v.var() / v.mean()


def test_importance_coefficients_and_loss_equal_hand_computed_values():
    """Guards against Q summing over the wrong axis (experts instead of tokens), the groups
    swapped (the first experts are the world-knowledge group, 1 + δ for a knowledge sample),
    a biased variance (the code's torch.var divides by n − 1) or the paper's denominator in
    the default form."""
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.0, 0.5, 0.5]],
                          [[1.0, 0.0, 0.0], [0.25, 0.25, 0.5]]])  # fmt: skip
    q = importance(probs)
    torch.testing.assert_close(q, torch.tensor([[0.5, 0.75, 0.75], [1.25, 0.25, 0.5]]))
    i = coefficients(torch.tensor([1, 0]), 3, 1, 0.1)
    torch.testing.assert_close(i, torch.tensor([[1.1, 0.9, 0.9], [0.9, 1.1, 1.1]]))
    z = weighted_importance(probs, None, torch.tensor([1, 0]), 1, 0.1)
    expected = torch.tensor([[0.55, 0.675, 0.675], [1.125, 0.275, 0.55]])
    torch.testing.assert_close(z, expected)
    # Z: mean 3.85 / 6, unbiased variance Σ(z − μ)² / 5.
    mean = 3.85 / 6
    var = sum((v - mean) ** 2 for v in expected.flatten().tolist()) / 5
    loss = localized_balancing_loss(z.unsqueeze(0))
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(var / mean**2, rel=1e-5)
    paper = localized_balancing_loss(z.unsqueeze(0), form="var_over_mean")
    assert paper.item() == pytest.approx(var / mean, rel=1e-5)
    assert loss.item() == pytest.approx(_by_hand(z).item(), rel=1e-5)


def test_group_sizes_follow_knowledge_experts_and_delta():
    """Guards against half/half groups hard-coded (the official code's E/2) when the option
    says otherwise, and against δ = 0 not making every coefficient 1."""
    i = coefficients(torch.tensor([1, 0, 1]), 5, 2, 0.25)
    knows = torch.tensor([1.25, 1.25, 0.75, 0.75, 0.75])
    torch.testing.assert_close(i, torch.stack([knows, 2.0 - knows, knows]))
    assert torch.equal(coefficients(torch.tensor([1, 0]), 4, 3, 0.0), torch.ones(2, 4))


def test_padding_is_out_of_the_importance():
    """Guards against padding tokens' gates counting in Q (the official code sums every
    position, padding included): changing the gates on padded positions changes nothing."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 5, 4, generator=g), -1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    other = probs.clone()
    other[1, 3:] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    k = torch.tensor([0, 1])
    a = localized_balancing_loss(weighted_importance(probs, mask, k, 2, 0.1).unsqueeze(0))
    b = localized_balancing_loss(weighted_importance(other, mask, k, 2, 0.1).unsqueeze(0))
    assert a.item() == b.item()
    torch.testing.assert_close(importance(probs, mask)[1], probs[1, :3].sum(0))
    unmasked = localized_balancing_loss(weighted_importance(other, None, k, 2, 0.1)[None])
    assert unmasked.item() != a.item()


def test_degenerate_inputs_give_zero_not_nan():
    """Guards against a NaN from a single entry (the code returns 0 then) or an all-zero Z
    (every token padding) in either form."""
    assert localized_balancing_loss(torch.ones(1, 1, 1)).item() == 0.0
    for form in ("cv_squared", "var_over_mean"):
        z = torch.zeros(2, 3, 4, requires_grad=True)
        loss = localized_balancing_loss(z, form=form)
        loss.sum().backward()
        assert torch.equal(loss, torch.zeros(2)) and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="lbc_form: must be cv_squared or var_over_mean"):
        localized_balancing_loss(torch.ones(1, 2, 2), form="cv")


def _capture_gates(model):
    seen = {}
    for key, group in model.routers.items():
        group.register_forward_hook(lambda _m, _i, out, key=key: seen.__setitem__(key, out))
    return seen


def test_model_gates_are_a_bias_free_softmax_and_lbc_equals_recomputation():
    """Guards against the model's gates not being softmax(x W_g) (a bias, top-k, a shared
    router for gate and up), the ``knowledge`` input not reaching the routers (no lbc term,
    or the wrong groups), padding in Q, and the sites' losses not summed (the code adds every
    linear's). Without the input there is no lbc term, as in the official code."""
    model = tiny_hmora("loramoe", overrides=NO_DROPOUT).eval()
    randomize_adapters(model)
    assert sorted(model.routers)[:3] == ["layer00_down", "layer00_gate", "layer00_up"]
    group = model.routers["layer02_gate"]
    assert group.token_router.linear.bias is None and group.mode == "soft"
    ids, attn, labels, prompt = batch()
    knowledge = torch.tensor([1, 0, 1])
    x_seen = {}
    group.register_forward_pre_hook(lambda _m, args: x_seen.__setitem__("x", args[0]))
    seen = _capture_gates(model)
    with torch.no_grad():
        out = model(ids, attn, labels, prompt, knowledge=knowledge)
    x = x_seen["x"]
    torch.testing.assert_close(seen["layer02_gate"],
                               torch.softmax(group.token_router.linear(x).float(), -1))  # fmt: skip
    expected = sum(_by_hand(weighted_importance(g, attn, knowledge, 3, 0.1)) for g in seen.values())
    assert len(seen) == 6 * 3
    assert out.aux_by_kind["lbc"].item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(out.aux_weighted, 0.1 * out.aux_by_kind["lbc"])
    swapped = model(ids, attn, labels, prompt, knowledge=1 - knowledge).aux_by_kind["lbc"]
    assert swapped.item() != pytest.approx(expected.item(), rel=1e-3)
    plain = model(ids, attn, labels, prompt)
    assert "lbc" not in plain.aux_by_kind and plain.aux_weighted.item() == 0.0
    off = tiny_hmora("loramoe", overrides={**NO_DROPOUT, "options.lbc_weight": 0.0})
    assert "lbc" not in off(ids, attn, labels, prompt, knowledge=knowledge).aux_by_kind


def test_gradient_checkpointing_keeps_lbc_and_its_gradients():
    """Guards against the recomputation during backward using another mask for Q (padding
    would then get a gradient) or different operations than the forward (a checkpoint
    error): loss and gradients equal those without checkpointing."""
    results = []
    for ckpt in (False, True):
        model = tiny_hmora("loramoe", overrides=NO_DROPOUT).train()
        randomize_adapters(model)
        if ckpt:
            model.gradient_checkpointing_enable()
        ids, attn, labels, prompt = batch(seed=2)
        out = model(ids, attn, labels, prompt, knowledge=torch.tensor([0, 1, 1]))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.aux_by_kind["lbc"], grads))
    (loss, lbc, grads), (loss_c, lbc_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lbc_c, lbc, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_c.keys() and any("token_router" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-6, msg=name)


def _two_rank_worker(rank, world, out_dir):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(3)
    z = torch.rand(2, 6, 4, generator=g, dtype=torch.float64)
    for form in ("cv_squared", "var_over_mean"):
        full = z.clone().requires_grad_(True)
        localized_balancing_loss(full, form=form).sum().backward()
        mine = z[:, rank * 3 : rank * 3 + 3].clone().requires_grad_(True)
        loss = localized_balancing_loss(mine, form=form, group=dist.group.WORLD)
        loss.sum().backward()
        ref = localized_balancing_loss(z, form=form)
        torch.testing.assert_close(loss, ref)
        # Data-parallel engines average gradients over ranks: so each rank's gradient, divided
        # by the world size, equals its rows of one process's.
        torch.testing.assert_close(mine.grad / world, full.grad[:, rank * 3 : rank * 3 + 3])
    (out_dir / f"ok{rank}").write_text("ok")


@pytest.mark.multirank
def test_two_ranks_equal_one_process_holding_the_whole_batch(tmp_path):
    """Guards against a per-rank statistic (the official code's per-device cv²): on 2 gloo
    ranks with half the samples each, L_lbc and each rank's gradient equal one process's."""
    run_ranks(_two_rank_worker, 2, tmp_path, tmp_path, timeout=120)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def test_records_keep_a_0_1_knowledge_field_and_refuse_other_values():
    """Guards against the flag dropped by record normalisation (so every sample would count
    as a downstream task) and against a value like 'yes' or 2 silently meaning something."""
    base = {"source": "Q?", "target": "A"}
    for value, kept in ((1, 1), (0, 0), (True, 1), (False, 0)):
        rec, why = validate_record({**base, "knowledge": value})
        assert why is None and rec["knowledge"] == kept
    rec, _ = validate_record(base)
    assert "knowledge" not in rec
    for value in (2, "yes", 0.5):
        rec, why = validate_record({**base, "knowledge": value})
        assert rec is None and why == "field 'knowledge' must be 0, 1, true or false"


def test_records_without_the_field_are_typed_by_task_and_logged(caplog):
    """Guards against records without the field changing meaning silently: their own field
    wins, else their task name decides, and the count is logged."""
    with caplog.at_level(logging.INFO, logger="hmora_ds.data.records"):
        flags = knowledge_flags([None, 0, None, 1], ["arc_easy", "arc_easy", "piqa", "piqa"],
                                ["arc_easy"])  # fmt: skip
    assert flags == [1, 0, 0, 1]
    assert "2 of 4 records have no 'knowledge' field: 1 typed world knowledge by their task " \
        "(arc_easy), 1 downstream task" in caplog.text  # fmt: skip
    assert "2 of 4 training records are world knowledge" in caplog.text


def test_knowledge_flows_from_local_jsonl_into_training_batches(tmp_path):
    """Guards against the flag not reaching the batch: a local JSONL's ``knowledge`` field
    (and the task-name default) becomes the batch input ``knowledge`` of exactly the batch's
    examples, for LoRAMoE only."""
    from hmora_ds.data.local import load_records
    from hmora_ds.methods import build_method
    from hmora_ds.train.data import RunData, add_record_columns

    path = tmp_path / "d.jsonl"
    rows = [{"source": "a", "target": "x", "knowledge": 1},
            {"source": "b", "target": "y", "task_name": "piqa"},
            {"source": "c", "target": "z", "task_name": "openbookqa"},
            {"source": "d", "target": "w", "knowledge": False, "task_name": "obqa"}]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs = load_records(path)
    data = RunData(
        train=[{"i": i} for i in range(4)], val=None, sampler=[[3, 0, 2]],
        collator=lambda items: {"i": torch.tensor([it["i"] for it in items])},
        task_names=[r["task_name"] for r in recs], knowledge=[r.get("knowledge") for r in recs],
    )  # fmt: skip
    method = build_method(load_config("loramoe"))
    assert add_record_columns(data, method) == ["knowledge"]
    b = next(data.batches())
    assert b["i"].tolist() == [3, 0, 2] and b["knowledge"].tolist() == [0, 1, 1]
    other = types.SimpleNamespace(batch_inputs=(), optional_batch_inputs=("cluster",))
    plain = RunData(train=[], val=None, sampler=[], collator=None)
    assert add_record_columns(plain, other) == [] and plain.columns == {}
    assert isinstance(data.columns["knowledge"], np.ndarray)


REFUSALS = [
    ("routing.mode=topk",
     "routing.mode: must be soft (LoRAMoE weights every expert by its probability) "
     "(method loramoe)"),
    ("routing.task_encoder=transformer",
     "routing.task_encoder: must be none: LoRAMoE routes tokens only (method loramoe)"),
    ("adapter.hydra=true", "adapter.hydra: must be false (method loramoe)"),
    ("loss.aux=blc",
     "loss.aux: must be none: LoRAMoE balances with the localized constraint, weighted by "
     "options.lbc_weight (method loramoe)"),
    ("options.knowledge_experts=6",
     "options.knowledge_experts: must lie in [1, adapter.num_experts - 1 = 5] (both groups "
     "need an expert), got 6 (method loramoe)"),
    ("options.knowledge_experts=0",
     "options.knowledge_experts: must lie in [1, adapter.num_experts - 1 = 5] (both groups "
     "need an expert), got 0 (method loramoe)"),
    ("options.delta=1.5", "options.delta: must lie in [0, 1], got 1.5 (method loramoe)"),
    ("options.lbc_weight=-1", "options.lbc_weight: must be >= 0, got -1.0 (method loramoe)"),
    ("options.lbc_form=cv",
     "options.lbc_form: must be one of cv_squared, var_over_mean, got 'cv'"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "message"), REFUSALS)
def test_refused_settings_are_one_exact_line(override, message):
    """Guards against a refusal naming the wrong field, losing its reason, or not firing."""
    from hmora_ds.methods import build_method

    with pytest.raises(ValueError) as err:
        build_method(load_config("loramoe", [override]))
    assert str(err.value) == message


def test_expert_parallelism_is_refused_for_soft_routing():
    """LoRAMoE is dense: every token uses every expert, so expert parallelism would send
    every token everywhere. Guards against ``parallel.ep_size > 1`` being accepted."""
    from hmora_ds.parallel.expert_parallel import validate_expert_parallel

    m = load_config("loramoe")
    with pytest.raises(ValueError) as err:
        validate_expert_parallel(2, m.adapter.num_experts, 2, 2, m.routing.mode, m.has_mixture)
    assert str(err.value) == (
        "parallel.ep_size > 1 needs routing.mode=topk: soft routing sends every token to every "
        "expert (an all-gather, no saving over replicated experts)"
    )


def test_preset_has_the_papers_settings():
    """Guards against the preset drifting from the paper (section 5.1, table 3)."""
    c = load_config("loramoe")
    a, o = c.adapter, c.options
    assert (a.rank, a.alpha, a.dropout, a.num_experts) == (4, 32.0, 0.05, 6)
    assert a.targets == ["gate", "up", "down"] and c.routing.mode == "soft"
    assert not c.routing.share_routers and c.loss.aux == "none"
    assert (o["knowledge_experts"], o["delta"], o["lbc_weight"]) == (3, 0.1, 0.1)


def test_the_batch_input_is_the_records_field():
    """The trainer feeds the column named by the records' field to the method's batch input of
    that name: a rename on one side would silently drop the balancing constraint."""
    from hmora_ds.data.records import KNOWLEDGE_FIELD
    from hmora_ds.methods.loramoe import KNOWLEDGE_INPUT

    assert KNOWLEDGE_INPUT == KNOWLEDGE_FIELD


@pytest.mark.slow
def test_a_training_run_feeds_each_records_knowledge_flag_to_the_constraint(
    tiny_run_inputs, tmp_path
):
    """The real entry point (one process, ZeRO-2, the tiny model) on local JSONL where every
    third record says ``knowledge: 1``: the trainer types the records as logged (the field where
    present, the task name otherwise) and the constraint enters the loss (L ≠ L_LM). Guards
    against the flag lost between the records and the routers (no batch input: no L_lbc)."""
    import json
    import re

    from tests._train_helpers import launch, overrides

    recs = [json.loads(line) for line in (tiny_run_inputs / "data.jsonl").read_text().splitlines()]
    data = tmp_path / "data.jsonl"
    with data.open("w") as f:
        for i, r in enumerate(recs):
            f.write(json.dumps({**r, "knowledge": 1} if i % 3 == 0 else r) + "\n")
    out = tmp_path / "out"
    args = overrides(tiny_run_inputs, out, "preset=loramoe", f"data.path={data}",
                     "train.max_steps=2")  # fmt: skip
    log = launch("python", "zero2.json", args)
    m = re.search(r"data: (\d+) of (\d+) training records are world knowledge", log)
    assert m, log[-3000:]
    knowledge, total = int(m.group(1)), int(m.group(2))
    assert 0 < knowledge < total
    assert re.search(rf"data: {total - knowledge} of {total} records have no 'knowledge' field",
                     log)  # fmt: skip
    aux = [float(x) for x in re.findall(r"\baux[= ]([0-9.]+)", log)]
    assert aux and all(a > 0 for a in aux)

"""The trainer's parts without DeepSpeed: the objective, the loop state a checkpoint carries,
the loop's cadence and the one-transfer read-back of a logging window (CPU, milliseconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hmora_ds.losses import total_loss
from hmora_ds.train.config import RunConfig
from hmora_ds.train.loop import Cadence, LoopState, record_eval, record_window
from hmora_ds.train.step import StepMetrics, materialize
from hmora_ds.train.trainer import Trainer  # noqa: F401  (the entry point imports it)


def test_total_loss_is_lm_plus_weighted_aux_for_tensors_and_floats():
    lm = torch.tensor(2.0, requires_grad=True)
    aux = torch.tensor(0.5, requires_grad=True)
    loss = total_loss(lm, aux, 0.1)
    loss.backward()
    assert loss.item() == pytest.approx(2.05)
    assert lm.grad.item() == 1.0 and aux.grad.item() == pytest.approx(0.1)
    assert total_loss(2.0, 0.5, 0.1) == 2.0 + 0.1 * 0.5


def test_loop_state_checkpoint_keys_are_unchanged():
    """Checkpoints written before LoopState existed stored exactly these keys (and resume)."""
    old = {
        "step": 6,
        "sampler": {"epoch": 1, "position": 3},
        "best": {"value": 1.5, "tag": "step00000003", "step": 3, "metric": "val_loss"},
        "evals_without_improvement": 1,
        "nonfinite_in_row": 0,
    }
    state = LoopState.from_client_state(old)
    assert (state.step, state.best["step"], state.evals_without_improvement) == (6, 3, 1)
    assert state.history == []  # such a checkpoint has no loop_state.json with the history
    assert state.client_state(old["sampler"]) == old
    # loop_state.json: the same keys plus the run's history, tokens and seconds.
    state.history, state.tokens, state.seconds = [{"step": 1, "loss": 2.0, "lm_loss": 1.5}], 9, 3
    restored = LoopState.from_json(json.loads(json.dumps(state.to_json(old["sampler"]))))
    assert restored == state
    assert list(state.client_state({})) == list(old)  # same keys, same order
    assert state.protected_tags() == {"step00000003"}
    assert LoopState().protected_tags() == set()


def test_cadence_from_run_config():
    run = RunConfig()
    run.train.max_steps, run.train.log_every, run.train.router_stats_every = 10, 4, 3
    run.eval.every, run.checkpoint.every, run.eval.patience = 5, 6, 2
    c = Cadence.from_run(run, evaluates=True, has_mixture=True)
    assert [s for s in range(1, 11) if c.due_eval(s)] == [5, 10]
    assert [s for s in range(1, 11) if c.due_checkpoint(s)] == [6, 10]
    assert [s for s in range(1, 11) if c.wants_router_stats(s)] == [3, 6, 9]
    assert [s for s in range(1, 11) if c.due_flush(s, {}, False, False)] == [1, 4, 8]
    assert c.due_flush(3, {"r": {}}, False, False)
    assert not Cadence.from_run(run, evaluates=False, has_mixture=False).due_eval(10)
    assert c.patience_exhausted(LoopState(evals_without_improvement=2))


def test_record_eval_tracks_the_best_and_the_evaluations_without_gain():
    state = LoopState(step=3)
    assert record_eval(state, 2.0, "val_loss", "min")
    assert state.best == {"value": 2.0, "tag": "step00000003", "step": 3, "metric": "val_loss"}
    state.step = 6
    assert not record_eval(state, 2.5, "val_loss", "min")
    assert state.evals_without_improvement == 1 and state.best["step"] == 3


def _metrics(lm_sum, n_target, aux, applied=1.0, grad_norm=1.0):
    return StepMetrics(
        counts=torch.tensor([n_target, 2.0 * n_target], dtype=torch.float64),
        lm_sum=torch.tensor(lm_sum, dtype=torch.float64),
        aux_loss=torch.tensor(aux),
        aux_weighted=torch.tensor(0.1 * aux),
        aux_kinds={"token": torch.tensor(aux)},
        grad_norm=grad_norm,
        lr=1e-3,
        applied=applied,
    )


def test_materialize_reads_a_window_back_as_floats():
    m1, m2 = materialize([_metrics(8.0, 4.0, 0.5), _metrics(3.0, 2.0, 0.25, grad_norm=None)])
    assert m1["lm_loss"] == 2.0 and m1["loss"] == pytest.approx(total_loss(2.0, 0.5, 0.1))
    assert (m1["target_tokens"], m1["tokens"], m1["grad_norm"]) == (4.0, 8.0, 1.0)
    assert m1["aux_loss_token"] == 0.5 and m1["lr"] == 1e-3
    assert "grad_norm" not in m2 and m2["lm_loss"] == 1.5
    assert materialize([]) == []


def test_record_window_stops_after_nonfinite_steps_in_a_row():
    state = LoopState()
    ok = {"applied": 1.0, "loss": 1.0, "lm_loss": 1.0}
    bad = {"applied": 0.0, "loss": math.nan, "lm_loss": math.nan}
    assert record_window(state, [1, 2], [ok, bad], max_nonfinite=2) is None
    assert state.nonfinite_in_row == 1
    assert record_window(state, [3, 4], [bad, bad], 2) == "2 non-finite steps in a row"
    assert state.nonfinite_in_row == 3 and [h["step"] for h in state.history] == [1, 2, 3, 4]
    record_window(state, [5], [ok], 2)
    assert state.nonfinite_in_row == 0


def test_validation_loss_is_plain_cross_entropy_whatever_the_label_smoothing():
    """Guards against the held-out loss carrying the training's label smoothing: runs (and
    methods) that smooth differently (the HMoRA paper's presets 0.1, others 0) would report
    losses that cannot be compared. Tiny random-init model: mechanics only."""
    import torch.nn.functional as F

    from hmora_ds.train.evaluate import ValidationLoss
    from tests.conftest import batch, tiny_hmora

    ids, attn, labels, prompt = batch(bsz=3, seed=4)
    val = {"input_ids": ids, "attention_mask": attn, "labels": labels, "prompt_mask": prompt}
    got = {}
    for smoothing in (0.0, 0.1):
        model = tiny_hmora("lora_r8", overrides={"loss.label_smoothing": smoothing})
        got[smoothing] = ValidationLoss([val], torch.device("cpu")).evaluate(model, 0)["val_loss"]
        model.eval()
        logits = model(ids, attn, labels, prompt).logits[:, :-1]
        target = labels[:, 1:]
        want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                               ignore_index=-100)  # fmt: skip
        assert got[smoothing] == pytest.approx(want.item(), rel=1e-6)
    assert got[0.0] == pytest.approx(got[0.1], rel=1e-6)

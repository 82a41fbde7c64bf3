"""Mixture-of-LoRAs on a tiny LoRA library: the router's cross-entropy on the domain labels by
hand, argmax routing in evaluation, trainable experts initialised from the library, the
invariant table, the ``task_index`` column through the real data path, the refusals. (ZeRO-2
on two ranks = one process: with MoLE's, in ``tests/test_mole.py``'s spawn.)"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from hmora_ds.adapter_io import load_adapter, save_adapter
from hmora_ds.composition import build_model
from hmora_ds.config import load_config
from hmora_ds.methods import adapter_parameters, build_method, frozen_adapter_tensors
from hmora_ds.methods.mixture_of_loras import route_loss, route_nll, top1
from tests import _method_invariants as inv
from tests._dist import two_ranks
from tests.conftest import QUESTION_ID, batch, tiny_base
from tests.test_mole import make_library

NO_DROPOUT = {"adapter.dropout": 0.0, "routing.router_dropout": 0.0}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return make_library(tmp_path_factory.mktemp("lib"))


def config(library, **extra):
    return load_config("mixture_of_loras", {**NO_DROPOUT, "options.library": str(library),
                                            **extra})  # fmt: skip


def build(library, **extra):
    return build_model(tiny_base(), config(library, **extra), task_token_id=QUESTION_ID)


def test_router_cross_entropy_by_hand():
    """Guards against the loss counting padding or records of other tasks (label −1), a mean
    over rows instead of labelled tokens, or a per-rank mean (the statistic is global)."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                           [[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]],
                           [[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]])  # fmt: skip
    labels = torch.tensor([0, 2, -1])  # the third record is of another task
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])  # row 1's second token is padding

    def nll(row, label):
        return -(row[label] - math.log(sum(math.exp(v) for v in row)))

    want = nll([2, 0, 0], 0) + nll([0, 1, 0], 0) + nll([0, 0, 3], 2)
    got = route_nll(logits, labels, mask)
    torch.testing.assert_close(got, torch.tensor([want, 3.0]))
    other = route_nll(logits * 0.5, labels, mask)
    loss = route_loss(torch.stack([got, other]))
    assert loss.item() == pytest.approx((want / 3 + other[0].item() / 3) / 2, rel=1e-6)
    none = route_nll(logits, torch.tensor([-1, -1, -1]), mask)
    assert route_loss(none[None]).item() == 0.0


def test_router_loss_on_two_ranks_equals_one_process(monkeypatch):
    """Guards against a per-rank mean: rank 0 holds 1 labelled token, rank 1 three, so the
    global mean (Σ nll / 4) differs from the mean of the two ranks' means."""
    a = torch.tensor([[2.0, 1.0]])  # (R = 1 router, [Σ nll, count])
    b = torch.tensor([[3.0, 3.0]])
    got = two_ranks(monkeypatch, lambda v, group: route_loss(v, group=group), (a,), (b,))
    assert got.item() == pytest.approx(5.0 / 4)


def test_argmax_routing_in_evaluation_and_soft_or_top1_in_training(library):
    """Guards against soft gates at inference (the paper routes each token to one LoRA) or the
    top-1 option ignored in training; the recorded probabilities stay the router's."""
    model = build(library)
    gate = model.routers["layer02_q_k_v_o_gate_up_down"]
    seen = {}
    gate.register_forward_hook(lambda _m, _i, out: seen.__setitem__("g", out))
    ids, attn, labels, prompt = batch()
    model.train()
    with torch.no_grad():
        model(ids, attn, labels, prompt)
    soft = seen["g"]
    assert not torch.equal(soft, top1(soft)) and torch.allclose(soft.sum(-1), torch.ones(()))
    model.eval()
    with torch.no_grad():
        out = model(ids, attn, labels, prompt)
    hard = seen["g"]
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    # (Layer 2 reads other hidden states in eval: layers 0 and 1 route by argmax too.)
    probs = next(r.probs for r in out.routing_records if r.id.layer == 2)
    assert not torch.equal(probs, hard)
    torch.testing.assert_close(hard, top1(probs))
    hard_train = build(library, **{"options.train_gates": "top1"}).train()
    g2 = hard_train.routers["layer02_q_k_v_o_gate_up_down"]
    g2.register_forward_hook(lambda _m, _i, out: seen.__setitem__("h", out))
    with torch.no_grad():
        hard_train(ids, attn, labels, prompt)
    assert set(seen["h"].unique().tolist()) == {0.0, 1.0}
    with torch.no_grad():  # generation routes by argmax too
        model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)


def test_the_model_routing_loss_is_the_hand_computed_mean_over_layers(library):
    """Guards against the ``task_index`` input not reaching the routers (no loss), the loss
    computed from the gates rather than the logits, or labelled records of another task."""
    model = build(library).train()
    logits = []
    for gate in model.routers.values():
        gate.linear.register_forward_hook(lambda _m, _i, out: logits.append(out))
    ids, attn, labels, prompt = batch()
    task_index = torch.tensor([1, -1, 0])
    out = model(ids, attn, labels, prompt, task_index=task_index)
    rows = torch.stack([route_nll(lg.detach(), task_index, attn) for lg in logits])
    assert len(logits) == 6 and rows[0, 1].item() == attn[[0, 2]].sum().item()
    assert out.aux_by_kind["route"].item() == pytest.approx(route_loss(rows).item(), rel=1e-6)
    torch.testing.assert_close(out.aux_weighted, out.aux_by_kind["route"])
    out.loss.backward()
    assert model.routers["layer00_q_k_v_o_gate_up_down"].linear.weight.grad.abs().sum() > 0
    assert "route" not in model(ids, attn, labels, prompt).aux_by_kind
    off = build(library, **{"options.route_weight": 0.0})
    assert "route" not in off(ids, attn, labels, prompt, task_index=task_index).aux_by_kind


def test_experts_start_as_the_library_loras_and_train(library):
    """Guards against the LoRAs frozen (MoLE's choice, not this method's) or not initialised
    from the library: every bank's expert i is task i's LoRA, and they are trainable."""
    from hmora_ds.library import load_lora

    model = build(library)
    assert not frozen_adapter_tensors(model)
    bank = model.base_model.model.layers[3].self_attn.v_proj
    site = load_lora(library / "b" / "adapter")["model.layers.3.self_attn.v_proj"]
    torch.testing.assert_close(bank.lora_A[8:16], site.A)
    torch.testing.assert_close(bank.lora_B[:, 8:16], site.B)
    assert bank.lora_A.requires_grad and bank.lora_B.requires_grad
    assert "base_model.model.layers.3.self_attn.v_proj.lora_B" in adapter_parameters(model)


def test_registry_invariants_on_a_tiny_library(library, tmp_path):
    c = config(library)
    inv.check_only_adapters_train(c)
    inv.check_round_trip(c, tmp_path, arch="qwen2")
    inv.check_gradient_checkpointing(c)
    inv.check_bf16_base(c)


def test_a_saved_adapter_loads_without_the_library_and_refuses_another_base(library, tmp_path):
    lib = shutil.copytree(library, tmp_path / "lib")
    model = build(lib).eval()
    path = save_adapter(model, tmp_path / "adapter")
    shutil.rmtree(lib)
    loaded = load_adapter(tiny_base(), path).eval()
    ids, attn, labels, prompt = batch(seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attn, labels, prompt).logits,
                           model(ids, attn, labels, prompt).logits)  # fmt: skip
    from hmora_ds.library import LibraryError

    with pytest.raises(LibraryError, match=r"of another shape: num_hidden_layers 6 \(library\)"):
        build_model(tiny_base(layers=4), config(library))


def test_refused_settings_are_one_line():
    for override, message in [
        ("routing.mode=topk", "routing.mode: must be soft: mixture_of_loras weights"),
        ("options.route_weight=-1", "options.route_weight: must be >= 0, got -1.0"),
        ("options.train_gates=hard", "options.train_gates: must be one of soft, top1"),
        ("routing.task_encoder=transformer", "routing.task_encoder: must be none"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_method(load_config("mixture_of_loras", [override]))


def test_the_batch_input_is_the_records_column():
    from hmora_ds.data.records import TASK_INDEX_FIELD
    from hmora_ds.methods.mixture_of_loras import TASK_INDEX_INPUT

    assert TASK_INDEX_INPUT == TASK_INDEX_FIELD


def test_task_index_flows_from_local_records_through_the_collator_into_batches(
    library, tmp_path, caplog
):
    """The real data path (local JSONL → encoded dataset → length-grouped sampler → the
    collator → the trainer's record columns): every batch's ``task_index`` is the index of
    each example's own task among the library's (−1 for another task). Guards against a
    column misaligned with the batch's examples or built from the wrong task list."""
    import logging

    sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "data"))
    from hmora_data_fixtures import tiny_chat_tokenizer

    from hmora_ds.train.config import load_run_config
    from hmora_ds.train.data import add_record_columns, build_run_data

    tasks = ["b", "a", "zz", "c", "a", "b", "zz", "c"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"source": f"question {t} number {i}", "target": "yes",
                                        "task_name": t}) + "\n"
                            for i, t in enumerate(tasks * 2)))  # fmt: skip
    run = load_run_config(None, ["data.kind=local", f"data.path={path}", "preset=mixture_of_loras",
                                 "data.val_fraction=0.0", "train.micro_batch_size=4"])  # fmt: skip
    tok = tiny_chat_tokenizer()
    data = build_run_data(run, tok, rank=0, world_size=1)
    method = build(library, **{"options.tasks": ["c", "a", "b"]}).method
    with caplog.at_level(logging.INFO, logger="hmora_ds.data.records"):
        assert add_record_columns(data, method) == ["task_index"]
    assert "12 of 16 training records belong to one of 3 tasks (c 4, a 4, b 4); 4 of other" \
        in caplog.text  # fmt: skip
    want = {"c": 0, "a": 1, "b": 2, "zz": -1}
    batches = data.batches()
    for _ in range(4):
        b = next(batches)
        assert b["task_index"].shape == (4,) and b["task_index"].dtype == torch.int64
        for row, index in zip(b["input_ids"], b["task_index"].tolist(), strict=True):
            text = tok.decode(row[row != tok.pad_token_id])
            task = text.split("question ")[1].split(" ")[0]
            assert index == want[task], text


def test_preset():
    c = load_config("mixture_of_loras")
    o = c.options
    assert (o["train_gates"], o["route_weight"], o["library"]) == ("soft", 1.0, None)
    assert c.routing.mode == "soft" and c.loss.aux == "none"


def _tiny_run_library(root, model_dir, tasks):
    """A library of random plain LoRAs on the tiny run's own base model."""
    from transformers import AutoModelForCausalLM

    from hmora_ds.base_model import base_fingerprint
    from hmora_ds.library import Library, LibraryEntry
    from tests.conftest import randomize_adapters

    entries = []
    for i, task in enumerate(tasks):
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        model = build_model(base, load_config("lora_r8"))
        randomize_adapters(model, seed=20 + i, scale=0.05)
        entries.append(LibraryEntry(task, save_adapter(model, root / task / "adapter")))
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    Library(root, "tiny-run", base_fingerprint(base), entries).write()
    return root


@pytest.mark.slow
def test_training_runs_route_on_the_task_index_and_resume_restores_moles_frozen_loras(
    tiny_run_inputs, tmp_path
):
    """The real entry point (one process, ZeRO-2, the tiny model). Mixture-of-LoRAs: the
    trainer builds ``task_index`` from the records (logged) and the routing loss enters the
    objective (aux > 0). MoLE: a run killed during its step-4 save resumes from step 2 after
    the library's files were changed; the resumed run's adapter holds the frozen LoRAs of the
    checkpoint (the library as it was), not the changed files. Guards against the column lost
    between the records and the routers, and a resume that reloads frozen experts from the
    library instead of the checkpoint."""
    import re

    from safetensors.torch import load_file, save_file

    from tests._train_helpers import launch, overrides

    lib = _tiny_run_library(tmp_path / "lib", tiny_run_inputs / "model", ("qa", "other"))
    out = tmp_path / "moa"
    log = launch("python", "zero2.json", overrides(
        tiny_run_inputs, out, "preset=mixture_of_loras", f"method.options.library={lib}",
        "train.max_steps=2"))  # fmt: skip
    m = re.search(r"data: (\d+) of (\d+) training records belong to one of 2 tasks \(qa (\d+), "
                  r"other 0\)", log)  # fmt: skip
    assert m and m.group(1) == m.group(2) == m.group(3), log[-3000:]
    aux = [float(x) for x in re.findall(r"\baux[= ]([0-9.]+)", log)]
    assert aux and all(a > 0 for a in aux), log[-3000:]

    out = tmp_path / "mole"
    args = overrides(tiny_run_inputs, out, "preset=mole", f"method.options.library={lib}",
                     "train.max_steps=4", "checkpoint.every=2",
                     "checkpoint.keep_last=2")  # fmt: skip
    launch("python", "zero2.json", args, env={"HMORA_CRASH_DURING_SAVE": "step00000004"},
           expect=17)  # fmt: skip
    weights = lib / "qa" / "adapter" / "adapter_model.safetensors"
    original = load_file(str(weights))
    save_file({k: v + 1.0 for k, v in original.items()}, str(weights))  # the library changes
    resumed = launch("python", "zero2.json", [*args, "--resume", "auto"])
    assert "resum" in resumed.lower(), resumed[-3000:]
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    name = "base_model.model.layers.0.self_attn.q_proj"
    rank = 8
    torch.testing.assert_close(final[f"{name}.lora_A"][:rank],
                               original[f"{name}.lora_A"].float(), rtol=0, atol=0)  # fmt: skip
    assert any(".temperature" in k for k in final)

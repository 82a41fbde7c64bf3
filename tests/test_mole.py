"""MoLE on a tiny LoRA library: the gate, temperature and balance-loss equations by hand, a
one-hot gate equal to that library LoRA alone, the invariant table, frozen library tensors,
self-contained adapters, the refusals; and (one spawn) ZeRO-2 on two ranks = one process for
MoLE and Mixture-of-LoRAs, with the DeepSpeed checkpoint holding the frozen experts."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from hmora_ds.adapter_io import load_adapter, save_adapter
from hmora_ds.composition import build_model
from hmora_ds.config import load_config
from hmora_ds.library import Library, LibraryEntry, LibraryError, load_lora
from hmora_ds.methods import adapter_parameters, build_method, frozen_adapter_tensors
from hmora_ds.methods.mole import balance_loss, gate_probs, init_rows
from hmora_ds.model import HMoRAModel
from hmora_ds.routing.context import RouterId, RoutingRecord
from tests import _method_invariants as inv
from tests._dist import run_ranks
from tests.conftest import QUESTION_ID, batch, randomize_adapters, tiny_base, tiny_hmora

NO_DROPOUT = {"adapter.dropout": 0.0, "routing.router_dropout": 0.0}


def make_library(root, tasks=("a", "b", "c"), preset="lora_r8", overrides=None, layers=6):
    """A library of plain LoRAs on ``tiny_base()``, one random LoRA per task (B ≠ 0)."""
    from hmora_ds.base_model import base_fingerprint

    entries = []
    for i, task in enumerate(tasks):
        model = tiny_hmora(preset, overrides=overrides, seed=0, layers=layers)
        randomize_adapters(model, seed=10 + i)
        entries.append(LibraryEntry(task, save_adapter(model, root / task / "adapter")))
    Library(root, "tiny", base_fingerprint(tiny_base(layers=layers)), entries).write()
    return root


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return make_library(tmp_path_factory.mktemp("lib"))


def config(library, preset="mole", **extra):
    return load_config(preset, {**NO_DROPOUT, "options.library": str(library), **extra})


def build(library, preset="mole", arch="qwen2", **extra):
    return build_model(tiny_base(arch), config(library, preset, **extra), task_token_id=QUESTION_ID)


# ---------------------------------------------------------------------------- equations
def test_gate_is_a_softmax_of_the_logits_over_a_clamped_temperature():
    """Guards against τ multiplying instead of dividing, τ left unclamped (the official code
    keeps it in [1, 3]) or a softmax over the wrong axis."""
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    for tau, used in ((2.0, 2.0), (0.5, 1.0), (7.0, 3.0)):
        z = [2.0 / used, 0.0, -1.0 / used]
        total = sum(math.exp(v) for v in z)
        want = torch.tensor([[[math.exp(v) / total for v in z]]])
        t = torch.tensor([tau], requires_grad=True)
        got = gate_probs(logits, t, 1.0, 3.0)
        torch.testing.assert_close(got, want)
        got[0, 0, 0].backward()  # the clamp passes the gradient straight through
        assert t.grad.abs().item() > 0
    torch.testing.assert_close(gate_probs(logits, None, 1.0, 3.0), torch.softmax(logits, -1))


def test_the_gate_reads_the_normalised_input_and_rows_start_at_norm_001():
    """Guards against the gate reading the raw hidden state (the official code normalises its
    input) or an initialisation other than rows of norm 0.01."""
    from hmora_ds.methods.mole import LayerGate
    from hmora_ds.routing import RoutingContext

    gate = LayerGate(RouterId(0, ("q",), "token"), 4, 3, RoutingContext(), block=False)
    torch.testing.assert_close(gate.linear.weight.norm(dim=1), torch.full((3,), 0.01))
    u = torch.tensor([[[3.0, 4.0, 0.0, 0.0]]])
    with torch.no_grad():
        gate.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]]))
        gate.temperature.fill_(2.0)
    z = torch.tensor([0.6, 0.8, 0.0]) / 2.0
    torch.testing.assert_close(gate(u)[0, 0], torch.softmax(z, -1))
    w = torch.empty(5, 7)
    init_rows(w, 0.5)
    torch.testing.assert_close(w.norm(dim=1), torch.full((5,), 0.5))


def test_balance_loss_by_hand_with_padding_left_out_and_a_gradient():
    """L_balance = −Σ_i log q_i, q_i the mean gate of LoRA i over the gates and real tokens.
    Guards against padding counted in q, a loss computed without gradient (the official code's
    entropy term reads ``.data``), or a sum where the paper averages over the gates."""
    p1 = torch.tensor([[[0.5, 0.25, 0.25], [0.9, 0.05, 0.05]]], requires_grad=True)
    p2 = torch.tensor([[[0.2, 0.2, 0.6], [0.1, 0.1, 0.8]]], requires_grad=True)
    mask = torch.tensor([[1, 0]])  # the second token is padding
    recs = [RoutingRecord(RouterId(0, ("q",), "token"), p1, mask),
            RoutingRecord(RouterId(1, ("q",), "token"), p2, mask)]  # fmt: skip
    q = [(0.5 + 0.2) / 2, (0.25 + 0.2) / 2, (0.25 + 0.6) / 2]
    loss = balance_loss(recs)
    assert loss.item() == pytest.approx(-sum(math.log(v) for v in q), rel=1e-6)
    loss.backward()
    # d/dp1[0,0,i] = −1 / (2 q_i); the padded token gets none.
    torch.testing.assert_close(p1.grad[0, 0], torch.tensor([-1 / (2 * v) for v in q]))
    assert torch.equal(p1.grad[0, 1], torch.zeros(3))
    uniform = [RoutingRecord(recs[0].id, torch.full((2, 4, 3), 1 / 3), None)]
    assert balance_loss(uniform).item() == pytest.approx(3 * math.log(3), rel=1e-6)


def test_the_model_balance_loss_is_the_recomputed_one_weighted_by_alpha(library):
    """Guards against the model's loss not covering every layer's gate or the wrong weight."""
    model = build(library).eval()
    seen = []
    for gate in model.routers.values():
        gate.register_forward_hook(lambda _m, _i, out: seen.append(out))
    ids, attn, labels, prompt = batch()
    with torch.no_grad():
        out = model(ids, attn, labels, prompt)
    assert len(model.routers) == 6 and len(seen) == 6  # one gate per decoder layer
    recs = [RoutingRecord(RouterId(i, ("q",), "token"), g, attn) for i, g in enumerate(seen)]
    assert out.aux_by_kind["balance"].item() == pytest.approx(balance_loss(recs).item())
    torch.testing.assert_close(out.aux_weighted, 0.5 * out.aux_by_kind["balance"])


# ---------------------------------------------------------------------------- composition
def _force_gates(model, expert):
    for gate in model.routers.values():
        gate.select = lambda p, e=expert: torch.nn.functional.one_hot(
            torch.full(p.shape[:-1], e), p.shape[-1]
        ).to(p.dtype)


@pytest.mark.parametrize("gate_input", ["block", "site"])
def test_a_one_hot_gate_equals_that_library_lora_alone(library, gate_input):
    """Guards against experts stacked in another order than the library's tasks, a wrong
    scaling, or a LoRA's A paired with another's B: MoLE with every gate one-hot on LoRA j
    gives the logits of task j's plain LoRA loaded on its own."""
    model = build(library, **{"options.gate_input": gate_input}).eval()
    ids, attn, _, prompt = batch()
    for j, task in enumerate(("a", "b", "c")):
        _force_gates(model, j)
        alone = load_adapter(tiny_base(), library / task / "adapter").eval()
        with torch.no_grad():
            got, want = model(ids, attn, prompt_mask=prompt), alone(ids, attn, prompt_mask=prompt)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_site_gates_are_one_per_adapted_linear_and_block_gates_one_per_layer(library):
    block, site = build(library), build(library, **{"options.gate_input": "site"})
    assert len(block.routers) == 6 and len(site.routers) == 6 * 7
    assert site.routers["layer00_down"].linear.in_features == 96  # the down input's width
    assert block.routers["layer00_q_k_v_o_gate_up_down"].linear.in_features == 64


def test_the_library_defines_the_adapter_and_an_adapter_records_it(library):
    """Guards against the preset's rank / targets / expert count used instead of the
    library's, or an adapter config that cannot rebuild the model without the library."""
    model = build(library, **{"adapter.rank": 2, "options.tasks": ["c", "a"]})
    a = model.config.adapter
    assert (a.rank, a.alpha, a.num_experts) == (8, 16.0, 2)
    assert a.targets == ["q", "k", "v", "o", "gate", "up", "down"]
    assert model.config.options["tasks"] == ["c", "a"]
    bank = model.base_model.model.layers[1].mlp.up_proj
    sites = load_lora(library / "c" / "adapter")
    torch.testing.assert_close(bank.lora_A[:8], sites["model.layers.1.mlp.up_proj"].A)
    torch.testing.assert_close(bank.lora_B[:, :8], sites["model.layers.1.mlp.up_proj"].B)


# ---------------------------------------------------------------------------- invariants
def test_registry_invariants_on_a_tiny_library(library, tmp_path):
    """The invariant table of every method (only adapters train, save → load exactly,
    gradient checkpointing, a bf16 base) with a library. (Init is the library's LoRAs
    weighted 1/N, not the base model: MoLE starts from trained LoRAs.)"""
    c = config(library)
    inv.check_only_adapters_train(c)
    inv.check_round_trip(c, tmp_path, arch="qwen2")
    inv.check_gradient_checkpointing(c)
    inv.check_bf16_base(c)
    c_site = config(library, **{"options.gate_input": "site"})
    inv.check_gradient_checkpointing(c_site)


def meta_library(root, tasks=("a", "b")):
    """A library for the Qwen2-1.5B shape on the meta device: manifests and adapter configs
    only (the TP report reads no tensor)."""
    from hmora_ds.adapter_io import CONFIG_NAME, adapter_metadata
    from hmora_ds.params import build_meta_model, load_model_config

    model = build_meta_model(load_model_config("qwen2-1.5b"), load_config("lora_r8"))
    entries = []
    for task in tasks:
        (root / task).mkdir(parents=True)
        (root / task / CONFIG_NAME).write_text(json.dumps(adapter_metadata(model)))
        entries.append(LibraryEntry(task, root / task))
    Library(root, "qwen2-1.5b", model.shape_fingerprint(), entries).write()
    return root


@pytest.mark.parametrize("preset", ["mole", "mixture_of_loras"])
def test_tp_report_on_meta_counts_what_trains(preset, tmp_path):
    """MoLE trains its gates only (the library's 2 LoRAs are frozen, not counted);
    Mixture-of-LoRAs trains the LoRAs and one router per layer."""
    from hmora_ds.params import build_meta_model, load_model_config, parameter_report

    lib = meta_library(tmp_path / "lib")
    c = load_config(preset, {"options.library": str(lib)})
    inv.check_meta_tp(c)
    rep = parameter_report(build_meta_model(load_model_config("qwen2-1.5b"), c))
    layers, hidden = 28, 1536
    gates = layers * (2 * hidden + (1 if preset == "mole" else 2))  # W (+ τ or the bias)
    if preset == "mole":
        assert rep.trainable == rep.components["token routers"] == gates
    else:
        assert rep.trainable > 2 * 9_232_384  # two rank-8 LoRAs on all 7 linears
        assert rep.components["token routers"] == gates


def test_library_tensors_stay_bit_identical_while_the_gates_train(library):
    """Guards against the frozen experts reaching the optimizer (weight decay or an update
    would move them): after Adam steps on the gates they are bit for bit the library's."""
    model = build(library).train()
    frozen = {n: t.clone() for n, t in frozen_adapter_tensors(model).items()}
    assert len(frozen) == 6 * 7 * 2
    assert not set(frozen) & set(adapter_parameters(model))
    gates = {n: p.clone() for n, p in adapter_parameters(model).items()}
    opt = torch.optim.AdamW(adapter_parameters(model).values(), lr=1e-2, weight_decay=0.1)
    for seed in range(3):
        ids, attn, labels, prompt = batch(seed=seed)
        model(ids, attn, labels, prompt).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, t in frozen_adapter_tensors(model).items():
        assert torch.equal(t, frozen[n]), n
    assert any(not torch.equal(p, gates[n]) for n, p in adapter_parameters(model).items())


def test_a_saved_adapter_loads_and_evaluates_without_the_library(library, tmp_path):
    """Guards against an adapter that needs its library: the library directory is deleted,
    the adapter still loads (the frozen experts are in its file) and gives the same logits."""
    lib = shutil.copytree(library, tmp_path / "lib")
    model = build(lib).eval()
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(0.01)
    path = save_adapter(model, tmp_path / "adapter")
    shutil.rmtree(lib)
    loaded = load_adapter(tiny_base(), path).eval()
    ids, attn, labels, prompt = batch(seed=4)
    with torch.no_grad():
        ref, out = model(ids, attn, labels, prompt), loaded(ids, attn, labels, prompt)
    assert torch.equal(out.logits, ref.logits)
    with pytest.raises(LibraryError, match=r"library\.json not found"):
        build(lib)


def test_refusals_are_one_line(library, tmp_path):
    """Missing library, a directory that is not one, another base, LoRAs of different ranks,
    a single LoRA, and the method's own settings."""
    with pytest.raises(ValueError) as err:
        build_model(tiny_base(), load_config("mole"))
    assert str(err.value) == (
        "method.options.library: method mole composes the LoRAs of a library and needs its "
        "directory (built by python -m hmora_ds.library build --out DIR); set "
        "method.options.library=DIR"
    )
    with pytest.raises(ValueError, match=r"^method mole composes the LoRAs of a library: build "
                       r"its model with hmora_ds\.composition\.build_model"):  # fmt: skip
        HMoRAModel(tiny_base(), config(library))
    with pytest.raises(LibraryError, match=r"library\.json not found"):
        build(tmp_path)
    with pytest.raises(LibraryError, match=r"trained on base 'tiny' of another shape: "
                       r"num_hidden_layers 6 \(library\) vs 4 \(base\)"):  # fmt: skip
        build_model(tiny_base(layers=4), config(library))
    mixed = make_library(tmp_path / "mixed", tasks=("a",))
    other = tiny_hmora("lora_r8", overrides={"adapter.rank": 4})
    randomize_adapters(other)
    lib = Library.load(mixed)
    lib.entries.append(LibraryEntry("b", save_adapter(other, mixed / "b" / "adapter")))
    lib.write()
    with pytest.raises(LibraryError, match=r"mixes LoRA shapes: rank 8 \(a\) vs 4 \(b\)"):
        build(mixed)
    with pytest.raises(LibraryError, match=r"at least 2 LoRAs, the selection holds 1 \(a\)"):
        build(mixed, **{"options.tasks": ["a"]})
    for override, message in [
        ("routing.mode=topk", "routing.mode: must be soft: mole weights every library LoRA"),
        ("options.temperature_min=0", "options.temperature_min: must be > 0, got 0"),
        ("options.temperature_init=5", "options.temperature_init: must lie in"),
        ("options.balance_weight=-1", "options.balance_weight: must be >= 0"),
        ("loss.aux=blc", "loss.aux: must be none: mole has its own auxiliary loss"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            build_method(load_config("mole", [override]))


def test_expert_parallelism_is_refused_dense_gates():
    from hmora_ds.parallel.expert_parallel import validate_expert_parallel

    for preset in ("mole", "mixture_of_loras"):
        m = load_config(preset)
        with pytest.raises(ValueError, match=r"^parallel\.ep_size > 1 needs routing\.mode=topk"):
            validate_expert_parallel(2, 8, 2, 2, m.routing.mode, True)


def test_preset_has_the_papers_and_codes_settings():
    c = load_config("mole")
    o = c.options
    assert (o["temperature_init"], o["temperature_min"], o["temperature_max"]) == (1.0, 1.0, 3.0)
    assert o["balance_weight"] == 0.5 and o["gate_input"] == "block" and o["library"] is None
    assert c.routing.mode == "soft" and c.loss.aux == "none" and c.adapter.dropout == 0.0


# ---------------------------------------------------------------------------- two ranks
def _checkpoint_module_state(ckpt):
    from hmora_ds.train.checkpoint import safe_load

    (tag,) = [p for p in ckpt.iterdir() if p.is_dir()]
    return safe_load(tag / "mp_rank_00_model_states.pt")["module"]


@pytest.mark.multirank
def test_zero2_two_ranks_equal_one_process_for_both_library_methods(library, tmp_path):
    """MoLE and Mixture-of-LoRAs in one spawn: a ZeRO-2 SGD step on two gloo ranks with half
    the batch each applies one process's update (MoLE's balance loss and the routing loss are
    global), and the adapter exported from that DeepSpeed checkpoint loads and gives the live
    logits. The checkpoint holds MoLE's frozen experts (what a resumed run loads back: DeepSpeed
    restores the module state with ``load_state_dict``), bit for bit the library's."""
    configs = {p: config(library, p).to_dict() for p in ("mole", "mixture_of_loras")}
    run_ranks(inv.zero2_worker, inv.WORLD, tmp_path, configs, tmp_path, [], timeout=300)
    inv.check_zero2_results(configs, tmp_path)
    state = _checkpoint_module_state(tmp_path / "mole_ckpt")
    fresh = build(library)
    frozen = frozen_adapter_tensors(fresh)
    assert set(frozen) <= set(state)
    for n, t in frozen.items():
        assert torch.equal(state[n].float(), t), n
    with torch.no_grad():  # the resume path: the module state replaces the tensors
        for t in frozen.values():
            t.zero_()
    fresh.load_state_dict(state, strict=False)
    assert all(torch.equal(t, state[n]) for n, t in frozen_adapter_tensors(fresh).items())


def test_balance_loss_on_two_ranks_equals_one_process(monkeypatch):
    """Guards against a per-rank q (rank 0 with 1 real token, rank 1 with 3: the global mean
    differs from the mean of the two ranks' means)."""
    from tests._dist import two_ranks

    rid = RouterId(0, ("q",), "token")
    a = torch.tensor([[[0.8, 0.2], [0.5, 0.5]]])
    b = torch.tensor([[[0.1, 0.9], [0.3, 0.7], [0.4, 0.6]]])
    ma, mb = torch.tensor([[1, 0]]), torch.tensor([[1, 1, 1]])
    got = two_ranks(monkeypatch, lambda p, m, group: balance_loss(
        [RoutingRecord(rid, p, m)], group=group), (a, ma), (b, mb))  # fmt: skip
    q = [(0.8 + 0.1 + 0.3 + 0.4) / 4, (0.2 + 0.9 + 0.7 + 0.6) / 4]
    assert got.item() == pytest.approx(-sum(math.log(v) for v in q), rel=1e-6)


def test_the_methods_study_skips_library_presets_unless_the_run_names_a_library(tmp_path):
    """Guards against a study crashing on (or silently running) a preset whose library is not
    set, and against it staying skipped when ``--set method.options.library=DIR`` names one."""
    from hmora_ds.ablate.runner import plan
    from hmora_ds.ablate.studies import get_study
    from tests.test_ablate import CPU, _options

    s = get_study("methods")
    rows = [r for r in s.rows_for("cpu") if r.name in ("mole", "mixture-of-loras", "lora")]
    jobs = {j.row.name: j for j in plan(_options("methods", CPU, tmp_path), rows)}
    assert jobs["lora"].unsupported is None
    for name in ("mole", "mixture-of-loras"):
        why = f"method {name.replace('-', '_')} composes the LoRAs of a library and its preset"
        assert jobs[name].unsupported.startswith(why)
    # Those rows alone (--rows), with the library for every row (--set).
    sets = [f"method.options.library={tmp_path}"]
    mine = [r for r in rows if r.name != "lora"]
    jobs = plan(_options("methods", CPU, tmp_path, sets=sets), mine)
    assert len(jobs) == 2 and all(j.unsupported is None for j in jobs)

"""The method registry and the invariant table: every registered method is run through the
same checks (tests/_method_invariants.py) automatically."""

from __future__ import annotations

import pytest
import torch

from hmora_ds.config import load_config
from hmora_ds.methods import Method, available_methods, build_method, get_method, register_method
from tests import _method_invariants as inv
from tests._dist import run_ranks

BUILTIN = ("full_ft", "himole", "hmora", "hydralora", "lora", "mixlora", "molora")
#: Methods whose default config builds a model by itself. A method composing a LoRA library
#: (MoLE, Mixture-of-LoRAs) needs one: its own tests run the same checks with a tiny library.
METHODS = [m for m in available_methods() if get_method(m).library_experts is None]


def test_builtin_methods_are_registered_with_their_presets():
    assert set(BUILTIN) <= set(METHODS)
    for name in BUILTIN:
        cls = get_method(name)
        assert cls.name == name and issubclass(cls, Method)
        assert cls.default_config().method == name
    # every shipped preset names a registered method
    from hmora_ds.config import available_presets

    for preset in available_presets():
        assert load_config(preset).method in available_methods(), preset


def test_registry_errors_are_one_line_and_name_the_method():
    with pytest.raises(ValueError, match=r"method: 'nope' is not a registered method; available"):
        get_method("nope")

    class Clash(Method):
        name = "hmora"

    with pytest.raises(ValueError, match=r"register_method: 'hmora' is already"):
        register_method(Clash)
    with pytest.raises(ValueError, match=r"must be a Method subclass with a name"):
        register_method(type("Nameless", (Method,), {}))
    assert get_method("hmora").__name__ == "HMoRA"


def test_methods_refuse_settings_they_do_not_have():
    with pytest.raises(
        ValueError, match=r"^routing\.task_encoder: must be none.*\(method molora\)"
    ):
        inv.build(load_config("molora", ["routing.task_encoder=transformer"]))
    with pytest.raises(ValueError, match=r"^adapter\.num_experts: must be 1.*\(method lora\)"):
        inv.build(load_config("lora_r8", ["adapter.num_experts=4"]))
    with pytest.raises(ValueError, match=r"^options\.x: method hmora takes no options"):
        inv.build(load_config("hmora", ["options.x=1"]))


def test_configs_without_a_method_field_are_read_as_before():
    data = load_config("molora").to_dict()
    del data["method"]
    from hmora_ds.config import HMoRAConfig

    assert HMoRAConfig.from_dict(data).method == "hmora"  # the general implementation
    data["full_finetune"], data["adapter"]["targets"] = True, []
    assert HMoRAConfig.from_dict(data).method == "full_ft"


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_init_equals_base_model(name, arch):
    inv.check_init_equals_base(get_method(name).default_config(), arch)


@pytest.mark.parametrize("name", METHODS)
def test_only_adapter_parameters_train(name):
    inv.check_only_adapters_train(get_method(name).default_config())


@pytest.mark.parametrize("name", [m for m in METHODS if m != "full_ft"])
def test_save_load_round_trip(name, tmp_path):
    inv.check_round_trip(get_method(name).default_config(), tmp_path)


@pytest.mark.parametrize("name", METHODS)
def test_gradient_checkpointing_parity(name):
    inv.check_gradient_checkpointing(get_method(name).default_config())


@pytest.mark.parametrize("name", METHODS)
def test_compiled_decoder_layers_equal_eager_without_graph_breaks(name):
    """Dynamo's capture (``fullgraph=True``: any graph break fails) and guards, every method."""
    inv.check_compiled_layers(get_method(name).default_config(), backend="eager")


@pytest.mark.parametrize("name", ["hmora", "adamole", "moelora", "himole"])
def test_compiled_forward_and_backward_graphs_equal_eager(name):
    """The forward and backward traced by AOT autograd, as inductor receives them: the task
    encoder path, the sparse dispatcher's custom op with a variable number of experts per
    token (``nonzero``), the contrastive sample and the observed updates."""
    inv.check_compiled_layers(get_method(name).default_config(), backend="aot_eager")


def test_compiled_adapted_blocks_equal_eager():
    """``train.compile=blocks``: attention and MLP compiled, norms and residuals eager; the
    shared routers' pre-call hook runs inside the compiled block."""
    inv.check_compiled_layers(load_config("hmora_lw"), backend="eager", mode="blocks")


def test_deepspeed_hooks_run_eagerly_inside_compiled_regions():
    """``leave_hooks_eager``: hooks registered from DeepSpeed's modules (its ZeRO-3 release and
    backward hooks) run eagerly inside a compiled region, so dynamo does not compile them once
    per module; other hooks are left to dynamo; wrapping twice wraps nothing more."""
    from hmora_ds.compile import leave_hooks_eager

    seen: dict[str, list[bool]] = {"deepspeed": [], "user": []}

    def hook_from(package):
        def hook(module, args, output):
            seen[package].append(torch.compiler.is_compiling())

        hook.__module__ = f"{package}.runtime.zero.parameter_offload"
        return hook

    torch._dynamo.reset()
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    for package in seen:
        block[0].register_forward_hook(hook_from(package))
    assert leave_hooks_eager(block) == 1 and leave_hooks_eager(block) == 0
    block.compile(backend="eager", fullgraph=False)
    block(torch.randn(2, 4))
    assert seen["deepspeed"] and not any(seen["deepspeed"])  # eager: never traced
    assert seen["user"] and all(seen["user"])  # traced into the compiled graph


def test_zero3_layers_gather_their_routers_whole():
    """``gather_layers_whole`` (ZeRO-3 with ``train.compile``): each decoder layer is a
    ZeRO-3 leaf holding, as external parameters, exactly the parameters of the routers its
    adapted linears call; those routers' DeepSpeed hooks are removed while other modules' are
    wrapped; in training a layer's hidden states enter it requiring a gradient, and a layer
    called without them as its first positional input is refused."""
    from deepspeed.utils import z3_leaf_module

    from hmora_ds.base_model import decoder_layers
    from hmora_ds.compile import gather_layers_whole, leave_hooks_eager
    from hmora_ds.experts import MoRALinear

    model = inv.build(load_config("hmora_lw"))
    regions = list(decoder_layers(model.base_model))
    routers = gather_layers_whole(model)
    assert routers and all(z3_leaf_module(r) for r in regions)
    for region in regions:
        called = {
            id(m.router): m.router
            for m in region.modules()
            if isinstance(m, MoRALinear) and m.router is not None
        }
        want = {id(p) for r in called.values() for p in r.parameters()}
        assert want and set(region._external_params) == want
    assert {id(r) for r in routers} == {
        id(m.router) for m in model.modules() if isinstance(m, MoRALinear) and m.router is not None
    }

    def ds_hook(*_):
        return None

    ds_hook.__module__ = "deepspeed.runtime.zero.parameter_offload"
    router_linear = next(m for m in routers[0].modules() if isinstance(m, torch.nn.Linear))
    layer = next(iter(decoder_layers(model.base_model)))
    for module in (router_linear, layer):
        module.register_forward_pre_hook(ds_hook)
    assert leave_hooks_eager(model, gathered=routers) == 1
    assert not router_linear._forward_pre_hooks
    # the layer's own pre-hook (already eager) is left as it is; DeepSpeed's is wrapped
    eager = [getattr(h, "_hmora_eager", False) for h in layer._forward_pre_hooks.values()]
    assert eager == [False, True]

    # in training, hidden states without a gradient enter the layer as a leaf that needs one
    seen = []
    layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].requires_grad))
    h = torch.randn(1, 3, model.base_model.config.hidden_size)
    pos = model.base_model.model.rotary_emb(h, torch.arange(3)[None])
    layer(h, position_embeddings=pos)
    with torch.no_grad():
        layer(h, position_embeddings=pos)
    assert seen == [True, False]
    with pytest.raises(RuntimeError, match=r"^train\.compile under ZeRO-3: .* was called"):
        layer(hidden_states=h, position_embeddings=pos)


def test_inductor_compiled_layers_with_checkpointing_equal_eager():
    """The real compiler (C++ code generation on CPU) on whole decoder layers with gradient
    checkpointing inside them (one batch length: the checks above cover the guards)."""
    inv.check_compiled_layers(load_config("lora_r8"), "inductor", "layers", ckpt=True,
                              lengths=(12,))  # fmt: skip


@pytest.mark.parametrize("name", METHODS)
def test_a_bf16_base_with_fp32_adapters(name):
    inv.check_bf16_base(get_method(name).default_config())


@pytest.mark.parametrize("name", METHODS)
def test_tp_report_on_meta(name):
    inv.check_meta_tp(get_method(name).default_config())


@pytest.mark.multirank
def test_zero2_two_ranks_equal_one_process_and_export_loads(tmp_path):
    configs = {name: get_method(name).default_config().to_dict() for name in METHODS}
    run_ranks(inv.zero2_worker, inv.WORLD, tmp_path, configs, tmp_path, [], timeout=300)
    inv.check_zero2_results(configs, tmp_path)


def test_benchmark_and_baselines_study_list_every_registered_preset():
    from hmora_ds.ablate.studies import get_study
    from hmora_ds.bench.step import variants
    from hmora_ds.methods import library_missing, method_presets

    presets = [p for p, _, _ in method_presets()]
    assert presets[0] == "full_ft" and set(BUILTIN) <= {c.name for _, _, c in method_presets()}
    rows = {r.overrides["preset"] for r in get_study("baselines").rows}
    assert rows == set(presets)
    # A preset that needs a LoRA library: in the studies (the runner skips it unless the run
    # names a library, tests/test_mole.py), not in the benchmark.
    needs = {p for p in presets if library_missing(load_config(p))}
    assert {"mole", "mixture_of_loras"} <= needs
    bench = {v.preset for v in variants("cpu") if v.group == "methods"} - {None}
    assert bench == set(presets) - {"full_ft"} - needs  # a full fine-tune is not an adapter step


def test_plugins_that_cannot_be_imported_are_one_line_errors(tmp_path):
    from hmora_ds.methods import import_plugins

    with pytest.raises(ValueError, match=r"^plugins: could not import 'no_such_mod_xyz': "):
        import_plugins(["no_such_mod_xyz"])
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=r"^plugins: could not import .*bad\.py.*: boom"):
        import_plugins([str(bad)])
    with pytest.raises(ValueError, match=r"does not exist"):
        import_plugins([str(tmp_path / "missing.py")])


def test_a_method_can_route_on_extra_batch_inputs():
    """A method that routes its task routers on a domain label of each sequence (as gates
    over known domains do): the label is a keyword of forward / generate, reaches the method
    through RoutingBatch.extras, and a forward without it is a one-line error naming it."""
    import torch
    from torch import nn

    from hmora_ds.methods import RoutingBatch
    from hmora_ds.methods.hmora import HMoRA

    @register_method
    class DomainRouted(HMoRA):
        name = "test_domain_routed"
        batch_inputs = ("domain",)

        def build_modules(self, model, tokenizer, task_token_id):
            super().build_modules(model, tokenizer, task_token_id)
            model.domain_embedding = nn.Embedding(4, model.base_model.config.hidden_size)

        def routing_inputs(self, model, batch: RoutingBatch):
            return model.domain_embedding(batch.extras["domain"])

        def component_of(self, name):
            return "task encoder" if name.startswith("domain_") else super().component_of(name)

    config = load_config("hmora", ["method=test_domain_routed"])
    model = inv.build(config).eval()
    from tests.conftest import batch

    ids, attn, labels, prompt = batch(bsz=2)
    with torch.no_grad():
        a = model(ids, attn, labels, prompt, domain=torch.tensor([0, 0]))
        b = model(ids, attn, labels, prompt, domain=torch.tensor([0, 1]))
        rep = model.task_representation(ids, attn, prompt, domain=torch.tensor([2, 3]))
    task_a = [r.probs for r in a.routing_records if r.kind == "task"]
    task_b = [r.probs for r in b.routing_records if r.kind == "task"]
    assert task_a and all(torch.equal(x[0], y[0]) for x, y in zip(task_a, task_b, strict=True))
    assert not torch.allclose(task_a[0][1], task_b[0][1])  # only sequence 1 changed domain
    torch.testing.assert_close(rep, model.domain_embedding(torch.tensor([2, 3])))
    with pytest.raises(ValueError, match=r"routes on batch input\(s\) \['domain'\]"):
        model(ids, attn, labels, prompt)
    out = model.generate(ids, attention_mask=attn, domain=torch.tensor([1, 2]),
                         max_new_tokens=2, do_sample=False, pad_token_id=0)  # fmt: skip
    assert out.shape == (2, ids.shape[1] + 2)


def test_register_method_refuses_classes_that_are_not_named_methods():
    """Only a named :class:`Method` subclass registers. Guards against the check turned into
    ``isinstance(cls, type) or issubclass(...)`` (any named class accepted) or a class without
    a ``name`` attribute failing with an AttributeError instead of the one-line error."""

    class NamedButNotAMethod:
        name = "test_not_a_method"

    for bad in (NamedButNotAMethod, object, "hmora"):
        with pytest.raises(ValueError, match=r"^register_method: .* must be a Method subclass"):
            register_method(bad)
    assert "test_not_a_method" not in available_methods()


def test_plugins_import_once_each_by_path_or_module_name(tmp_path, monkeypatch):
    """Every spec of the list is imported (a repeated path is skipped, not the rest of the
    list), a file plug-in's module is in ``sys.modules`` (so its classes pickle and resolve),
    a failed import leaves no half-initialised module behind, and two files of the same name
    in different directories are two plug-ins. Guards against ``break``
    for ``continue``, a placeholder stored in ``sys.modules`` and a dotted-name import that
    never runs."""
    import sys

    from hmora_ds.methods import import_plugins

    body = (
        "from hmora_ds.methods import Method, register_method\n"
        "@register_method\n"
        "class P(Method):\n"
        "    name = {name!r}\n"
    )
    first = tmp_path / "plugin_first.py"
    first.write_text(body.format(name="test_plugin_first"))
    pkg = tmp_path / "plugin_pkg_xyz"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "second.py").write_text(body.format(name="test_plugin_second"))
    # The same file name in other directories is another plug-in each time: 12 of them, so
    # a module-name suffix with fewer than 12 values would have to collide.
    same_stem = []
    for i in range(12):
        (tmp_path / f"other{i}").mkdir()
        same_stem.append(tmp_path / f"other{i}" / "plugin_first.py")
        same_stem[-1].write_text(body.format(name=f"test_plugin_same_stem{i}"))
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = [str(first), str(first), "plugin_pkg_xyz.second", *map(str, same_stem)]
    import_plugins(specs)
    names = ["test_plugin_first", "test_plugin_second"]
    for name in names + [f"test_plugin_same_stem{i}" for i in range(12)]:
        cls = get_method(name)
        module = sys.modules[cls.__module__]
        assert module.P is cls
    bad = tmp_path / "plugin_bad.py"
    bad.write_text("import math\nx = 1 / 0\n")
    with pytest.raises(ValueError, match=r"plugin_bad\.py': ZeroDivisionError: division by zero$"):
        import_plugins([str(bad)])
    assert not [m for m in sys.modules if "plugin_bad" in m]


def test_full_finetune_method_requires_full_finetune_naming_the_field():
    """``method=full_ft`` without ``full_finetune=true`` is refused naming the field and the
    value it needs. Guards against the field name or the fix dropped from the message."""
    data = load_config("full_ft").to_dict()
    data["full_finetune"] = False
    data["adapter"]["targets"] = ["q"]  # else the empty targets are refused first
    from hmora_ds.config import HMoRAConfig

    with pytest.raises(ValueError, match=r"^full_finetune: must be true \(method full_ft\)$"):
        inv.build(HMoRAConfig.from_dict(data))


def test_lora_refuses_experts_naming_the_methods_that_have_them():
    """The refusal says which methods to use instead (the fix, not only the fault)."""
    with pytest.raises(ValueError, match=r"use method=molora or method=hmora for experts"):
        inv.build(load_config("lora_r8", ["adapter.num_experts=4"]))


def test_plain_lora_adapts_only_its_targets():
    """LoRA puts an adapter on the configured targets and nowhere else. Guards against
    ``experts_at`` answering 1 for every linear (a LoRA on every projection)."""
    overrides = ["adapter.targets=[q,v]", "adapter.single_lora_layers=[q,v]"]
    model = inv.build(load_config("lora_r8", overrides))
    adapted = {name.rsplit(".", 1)[-1] for name in model.adapted_modules()}
    assert adapted == {"q_proj", "v_proj"}


def test_hmora_parameter_components_by_name():
    """Every trainable tensor of HMoRA (learnable α on) falls in its own TP-report component:
    α, e_task and the task encoder are told apart by name. Guards against a mislabelled or
    inverted name test (everything reported as e_task, α counted as a router)."""
    model = inv.build(load_config("hmora", ["routing.learn_alpha=true"]))
    method = model.method
    seen: dict[str, set[str]] = {}
    for name in model.state_dict(keep_vars=True):
        param = dict(model.named_parameters()).get(name)
        if param is None or not param.requires_grad:
            continue
        seen.setdefault(method.component_of(name), set()).add(name)
    assert seen["e_task"] == {"task_encoder.task_embedding"}
    assert seen["alpha"] and all(n.endswith("alpha_logit") for n in seen["alpha"])
    assert all(n.startswith("task_encoder.") for n in seen["task encoder"])
    assert all(".task_router." in n for n in seen["task routers"])
    assert all(".token_router." in n for n in seen["token routers"])
    assert all(n.endswith("lora_A") for n in seen["lora A"])
    assert all(n.endswith("lora_B") for n in seen["lora B"])
    assert "base model" not in seen


REFUSALS = [
    ("molora", "routing.task_encoder=transformer",
     "routing.task_encoder: must be none: MoLoRA routes tokens only; use method=hmora for task "
     "routing (method molora)"),
    ("molora", "adapter.hydra=true",
     "adapter.hydra: must be false; use method=hydralora for a shared A (method molora)"),
    ("molora", "loss.aux=cgjs", "loss.aux: must be none or blc (method molora)"),
    ("mixlora", "routing.mode=soft",
     "routing.mode: must be topk (MixLoRA is sparse) (method mixlora)"),
    ("mixlora", "routing.task_encoder=transformer",
     "routing.task_encoder: must be none: MixLoRA routes tokens only (method mixlora)"),
    ("mixlora", "adapter.hydra=true", "adapter.hydra: must be false (method mixlora)"),
    ("mixlora", "loss.aux=cgjs", "loss.aux: must be blc (or none) (method mixlora)"),
    ("hydralora", "adapter.hydra=false",
     "adapter.hydra: must be true (a shared A is the method) (method hydralora)"),
    ("hydralora", "routing.task_encoder=transformer",
     "routing.task_encoder: must be none: HydraLoRA routes tokens only (method hydralora)"),
    ("lora_r8", "adapter.num_experts=4",
     "adapter.num_experts: must be 1: one plain LoRA per layer (got 4); use method=molora or "
     "method=hmora for experts (method lora)"),
    ("lora_r8", "loss.aux=blc", "loss.aux: must be none: plain LoRA has no router (method lora)"),
    ("hmora", ["routing.task_encoder=transformer", "routing.encoder_heads=5"],
     "routing.encoder_heads: (5) must divide the model's hidden size (64) (method hmora)"),
    ("hmora", "routing.task_encoder=none",
     "routing.task_encoder: 'none' leaves layers [5] (α > beta_high=0.8) without any router; "
     "set routing.beta_high=1.0 or choose a task encoder (method hmora)"),
    ("himole", "routing.mode=soft",
     "routing.mode: must be topk (KeepTop-k, eq. 4) (method himole)"),
    ("himole", "routing.task_encoder=transformer",
     "routing.task_encoder: must be none: HiMoLE's sentence router reads the site's own hidden "
     "states (method himole)"),
    ("himole", "routing.topk_renorm=paper",
     "routing.topk_renorm: must be sum (the kept gates are renormalised to sum 1) (method himole)"),
    ("himole", "adapter.hydra=true", "adapter.hydra: must be false (method himole)"),
    ("himole", "loss.aux=cgjs",
     "loss.aux: must be blc (the Switch-style L_balance, appendix C) or none (method himole)"),
    ("himole", "adapter.num_experts=8",
     "adapter.num_experts: must equal options.groups × options.experts_per_group = 16 (got 8); "
     "set adapter.num_experts=16 (method himole)"),
    ("himole", "options.div_weight=-1",
     "options.div_weight: must be >= 0, got -1.0 (method himole)"),
    ("himole", "options.div_every=0", "options.div_every: must be >= 1, got 0 (method himole)"),
    ("himole", ["options.groups=1", "adapter.num_experts=4", "options.cluster_candidates=[2]"],
     "options.div_weight: needs options.groups >= 2 (L_div compares groups); set it to 0 "
     "(method himole)"),
    ("himole", "adapter.targets=[gate,up]",
     "options.div_weight: needs 'down' among the routed adapter.targets (L_div compares the "
     "groups' FFN outputs); add it or set options.div_weight=0 (method himole)"),
    ("himole", "options.stage1_fraction=1.0",
     "options.stage1_fraction: must lie in [0, 1), got 1.0 (method himole)"),
    ("himole", "options.stage2_lr_scale=0",
     "options.stage2_lr_scale: must be > 0, got 0.0 (method himole)"),
    *[("himole", f"options.cluster_candidates={c}",
       "options.cluster_candidates: each N must be >= 2 with N × options.experts_per_group <= "
       f"options.max_experts (16), each once; got {c.replace(',', ', ')} (method himole)")
      for c in ("[1,2]", "[2,2]", "[5]")],
    ("himole", "options.sentence_encoder=",
     "options.sentence_encoder: must be 'base' or a sentence-transformers model path "
     "(method himole)"),
    ("himole", "routing.top_k=5",
     "routing.top_k: must be <= options.experts_per_group (4): stage 1 routes each sequence "
     "among its group's experts only; lower it or set options.stage1_fraction=0 (method himole)"),
    ("himole", "options.groups=0",
     "options.groups: must be >= 1, got 0 (method himole); adapter.num_experts: must equal "
     "options.groups × options.experts_per_group = 0 (got 16); set adapter.num_experts=0 (method "
     "himole); options.div_weight: needs options.groups >= 2 (L_div compares groups); set it to "
     "0 (method himole)"),
    ("himole", "options.experts_per_group=0",
     "options.experts_per_group: must be >= 1, got 0 (method himole); adapter.num_experts: must "
     "equal options.groups × options.experts_per_group = 0 (got 16); set adapter.num_experts=0 "
     "(method himole); routing.top_k: must be <= options.experts_per_group (0): stage 1 routes "
     "each sequence among its group's experts only; lower it or set options.stage1_fraction=0 "
     "(method himole)"),
]  # fmt: skip


@pytest.mark.parametrize(("preset", "override", "message"), REFUSALS)
def test_each_refused_setting_is_one_exact_line(preset, override, message):
    """Every setting a baseline method does not have is refused with exactly one line: the
    dotted field, what it must be, why or what to use instead, and the method. Guards against
    a refusal naming the wrong field, losing its fix, or not firing."""
    overrides = [override] if isinstance(override, str) else override
    with pytest.raises(ValueError) as err:
        inv.build(load_config(preset, overrides))
    assert str(err.value) == message


ACCEPTED = [
    ("molora", ["loss.aux=none"]), ("molora", ["loss.aux=blc"]), ("mixlora", ["loss.aux=none"]),
    ("mixlora", ["loss.aux=blc"]), ("himole", ["loss.aux=none"]),
    ("himole", ["options.stage1_fraction=0", "routing.top_k=5"]),  # one stage: any k
    ("himole", ["options.div_weight=0", "options.groups=1", "adapter.num_experts=4",
                "options.cluster_candidates=[2]"]),  # no L_div: one group is fine
    ("himole", ["adapter.targets=[gate,up]", "options.div_weight=0"]),
    ("himole", ["options.experts_per_group=1", "adapter.num_experts=4", "routing.top_k=1"]),
]  # fmt: skip


@pytest.mark.parametrize(("preset", "overrides"), ACCEPTED)
def test_the_settings_a_method_allows_are_accepted(preset, overrides):
    """The other side of the refusals (each refusal's boundary): the settings a method has
    are accepted. Guards against a refusal that fires on its own escape hatch."""
    config = inv.build(load_config(preset, overrides)).config
    assert config.method == load_config(preset).method


def _records():
    """Token routers of two shapes, two of them under one mask and one under another (a
    separate batch of the same shape), and two task routers without a mask."""
    from hmora_ds.routing.context import RouterId, RoutingRecord

    g = torch.Generator().manual_seed(1)

    def probs(*shape):
        return torch.softmax(torch.randn(*shape, generator=g) * 2, -1)

    m1 = torch.tensor([[1, 1, 0], [1, 0, 0]])
    m2 = torch.tensor([[1, 1, 1], [0, 1, 1]])
    tok = lambda i: RouterId(i, ("q",), "token")  # noqa: E731
    return [
        RoutingRecord(tok(0), probs(2, 3, 4), m1),
        RoutingRecord(RouterId(0, ("q",), "task"), probs(2, 4), None),
        RoutingRecord(tok(1), probs(2, 3, 4), m1),
        RoutingRecord(tok(2), probs(2, 3, 4), m2),
        RoutingRecord(tok(3), probs(2, 3, 6), m2),
        RoutingRecord(RouterId(1, ("q",), "task"), probs(2, 4), None),
    ]


def test_stack_records_groups_by_kind_shape_and_mask():
    """Routers stack only with routers of their kind and shape under the same mask: a stack
    keyed without the mask would score router 2 under router 0's mask."""
    from hmora_ds.methods.base import stack_records

    recs = _records()
    stacks = stack_records(recs)
    assert [(k, tuple(p.shape)) for k, p, _ in stacks] == [
        ("token", (2, 2, 3, 4)),
        ("task", (2, 2, 4)),
        ("token", (1, 2, 3, 4)),
        ("token", (1, 2, 3, 6)),
    ]
    assert stacks[0][2] is recs[0].mask and stacks[2][2] is recs[3].mask
    assert stacks[3][2] is recs[4].mask and stacks[1][2] is None
    torch.testing.assert_close(stacks[0][1], torch.stack([recs[0].probs, recs[2].probs]))


@pytest.mark.parametrize("aux", ["cgjs", "blc"])
def test_aux_losses_are_each_routers_loss_summed_by_kind(aux, monkeypatch):
    """``Method.aux_losses``: per kind, the sum of every router's own loss under its own mask,
    with the config's γ_b, γ_c (CGJS) or k (L_blc), over the caller's group (a simulated second
    rank, see tests/test_losses.py); task routers join L_blc only with ``blc_task_routers``."""
    from hmora_ds.losses import cgjs_loss, load_balance_loss
    from hmora_ds.routing.context import RoutingRecord
    from tests._dist import two_ranks

    cfg = load_config(
        "hmora", [f"loss.aux={aux}", "loss.gamma_b=0.9", "loss.gamma_c=0.3", "routing.top_k=3"]
    )
    method = build_method(cfg)
    mine, other = _records(), _records()
    for r in other:
        r.probs.copy_(r.probs.flip(0))

    def one(rec, group=None):
        if aux == "cgjs":
            return cgjs_loss(rec.probs, rec.mask, gamma_b=0.9, gamma_c=0.3, group=group)
        return load_balance_loss(rec.probs, 3, rec.mask, group=group)

    got = two_ranks(
        monkeypatch, lambda recs, group: method.aux_losses(recs, group), (mine,), (other,)
    )
    kinds = ["token"] + (["task"] if aux == "cgjs" else [])
    assert sorted(got) == sorted(kinds)
    for kind in kinds:
        expected = 0.0
        for a, b in zip(mine, other, strict=True):
            if a.id.kind == kind:
                expected = expected + one(
                    RoutingRecord(
                        a.id,
                        torch.cat([a.probs, b.probs]),
                        None if a.mask is None else torch.cat([a.mask, b.mask]),
                    )
                )
        torch.testing.assert_close(got[kind], expected, msg=kind)


def test_default_config_names_the_class_that_asks():
    """A subclass inheriting its parent's preset, or having none, still names itself."""
    lora = get_method("lora")
    derived = type("DerivedLoRA", (lora,), {"name": "derived_lora"})
    bare = type("Bare", (Method,), {"name": "bare_method", "preset": None})
    assert derived.preset == lora.preset and derived.default_config().method == "derived_lora"
    assert bare.default_config().method == "bare_method"


def test_one_stage_methods_have_no_stage_one_and_a_flat_lr_scale():
    method = build_method(load_config("lora_r8"))
    assert method.stage1_steps(100) == 0
    assert [method.lr_scale(s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]


class _BosTokenizer:
    """A mechanics stand-in tokenizer: one id per character, a BOS (id 1) with special tokens
    (as Llama's tokenizer adds one), so asking for special tokens changes the ids."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def test_e_task_starts_as_the_question_mark_embedding():
    """Without ``task_token_id`` the tokenizer's ``?`` (no special tokens) picks e_task's
    initial embedding; with neither, a one-line error names both ways."""
    from hmora_ds.methods.hmora import resolve_task_token_id
    from hmora_ds.model import HMoRAModel
    from tests.conftest import tiny_base

    assert resolve_task_token_id(_BosTokenizer(), None) == ord("?")
    assert resolve_task_token_id(None, 7) == 7
    with pytest.raises(ValueError) as err:
        resolve_task_token_id(None, None)
    assert str(err.value) == (
        "task_token_id: the transformer task encoder initialises e_task from the embedding of "
        "'?'; pass tokenizer= or task_token_id="
    )
    multi = type("T", (), {"encode": lambda self, t, add_special_tokens: [5, 6]})()
    with pytest.raises(ValueError) as err:
        resolve_task_token_id(multi, None)
    assert str(err.value) == "tokenizer: '?' is not a single token ([5, 6])"
    base = tiny_base("qwen2", 0, 6, 0.02)
    model = HMoRAModel(base, load_config("hmora"), tokenizer=_BosTokenizer())
    assert model.task_token_id == ord("?")
    torch.testing.assert_close(
        model.task_encoder.task_embedding.detach(),
        base.get_input_embeddings().weight[ord("?")].detach(),
    )


def test_without_a_task_encoder_every_layer_routes_by_token():
    """``routing.task_encoder=none`` (with β_high = 1 so no layer is task-only): token routing
    in every layer, no task encoder module, no tokenizer needed, and the model runs."""
    from hmora_ds.model import HMoRAModel
    from tests.conftest import batch, tiny_base

    cfg = load_config("hmora", ["routing.task_encoder=none", "routing.beta_high=1.0"])
    method = build_method(cfg)
    assert method.modes(5) == ["token"] * 5
    method.validate_for_model(64, 5)  # no layer left without a router: accepted
    model = HMoRAModel(tiny_base("qwen2", 0, 6, 0.02), cfg)
    assert model.task_encoder is None
    ids, attn, labels, prompt = batch()
    out = model(input_ids=ids, attention_mask=attn, labels=labels, prompt_mask=prompt)
    assert torch.isfinite(out.loss)


def test_mean_pool_task_encoder_needs_no_tokenizer():
    from hmora_ds.model import HMoRAModel
    from tests.conftest import tiny_base

    cfg = load_config("hmora", ["routing.task_encoder=mean_pool"])
    model = HMoRAModel(tiny_base("qwen2", 0, 6, 0.02), cfg)
    assert model.task_encoder.kind == "mean_pool" and model.task_token_id is None


def test_task_encoder_follows_the_routing_config_and_the_tables_device():
    from hmora_ds.methods.hmora import build_task_encoder

    routing = load_config("hmora", [
        "routing.encoder_layers=2", "routing.encoder_heads=4", "routing.encoder_ffn_mult=3.0",
        "routing.encoder_dropout=0.2",
    ]).routing  # fmt: skip
    weight = torch.randn(50, 32) * 0.05
    enc = build_task_encoder(routing, 32, weight, 7)
    layer = enc.encoder.layers[0]
    assert len(enc.encoder.layers) == 2 and layer.self_attn.num_heads == 4
    assert layer.linear1.out_features == 96 and layer.dropout.p == 0.2
    rms = weight.pow(2).mean().sqrt().item()
    assert enc.position_scale.item() == pytest.approx(rms * 2**0.5)
    torch.testing.assert_close(enc.task_embedding.detach(), weight[7])
    meta = build_task_encoder(routing, 32, torch.empty(50, 32, device="meta"), None)
    assert all(p.device.type == "meta" for p in meta.parameters())

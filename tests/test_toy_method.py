"""Adding a method without touching the library: a toy method defined in this file, registered
through the public API, run through the invariant table, trained for 3 steps under the real
``deepspeed`` launcher (2 CPU ranks, ZeRO-2; the run config names this file in ``plugins``),
exported from its checkpoint and reloaded.

The toy exercises what the built-in methods do not: its own router module and options, a
**variable number of experts per token** (an expert is used when its probability reaches
``threshold`` × the largest one: one to E experts per token, computed by the sparse
dispatcher), **different expert counts per layer** (2 in the lower half, 4 in the upper), its
own auxiliary loss and its own parameter component in the TP report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from hmora_ds.config import HMoRAConfig, load_config
from hmora_ds.experts import DispatchPlan
from hmora_ds.losses import routing_moments
from hmora_ds.methods import Method, get_method, register_method
from hmora_ds.routing import RouterId

THIS_FILE = str(Path(__file__).resolve())
NAME = "toy_threshold"


@dataclass
class ToyOptions:
    threshold: float = 0.5
    lower_experts: int = 2
    upper_experts: int = 4
    entropy_weight: float = 0.01


class ThresholdRouter(nn.Module):
    """softmax(W x) per token; experts with p ≥ threshold · max p are kept, renormalised."""

    top_k = None  # a variable number of experts per token
    sparse_gates = True
    shared = False

    def __init__(self, rid: RouterId, in_features: int, num_experts: int, threshold: float, ctx):
        super().__init__()
        self.linear = nn.Linear(in_features, num_experts)
        self.rid, self.threshold, self._ctx = rid, threshold, ctx
        self._slot = ctx.slot()

    def new_round(self, *_: object) -> None:
        pass

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def dispatch(self, gates: torch.Tensor, num_tokens_per_row: int) -> DispatchPlan:
        return DispatchPlan.build(gates, None, num_tokens_per_row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.linear(x.to(self.linear.weight.dtype)).float(), dim=-1)
        self._ctx.record(self.rid, p, self._ctx.token_mask_for(x), self._slot)
        kept = torch.where(p >= self.threshold * p.amax(-1, keepdim=True), p, torch.zeros_like(p))
        return kept / kept.sum(-1, keepdim=True)


@register_method
class ToyThreshold(Method):
    name = NAME
    options_class = ToyOptions
    components = ("lora A", "lora B", "toy routers", "base model")

    @classmethod
    def default_config(cls) -> HMoRAConfig:
        return load_config(
            {
                "method": NAME,
                "adapter": {"rank": 4, "alpha": 8, "dropout": 0.0, "num_experts": 4,
                            "targets": ["gate", "up", "down"], "compute": "sparse"},
                "routing": {"mode": "soft", "task_encoder": "none", "beta_high": 1.0},
                "loss": {"aux": "none", "label_smoothing": 0.0},
                "options": {"threshold": 0.5},
            }
        )  # fmt: skip

    def validate(self) -> None:
        o = self.options
        self.require("options.threshold", 0.0 < o.threshold <= 1.0, "must lie in (0, 1]")
        self.require("options.lower_experts", o.lower_experts >= 2, "must be >= 2")

    def experts_at(self, layer: int, target: str) -> int | None:
        if target not in self.config.adapter.targets:
            return None
        lower = layer < self.num_layers // 2
        return self.options.lower_experts if lower else self.options.upper_experts

    def build_router(self, model, layer, targets, in_features, num_experts) -> nn.Module:
        rid = RouterId(layer, targets, "token")
        return ThresholdRouter(rid, in_features, num_experts, self.options.threshold,
                               model.routing_context)  # fmt: skip

    def aux_losses(self, records, group):
        """Σ over routers of the mean router entropy (a certainty loss of our own), over the
        global batch: the library's differentiable all-reduce of routing moments over
        ``group`` makes N ranks equal one process (a per-rank mean would not)."""
        terms = [routing_moments(r.probs, r.mask, group=group)[1] for r in records]
        return {"entropy": torch.stack(terms).sum()} if terms else {}

    def aux_weight(self, kind: str) -> float:
        return self.options.entropy_weight

    @property
    def stats_top_k(self) -> int | None:
        return None

    def component_of(self, name: str) -> str:
        if name.startswith("routers."):
            return "toy routers"
        return super().component_of(name)


def _config():
    return get_method(NAME).default_config()


def test_the_toy_is_registered_through_the_public_api():
    from hmora_ds.methods import available_methods

    assert NAME in available_methods()
    with pytest.raises(ValueError, match=r"^options\.threshold: must lie in \(0, 1\]"):
        from tests._method_invariants import build

        build(_config().with_overrides({"options.threshold": 2.0}))


def test_per_layer_experts_and_a_variable_count_per_token():
    from tests._method_invariants import build, randomize

    model = build(_config())
    banks = model.adapted_modules()
    counts = {n: m.num_experts for n, m in banks.items()}
    assert {c for n, c in counts.items() if ".layers.0." in n} == {2}
    assert {c for n, c in counts.items() if ".layers.5." in n} == {4}
    assert all(m.sparse for m in banks.values())
    randomize(model)
    with torch.no_grad():
        for router in model.routers.values():
            torch.nn.init.normal_(router.linear.weight, std=0.1)
    x = torch.randn(2, 7, 64)
    block = model.base_model.model.layers[5].mlp.up_proj
    gates = block.router.gates(x)
    used = (gates > 0).sum(-1)
    assert used.min() >= 1 and used.max() > used.min(), used  # the count varies per token
    # The sparse dispatcher computes exactly the dense mixture with these gates.
    from hmora_ds.experts import DenseDispatcher, SparseDispatcher

    dense = DenseDispatcher().delta(block, x, x, gates)
    sparse = SparseDispatcher().delta(block, x, x, gates).view_as(dense)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.multirank
def test_the_toy_passes_the_invariant_table(tmp_path):
    from tests import _method_invariants as inv
    from tests._dist import run_ranks

    config = _config()
    for arch in ("qwen2", "llama"):
        inv.check_init_equals_base(config, arch)
    inv.check_only_adapters_train(config)
    inv.check_round_trip(config, tmp_path)
    inv.check_gradient_checkpointing(config)
    inv.check_meta_tp(config)
    inv.check_bf16_base(config)
    configs = {NAME: config.to_dict()}
    run_ranks(inv.zero2_worker, inv.WORLD, tmp_path, configs, tmp_path, [THIS_FILE], timeout=300)
    inv.check_zero2_results(configs, tmp_path)


@pytest.mark.slow
@pytest.mark.multirank
def test_the_toy_trains_under_the_deepspeed_launcher_exports_and_reloads(tiny_run_inputs, tmp_path):
    from hmora_ds.adapter_io import load_adapter
    from hmora_ds.export import export_adapter
    from tests._train_helpers import launch, overrides, summary

    preset = tmp_path / "toy.yaml"
    preset.write_text(json.dumps(_config().to_dict()))  # JSON is YAML
    out = tmp_path / "run"
    args = overrides(
        tiny_run_inputs, out, f"preset={preset}", f"plugins=[{THIS_FILE}]",
        "train.max_steps=3", "checkpoint.every=3", "eval.every=3",
    )  # fmt: skip
    launch("deepspeed", "zero2.json", args)
    s = summary(out)
    assert s["steps"] == 3 and s["zero_stage"] == 2
    adapter = export_adapter(out / "checkpoints", tmp_path / "exported")
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["config"]["method"] == NAME and meta["config"]["options"]["threshold"] == 0.5
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_run_inputs / "model")
    model = load_adapter(base, adapter)
    assert type(model.method).__name__ == "ToyThreshold"
    written = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_run_inputs / "model"),
                           out / "adapter")  # fmt: skip
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.eval()(ids).logits, written.eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # export == the run's own adapter
    # The run trained: the routers and B moved away from their initial values.
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_the_memory_planner_counts_the_toys_own_sites():
    from transformers import LlamaConfig

    from hmora_ds.memory import Shapes, Workload, layer_activation_bytes, site_method

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300)  # fmt: skip
    w = Workload(2, 32, 16, False, 4, 4, eager_attention=True, on_gpu=False)
    shapes = Shapes.from_hf(cfg)
    method = site_method(_config(), shapes)
    per_layer = [layer_activation_bytes(shapes, method, w, i) for i in range(6)]
    # 2 experts on the lower half, 4 on the upper: 3 adapted linears × (2aER + 4E); its routers
    # are soft (routing.mode), so their probabilities are the gates counted with the adapters
    upper_minus_lower = 3 * (2 * 4 * 2 * 4 + 4 * 2)
    assert per_layer[5] - per_layer[0] == upper_minus_lower
    assert layer_activation_bytes(shapes, method, w) == pytest.approx(sum(per_layer) / 6)

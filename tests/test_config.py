"""Config loading, overrides and every invalid combination named by the foundation issue."""

import json
import re

import pytest

from hmora_ds.config import HMoRAConfig, load_config
from tests.conftest import PRESETS, tiny_hmora


def test_all_presets_ship_and_load():
    paper = {
        "lora_r8",
        "lora_r64",
        "molora",
        "mixlora",
        "hydralora",
        "hmora",
        "hmora_lw",
        "full_ft",
    }
    assert paper <= set(PRESETS)  # the HMoRA paper's table 3 rows all ship
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.preset == name
        assert HMoRAConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_paper_main_result_settings():
    lw = load_config("hmora_lw")
    assert (lw.adapter.rank, lw.adapter.num_experts, lw.routing.top_k) == (8, 8, 2)
    assert (lw.routing.eps, lw.routing.mu, lw.routing.beta_low, lw.routing.beta_high) == (
        4.0,
        -2.0,
        0.2,
        0.8,
    )
    assert (lw.loss.aux, lw.loss.gamma_b, lw.loss.gamma_c, lw.loss.aux_weight) == (
        "cgjs",
        1.0,
        0.4,
        0.003,
    )
    assert lw.adapter.eta_b == 2.0 and lw.adapter.hydra and lw.routing.share_routers
    assert lw.adapter.single_lora_layers == ["o", "down"]
    assert load_config("hmora").adapter.eta_b == 1.0
    assert load_config("mixlora").loss.aux == "blc"


def test_dotted_overrides_parse_types():
    cfg = load_config(
        "hmora",
        [
            "routing.eps=2",
            "routing.mu=0",
            "routing.beta_low=0.1",
            "routing.beta_high=0.9",
            "routing.share_routers=true",
            "routing.task_encoder=mean_pool",
            "adapter.num_experts=16",
            "adapter.rank=4",
            "adapter.hydra=true",
            "adapter.single_lora_layers=[o, down]",
        ],
    )
    assert cfg.routing.eps == 2 and cfg.routing.mu == 0
    assert cfg.routing.share_routers is True and cfg.routing.task_encoder == "mean_pool"
    assert cfg.adapter.num_experts == 16 and cfg.adapter.rank == 4 and cfg.adapter.hydra
    assert cfg.adapter.single_lora_layers == ["o", "down"]


def test_load_from_yaml_and_json(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("adapter:\n  rank: 4\nrouting:\n  mode: soft\n")
    assert load_config(y).adapter.rank == 4
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"loss": {"aux": "blc", "aux_weight": 0.01}}))
    assert load_config(j, {"routing.top_k": 1}).routing.top_k == 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["routing.top_k=9"], "routing.top_k"),  # k > e
        (["routing.top_k=0"], "routing.top_k"),  # k < 1
        (["loss.gamma_b=1.5"], "loss.gamma_b"),
        (["loss.gamma_c=-0.1"], "loss.gamma_c"),
        (["loss.gamma_b=0.3", "loss.gamma_c=0.5"], "loss.gamma_c"),  # γ_c > γ_b
        (["adapter.targets=[q, attn]"], "adapter.targets"),
        (["adapter.rank=0"], "adapter.rank"),
        (["adapter.num_experts=0"], "adapter.num_experts"),
        (["adapter.single_lora_layers=[q]", "adapter.targets=[k]"], "adapter.single_lora_layers"),
        (["routing.mode=dense"], "routing.mode"),
        (["routing.topk_renorm=l1"], "routing.topk_renorm"),
        (["routing.task_encoder=lstm"], "routing.task_encoder"),
        (["routing.beta_low=0.9", "routing.beta_high=0.8"], "routing.beta_low"),
        (["loss.aux=entropy"], "loss.aux"),
        (["adapter.dropout=1.0"], "adapter.dropout"),
        (["adapter.targets=[]"], "adapter.targets"),
    ],
)
def test_invalid_combinations_name_the_field(overrides, field):
    with pytest.raises(ValueError, match="^" + re.escape(field) + ":"):
        load_config("hmora", overrides)


def test_unknown_keys_and_presets():
    with pytest.raises(ValueError, match=r"unknown key 'routing\.epsilon'"):
        load_config("hmora", ["routing.epsilon=2"])
    with pytest.raises(ValueError, match=r"adapter: unknown key\(s\) \['ranks'\]"):
        HMoRAConfig.from_dict({"adapter": {"ranks": 3}})
    with pytest.raises(ValueError, match="preset 'hmora_xl' does not exist; available"):
        load_config("hmora_xl")
    with pytest.raises(ValueError, match="expected key=value"):
        load_config("hmora", ["routing.eps"])


def test_shape_dependent_checks_at_injection():
    # 64 hidden / 5 heads does not divide.
    with pytest.raises(ValueError, match=r"^routing\.encoder_heads: \(5\) must divide .* \(64\)"):
        tiny_hmora("hmora", overrides=["routing.encoder_heads=5"])
    # ε = 4, μ = −2 over 6 layers: the last layer is task-only, impossible without an encoder.
    with pytest.raises(ValueError, match=r"^routing\.task_encoder: 'none' leaves layers \[5\]"):
        tiny_hmora("hmora", overrides=["routing.task_encoder=none"])
    tiny_hmora("hmora", overrides=["routing.task_encoder=none", "routing.beta_high=1.0"])


def test_every_bad_field_is_reported_in_one_line():
    with pytest.raises(ValueError) as err:
        load_config("hmora", ["adapter.rank=0", "routing.mode=x", "adapter.alpha=abc",
                              "loss.gamma_c=2"])  # fmt: skip
    msg = str(err.value)
    assert "\n" not in msg
    for field in ("adapter.rank:", "routing.mode:", "adapter.alpha:", "loss.gamma_c:"):
        assert field in msg, msg
    # a method's own refusals are collected the same way
    from hmora_ds.methods import build_method

    config = load_config("mixlora", ["routing.mode=soft", "adapter.hydra=true"])
    with pytest.raises(ValueError, match=r"routing\.mode: .*; adapter\.hydra: "):
        build_method(config)


def test_run_config_reports_every_section_at_once():
    from hmora_ds.train.config import load_run_config

    with pytest.raises(ValueError) as err:
        load_run_config(None, ["train.lr=-1", "checkpoint.every=0", "method.adapter.rank=0"])
    msg = str(err.value)
    for field in ("train.lr", "checkpoint.every", "adapter.rank"):
        assert field in msg, msg


def test_a_section_given_as_a_mapping_updates_it_instead_of_replacing_it():
    """``{"routing": {"router_dropout": 0.0}}`` changes that key and keeps the preset's other
    routing settings (it used to replace the section, silently resetting HMoRA w LW's router
    sharing to the default); unknown keys inside the mapping are refused by their full name."""
    lw = load_config("hmora_lw", {"routing": {"router_dropout": 0.0}})
    assert lw.routing.router_dropout == 0.0 and lw.routing.share_routers
    assert lw.to_dict()["routing"] == {
        **load_config("hmora_lw").to_dict()["routing"],
        "router_dropout": 0.0,
    }
    nested = load_config("himole", {"options": {"groups": 2}, "adapter.num_experts": 8})
    assert nested.options["groups"] == 2 and nested.options["experts_per_group"] == 4
    with pytest.raises(ValueError, match=r"^override routing\.nope: unknown key 'routing\.nope'$"):
        load_config("hmora_lw", {"routing": {"nope": 1}})

"""TP report on the paper's base shapes, built on the meta device (no weights)."""

import pytest

from hmora_ds.config import load_config
from hmora_ds.params import build_meta_model, load_model_config, main, parameter_report

# Also run inside the CPU image by `make image-test` (tests/test_image.py).
pytestmark = pytest.mark.image


@pytest.fixture(scope="module")
def qwen2_cfg():
    return load_model_config("qwen2-1.5b")


@pytest.mark.parametrize(
    ("preset", "tp"),
    [
        ("lora_r8", "0.60"),
        ("hmora", "6.31"),  # paper table 3
        ("lora_r64", "4.78"),
        ("mixlora", "3.97"),
        ("hydralora", "3.20"),
    ],
)
def test_tp_matches_paper_table3(qwen2_cfg, preset, tp):
    model = build_meta_model(qwen2_cfg, load_config(preset))
    rep = parameter_report(model)
    assert rep.base == 1_543_714_304
    assert f"{rep.tp_percent:.2f}" == tp
    assert all(p.device.type == "meta" for p in model.parameters())


def test_tp_hand_count_of_hmora_without_lw(qwen2_cfg):
    """6.31 % decomposed by hand (spec §1–4 on the Qwen2-1.5B shape)."""
    rep = parameter_report(build_meta_model(qwen2_cfg, load_config("hmora")))
    lora_per_layer = 8 * 8 * (2 * 3072 + 2 * 1792 + 3 * 10496)  # e·r·(in+out) over 7 layers
    token_routers = 25 * (6 * (1536 * 8 + 8) + (8960 * 8 + 8))  # layers 0–24
    task_routers = 12 * 7 * (1536 * 8 + 8)  # layers 16–27
    encoder = 4 * 1536 * 1536 + 4 * 1536 + 2 * 1536 * 3072 + 3072 + 1536 + 4 * 1536
    assert rep.components["lora A"] + rep.components["lora B"] == 28 * lora_per_layer
    assert rep.components["token routers"] == token_routers
    assert rep.components["task routers"] == task_routers
    assert rep.components["task encoder"] == encoder
    assert rep.components["e_task"] == 1536
    assert rep.trainable == 97_421_336


def test_table11_router_sharing_and_lw(qwen2_cfg):
    shared = build_meta_model(qwen2_cfg, load_config("hmora", ["routing.share_routers=true"]))
    assert f"{parameter_report(shared).tp_percent:.2f}" == "6.22"  # table 11 "+ Router Sharing"
    lw = parameter_report(build_meta_model(qwen2_cfg, load_config("hmora_lw")))
    # Table 11 "+ All" prints 3.90 %; the exact count of the four designs is 3.909 %.
    assert lw.tp_percent == pytest.approx(3.90, abs=0.01)


def test_llama_shape_and_full_ft():
    model = build_meta_model(load_model_config("llama-3.2-1b"), load_config("full_ft"))
    rep = parameter_report(model)
    assert rep.base == 1_235_814_400 and rep.tp_percent == 100.0


def test_cli_prints_table_and_tp_last(capsys):
    assert main(["--model-config", "qwen2-1.5b", "--preset", "hmora"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "TP 6.31%"
    assert any(line.startswith("task encoder") for line in lines)
    assert (
        main(["--model-config", "qwen2-1.5b", "--preset", "hmora", "adapter.num_experts=16"]) == 0
    )
    # e = 16: 2 × 73,859,072 expert + 7,273,200 token-router + 2,065,728 task-router
    # + 18,892,800 encoder parameters = 175,949,872 → 11.398 %.
    assert capsys.readouterr().out.strip().splitlines()[-1] == "TP 11.40%"


def test_cli_errors_are_one_line(capsys):
    assert main(["--model-config", "gpt-5", "--preset", "hmora"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model-config: 'gpt-5'") and "\n" not in err
    assert main(["--model-config", "qwen2-1.5b", "--preset", "hmora", "routing.top_k=9"]) == 2
    assert "routing.top_k" in capsys.readouterr().err

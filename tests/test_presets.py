"""Run-config presets (configs/*.yaml): they load, state their hardware, build on the meta
device with the TP % the planner reports, follow the paper's settings, and fit their GPUs."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from hmora_ds.params import build_meta_model, load_model_config, parameter_report
from hmora_ds.plan import build_setup, hardware_header, model_config_for, report
from hmora_ds.train.config import load_run_config

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml") if p.stem != "default")
PAPER_QWEN = [p for p in PRESETS if p.startswith("paper_qwen2_1.5b")]
PAPER_LLAMA = [p for p in PRESETS if p.startswith("paper_llama3.2_1b")]


@functools.cache
def setup(name: str):
    return build_setup(name)


def test_the_issue_presets_exist():
    methods = {load_run_config(REPO / "configs" / f"{p}.yaml").preset for p in PAPER_QWEN}
    assert methods == {
        "hmora",
        "hmora_lw",
        "lora_r8",
        "lora_r64",
        "molora",
        "mixlora",
        "hydralora",
        "full_ft",
    }
    assert PAPER_LLAMA
    for name in ("qwen2_7b_zero2", "qwen2_7b_zero3", "llama3.1_8b_zero2", "llama3.1_8b_zero3"):
        assert name in PRESETS
    assert "llama3.1_70b_zero3_offload" in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_states_its_hardware(name):
    path = REPO / "configs" / f"{name}.yaml"
    run = load_run_config(path)
    header = hardware_header(path)
    assert {"gpus", "nodes", "gpu_mem", "cpu_mem", "deepspeed"} <= set(header), header
    ds = REPO / "ds_configs" / f"{header['deepspeed']}.json"
    assert ds.is_file()
    text = path.read_text()
    launch = re.search(r"^# launch:\s+(.*)$", text, re.MULTILINE).group(1)
    assert f"--config configs/{name}.yaml" in launch and f"ds_configs/{ds.name}" in launch
    # The header's ZeRO stage is the one in the name of the larger-base presets.
    if "_zero" in name:
        assert name.endswith(header["deepspeed"])
    assert run.output_dir == f"runs/{name}"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_on_meta_with_the_planner_tp(name):
    run = load_run_config(REPO / "configs" / f"{name}.yaml")
    model = build_meta_model(model_config_for(run.model.name_or_path), run.hmora_config())
    assert all(p.device == torch.device("meta") for p in model.parameters())
    tp = parameter_report(model).tp_percent
    text, _ = report(setup(name))
    reported = re.search(r"trainable [\d,]+ \(([\d.]+)%\)", text).group(1)
    assert float(reported) == pytest.approx(tp, abs=0.005)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_fits_the_gpus_it_states(name):
    text, ok = report(setup(name))
    assert ok, text


# The paper's TP column on Qwen2-1.5B (table 3 / spec §7, ours to two decimals).
PAPER_TP = {
    "lora_r8": 0.60,
    "lora_r64": 4.78,
    "molora": 3.83,
    "mixlora": 3.97,
    "hydralora": 3.20,
    "hmora": 6.31,
    "hmora_lw": 3.91,
}


@pytest.mark.parametrize("name", PAPER_QWEN)
def test_paper_qwen2_runs_follow_section_4(name):
    run = load_run_config(REPO / "configs" / f"{name}.yaml")
    t = run.train
    assert run.model.name_or_path == "Qwen/Qwen2-1.5B"
    # Linear warm-up, then constant (the official training loop).
    assert (t.lr, t.warmup_steps, t.max_steps, t.schedule) == (2e-5, 500, 10000, "constant")
    assert t.micro_batch_size * t.grad_accum == 12  # on the one GPU the header states
    assert hardware_header(REPO / "configs" / f"{name}.yaml")["gpus"] == "1"
    assert (run.eval.every, run.eval.patience) == (200, 10)
    assert_selects_by_validation_accuracy(run)
    assert (run.data.max_input_tokens, run.data.max_output_tokens) == (1024, 512)
    assert run.hmora_config().loss.label_smoothing == 0.1
    if run.preset in PAPER_TP:
        c = setup(name).counts
        assert 100 * c.trainable / c.base == pytest.approx(PAPER_TP[run.preset], abs=0.005)


@pytest.mark.parametrize("name", PAPER_LLAMA)
def test_paper_llama_runs_follow_appendix_e7(name):
    run = load_run_config(REPO / "configs" / f"{name}.yaml")
    method = run.hmora_config()
    assert run.model.name_or_path == "meta-llama/Llama-3.2-1B"
    assert method.loss.gamma_c == 0.8 and method.adapter.eta_b == 4.0
    assert run.train.max_steps == 20000 and run.eval.every == 1000
    assert run.train.lr == 2e-5 and run.train.micro_batch_size * run.train.grad_accum == 12
    assert (run.train.warmup_steps, run.train.schedule) == (500, "constant")
    assert run.eval.patience == 10
    assert_selects_by_validation_accuracy(run)


def assert_selects_by_validation_accuracy(run):
    """Section 4.2: best checkpoint and early stopping by the mean accuracy of the seven
    benchmarks' whole validation subsets, zero-shot; all of Flan trains."""
    e = run.eval
    assert (e.kind, e.benchmarks, e.source, e.shots, e.max_questions) == (
        "benchmarks",
        "all",
        "hub",
        0,
        None,
    )
    assert run.data.val_fraction == 0.0 and run.data.val_path is None


# Published totals (tied embeddings once) of every shipped architecture.
PUBLISHED = {
    "qwen2-1.5b": 1_543_714_304,
    "llama-3.2-1b": 1_235_814_400,
    "qwen2-7b": 7_615_616_512,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "smollm2-135m-instruct": 134_515_008,
}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_architecture_shapes_match_published_counts(arch):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(arch))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[arch]

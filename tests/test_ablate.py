"""Ablation studies: grid definitions against the paper, errors, and the runner end to end
(tiny random-init LLaMA, one process, two grid points: train → evaluate → table, then skip,
resume and re-run)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from hmora_ds.ablate import rows as rowio
from hmora_ds.ablate.cli import build_options, main, parse_args
from hmora_ds.ablate.runner import Options, device_slots, launch_prefix, parameters, plan
from hmora_ds.ablate.scales import CPU, PAPER
from hmora_ds.ablate.studies import STUDIES, as_overrides, get_study
from hmora_ds.ablate.table import TableRow, csv_text, markdown
from hmora_ds.config import parse_override
from tests._dist import run_command
from tests._eval_helpers import toy_questions, write_local
from tests._train_helpers import REPO


def _options(study: str, scale=CPU, tmp_path=None, **kw) -> Options:
    return Options(
        study=get_study(study),
        scale=scale,
        out=tmp_path / study,
        config=scale.config,
        seeds=[0],
        launcher="python",
        **kw,
    )


def _methods(study: str, tmp_path, scale=CPU):
    s = get_study(study)
    jobs = plan(_options(study, scale, tmp_path), s.rows_for(scale.name))
    return {j.row.name: j.run.hmora_config() for j in jobs}


# ---------------------------------------------------------------------------- grids
def test_routing_grid_is_soft_topk_times_none_blc_aux_on_token_routing(tmp_path):
    methods = _methods("routing", tmp_path)
    assert list(methods) == ["soft", "soft-blc", "soft-aux", "topk", "topk-blc", "topk-aux"]
    combos = {(m.routing.mode, m.loss.aux, m.loss.aux_weight) for m in methods.values()}
    assert combos == {
        (mode, aux, w)
        for mode in ("soft", "topk")
        for aux, w in (("none", 0.003), ("blc", 0.01), ("cgjs", 0.003))
    }
    for m in methods.values():  # §4.1: token routing only, HMoRA w/o LW, top-2, e = r = 8
        assert m.routing.task_encoder == "none" and m.routing.top_k == 2
        assert m.adapter.num_experts == 8 and m.adapter.rank == 8 and not m.adapter.hydra
        assert m.loss.gamma_c == 0.4 and m.loss.gamma_b == 1.0
    labels = get_study("routing").rows[5].labels
    assert labels == {"RM": "Top-k", "L_aux": "yes", "L_blc": "-"}


def test_learning_grid_recipe_and_analysis_data(tmp_path):
    """HMoRA w LW × none / L_blc / L_aux plus LoRA r = 8, all with the recipe that makes routers
    move (20 × router lr, 8 sequences per step on 2 ranks), analysed on the training tasks
    unless --analysis-data says otherwise."""
    s = get_study("learning")
    jobs = {j.row.name: j for j in plan(_options("learning", CPU, tmp_path), s.rows_for("cpu"))}
    assert list(jobs) == ["lw-none", "lw-blc", "lw-aux", "lora-r8"]
    for job in jobs.values():
        t = job.run.train
        assert (t.max_steps, t.grad_accum, t.router_lr_mult, t.schedule) == (40, 2, 20.0,
                                                                            "constant")  # fmt: skip
    aux = {n: (j.run.hmora_config().loss.aux, j.run.hmora_config().preset)
           for n, j in jobs.items()}  # fmt: skip
    assert aux == {"lw-none": ("none", "hmora_lw"), "lw-blc": ("blc", "hmora_lw"),
                   "lw-aux": ("cgjs", "hmora_lw"), "lora-r8": ("none", "lora_r8")}  # fmt: skip
    assert build_options(parse_args(["learning"])).analysis_data == "offline"
    opts = build_options(parse_args(["learning", "--analysis-data", "mmlu"]))
    assert opts.analysis_data == "mmlu"
    assert build_options(parse_args(["routing"])).analysis_data == "mmlu"


def test_gamma_c_grid_is_table9(tmp_path):
    methods = _methods("gamma_c", tmp_path)
    got = sorted((m.routing.mode, m.loss.gamma_c) for m in methods.values())
    assert got == sorted((mode, g) for mode in ("soft", "topk") for g in (0, 0.2, 0.4, 0.6, 0.8))
    assert all(m.loss.aux == "cgjs" and m.routing.task_encoder == "none" for m in methods.values())


# TP % on Qwen2-1.5B: each row reproduces the paper's column (tables 3, 10, 11; the exact
# counts round 0.01 above three of the paper's printed values).
PAPER_TP = {
    "alpha": {
        "eps0_mu-2": 5.04,
        "eps0_mu-1.35": 6.42,
        "eps0_mu1.35": 6.42,
        "eps0_mu2": 6.16,
        "eps-4_mu0": 6.29,
        "eps4_mu0": 6.29,
        "eps4_mu-2": 6.31,
        "eps4_mu2": 6.26,
    },
    "lightweight": {
        "base": 6.31,
        "router-sharing": 6.22,
        "single-lora": 4.77,
        "hydra": 4.46,
        "hydra-lora+2.0": 4.46,
        "all": 3.90,
    },
    "baselines": {
        "full-ft": 100.0,
        "lora-r8": 0.60,
        "lora-r64": 4.78,
        "molora": 3.82,
        "mixlora": 3.97,
        "hydralora": 3.20,
        "hmora-lw": 3.90,
        "hmora": 6.31,
    },
}


@pytest.mark.parametrize("study", sorted(PAPER_TP))
def test_paper_scale_tp_matches_the_papers_tables(study, tmp_path):
    s = get_study(study)
    rows = [r for r in s.rows_for("paper") if r.name in PAPER_TP[study]]
    for job in plan(_options(study, PAPER, tmp_path), rows):
        tp = parameters(job.run)["tp_percent"]
        assert tp == pytest.approx(PAPER_TP[study][job.row.name], abs=0.011), job.row.name


def test_alpha_grid_gives_constant_and_hierarchical_alpha(tmp_path):
    from hmora_ds.routing.gates import layer_alphas

    methods = _methods("alpha", tmp_path)
    for name, m in methods.items():
        alphas = layer_alphas(28, m.routing.eps, m.routing.mu)
        if name.startswith("eps0_"):  # constant across layers
            assert max(alphas) - min(alphas) < 1e-12
        elif m.routing.eps > 0:
            assert alphas == sorted(alphas)
        else:
            assert alphas == sorted(alphas, reverse=True)
    const = [round(layer_alphas(2, 0, m.routing.mu)[0], 2) for m in methods.values()][:6]
    assert const == [0.12, 0.21, 0.4, 0.6, 0.79, 0.88]  # 0 / 1 after the β thresholds


def test_experts_tp_grows_with_e_and_task_encoder_rows(tmp_path):
    jobs = plan(_options("experts", CPU, tmp_path), get_study("experts").rows)
    assert [j.run.hmora_config().adapter.num_experts for j in jobs] == [4, 8, 16, 32]
    tps = [parameters(j.run)["tp_percent"] for j in jobs]
    assert tps == sorted(tps) and len(set(tps)) == 4
    enc = _methods("task_encoder", tmp_path)
    assert [m.routing.task_encoder for m in enc.values()] == ["transformer", "mean_pool", "none"]


def test_every_row_of_every_study_resolves_at_both_scales(tmp_path):
    for name, study in STUDIES.items():
        for scale in (CPU, PAPER):
            jobs = plan(_options(name, scale, tmp_path), study.rows_for(scale.name))
            assert len({j.hashes["train"] for j in jobs}) == len(jobs), name  # all distinct
            for job in jobs:  # the rendered command line reads back as the grid's values
                for item in as_overrides(job.row.overrides):
                    key, value = parse_override(item)
                    assert value == job.row.overrides[key]
    # Full fine-tuning runs at both scales: it saves a whole model, which the eval stage reads.
    for scale in ("cpu", "paper"):
        full_ft = STUDIES["baselines"].rows_for(scale)[0]
        assert full_ft.name == "full-ft" and not full_ft.unsupported


def test_device_slots_and_launch_commands(monkeypatch, tmp_path):
    from hmora_ds.ablate import runner

    monkeypatch.setattr(runner, "cuda_devices", lambda: ["0", "1", "2", "3", "4"])
    opts = _options("experts", PAPER, tmp_path)
    opts.launcher = "deepspeed"
    assert device_slots(opts) == [["0"], ["1"], ["2"], ["3"], ["4"]]  # one row per device
    opts.nproc = 2
    assert device_slots(opts) == [["0", "1"], ["2", "3"]]
    monkeypatch.setattr(runner, "cuda_devices", lambda: [])
    assert device_slots(opts) == [None]  # CPU: one row at a time
    gpu = launch_prefix("deepspeed", 2, ["2", "3"])
    assert "--num_gpus" not in gpu  # else deepspeed ignores CUDA_VISIBLE_DEVICES
    assert launch_prefix("deepspeed", 2, None)[-2:] == ["--num_gpus", "2"]
    assert launch_prefix("torchrun", 2, None)[-3:] == ["--standalone", "--nproc_per_node", "2"]


def test_analysis_stage_command_and_routing_summary(monkeypatch, tmp_path):
    """The analysis stage calls `python -m hmora_ds.analyze routing` with the documented options
    and takes routing.json's summary (the analysis itself is tested with its own module)."""
    from hmora_ds.ablate import runner

    opts = _options("baselines", CPU, tmp_path, analyze=True, max_per_task=4)
    jobs = {j.row.name: j for j in plan(opts, get_study("baselines").rows_for("cpu"))}
    assert jobs["lora-r8"].hashes["analyze"] is None  # no routers, nothing to analyse
    job = jobs["hmora"]
    assert job.hashes["analyze"] is not None
    summary = {"token_balance": 0.9, "token_certainty": 0.4, "task_balance": 0.8}
    summary |= {"task_certainty": 0.2, "recognition": {"0.8": 0.5}}
    seen = {}

    def fake_run(cmd, log, env, timeout):
        seen["cmd"] = cmd
        out = job.dir / "analysis"
        out.mkdir(parents=True)
        (out / "routing.json").write_text(json.dumps({"summary": summary, "tasks": {}}))
        return 0

    monkeypatch.setattr(runner, "run_logged", fake_run)
    record = {"stages": {"train": {"adapter": "/x/adapter_best"}}, "metrics": {}}
    runner._analyze(opts, job, record, None)
    assert seen["cmd"][1:] == [
        "-m",
        "hmora_ds.analyze",
        "routing",
        "--model",
        "smollm2-135m-instruct",
        "--adapter",
        "/x/adapter_best",
        "--data",
        "mmlu",
        "--out",
        str(job.dir / "analysis"),
        "--max-per-task",
        "4",
    ]
    assert record["metrics"]["routing"] == summary


# ---------------------------------------------------------------------------- table
def _record(seed, accs, routing=None, tp=6.31):
    metrics = {"accuracy": accs, "average": sum(accs.values()) / len(accs), "unavailable": []}
    if routing:
        metrics["routing"] = routing
    return {"seed": seed, "tp_percent": tp, "metrics": metrics}


def test_table_mean_std_over_seeds_with_routing_columns():
    study = get_study("experts")
    summary = {
        "token_balance": 0.9,
        "token_certainty": 0.5,
        "task_balance": 0.8,
        "task_certainty": 0.3,
        "recognition": {"0.7": 0.8, "0.8": 0.5, "0.9": 0.2, "1.0": 0.0},
        "distinct_meps": 3,
        "task_gate_between_share": 0.4,
    }
    recs = [
        _record(0, {"arc_easy": 0.50, "mmlu": 0.30}, summary),
        _record(1, {"arc_easy": 0.60, "mmlu": 0.40}, {**summary, "token_certainty": 0.7}),
    ]
    rows = [
        TableRow(study.rows[0], recs, {}),
        TableRow(study.rows[1], [], {0: "not run"}, tp_percent=17.62),
    ]
    md = markdown(study, rows, "setting line")
    head = (
        "| e | TP | MMLU | ARC-E | Avg | Tok. cert. | Tok. bal. | Rec@0.8 % | MEPs "
        "| Gate var. between | Seeds |"
    )
    assert head in md
    # Two seeds: std 7.07 points, 95 % CI half-width t(1) · s / √2 = 12.706 · 7.071 / 1.414.
    assert "| 4 | 6.31% | 35.00 ± 63.53 | 55.00 ± 63.53 | 45.00 ± 63.53 | 0.600 ± 1.271 |" in md
    assert "0.900 ± 0.000 | 50.0 ± 0.0 | 3.0 ± 0.0 | 0.400 ± 0.000 | 0,1 |" in md
    assert "| 8 | 17.62% | — | — | — | — | — | — | — | — | — |" in md
    assert "- e8 seed 0: not run" in md and "not the paper's seven" in md
    lines = csv_text(study, rows).splitlines()
    assert lines[0].startswith(
        "row,e,tp_percent,n_seeds,seeds,mmlu_mean,mmlu_std,mmlu_ci95,arc_easy_mean"
    )
    assert lines[1].startswith(
        "e4,4,6.3100,2,0 1,0.350000,0.070711,0.635300,0.550000,0.070711,0.635300"
    )
    assert lines[2].startswith("e8,8,17.6200,0,,,")


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope"], "unknown study 'nope'; valid studies: routing, gamma_c, alpha"),
        (["routing", "--seeds", "0,x"], "--seeds: expected comma-separated integers"),
        (["routing", "--seeds", "1,1"], "repeats a seed"),
        (["routing", "--set", "train.lr"], "expected key=value"),
        (["routing", "--set", "train.nope=1"], "unknown key 'train.nope'"),
        (["routing", "--set", "method.loss.aux=none"], "the routing study varies method.loss.aux"),
        (["routing", "--set", "train.seed=3"], "train.seed is set by the runner; use --seeds"),
        (["routing", "--rows", "soft,bogus"], "unknown row(s) bogus in study routing"),
        (["routing", "--launcher", "python", "--nproc", "2"], "--launcher python runs one"),
        (["routing", "--source", "local"], "--source local and --local-dir DIR go together"),
    ],
)
def test_one_line_errors(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "o"), "--no-analyze", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_out_dir_of_another_study_or_scale_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"study": "alpha", "scale": "cpu"}))
    assert main(["routing", "--out", str(out), "--no-analyze", "--dry-run"]) == 2
    assert "holds the 'alpha' study, not 'routing'" in capsys.readouterr().err
    assert main(["alpha", "--scale", "paper", "--out", str(out), "--no-analyze"]) == 2
    assert "at --scale cpu, not paper" in capsys.readouterr().err
    (tmp_path / "busy" / "x").mkdir(parents=True)
    assert main(["routing", "--out", str(tmp_path / "busy"), "--no-analyze"]) == 2
    assert "is not empty and holds no study.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end
def _tiny_argv(tiny, bench, out) -> list[str]:
    """Two routing rows on the tiny model, one process, a local two-benchmark suite."""
    return [
        "routing",
        "--rows",
        "soft,topk-aux",
        "--launcher",
        "python",
        "--no-analyze",
        "--source",
        "local",
        "--local-dir",
        str(bench),
        "--benchmarks",
        "arc-e,csqa",
        "--max-questions",
        "0",
        "--out",
        str(out),
        "--stage-timeout",
        "200",
        "--set",
        f"model.name_or_path={tiny / 'model'}",
        "model.attn_implementation=eager",
        "data.kind=local",
        f"data.path={tiny / 'data.jsonl'}",
        "data.val_fraction=0.15",
        "data.max_input_tokens=48",
        "data.max_output_tokens=24",
        "train.max_steps=4",
        "train.lr=5e-3",
        "train.warmup_steps=1",
        "eval.every=2",
        "eval.batch_size=4",
        "checkpoint.every=2",
    ]


@pytest.mark.slow
def test_runner_end_to_end_skip_resume_and_rerun(tiny_run_inputs, tmp_path, caplog):
    bench = write_local(
        tmp_path / "bench",
        {
            "arc_easy": {"test": toy_questions(6)},
            "commonsense_qa": {"validation": toy_questions(8, "commonsense_qa")},
        },
    )
    out = tmp_path / "study"
    argv = _tiny_argv(tiny_run_inputs, bench, out)
    cmd = [sys.executable, "-m", "hmora_ds.ablate", *argv]
    rc, log = run_command(cmd, 500, cwd=REPO)
    assert rc == 0, log[-4000:]
    soft, topk = out / "soft" / "seed0", out / "topk-aux" / "seed0"
    rec = rowio.read_row(topk)
    assert rec["status"] == "done" and rec["seed"] == 0 and rec["world_size"] == 1
    assert "method.loss.aux=cgjs" in rec["row_overrides"] and rec["tp_percent"] > 0
    assert set(rec["metrics"]["accuracy"]) == {"arc_easy", "commonsense_qa"}
    assert rec["stages"]["train"]["steps"] == 4 and rec["timings"]["total_s"] > 0
    assert rec["stages"]["train"]["adapter"].endswith("adapter_best")
    md = (out / "table.md").read_text()
    assert "| RM | L_aux | L_blc | TP | ARC-E | Comm | Avg | Seeds |" in md
    assert md.count("| 0 |") == 2 and "- soft-blc seed 0: not run" in md
    assert len((out / "table.csv").read_text().splitlines()) == 7  # header + the 6 grid rows

    # Rerun: both rows are skipped, nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in (soft / "row.json", topk / "row.json")}
    rc, log = run_command(cmd, 200, cwd=REPO)
    assert rc == 0 and log.count("skip: done") == 2, log[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # soft crashed after training (no evaluation recorded); topk-aux's grid point changed.
    rec = rowio.read_row(soft)
    del rec["stages"]["eval"]
    rec["status"] = "running"
    rowio.write_row(soft, rec)
    soft_summary = (soft / "train" / "summary.json").stat().st_mtime_ns
    routing = get_study("routing")
    ov = {**routing.rows[5].overrides, "method.loss.gamma_c": 0.2}
    changed = dataclasses.replace(routing.rows[5], overrides=ov)
    study = dataclasses.replace(routing, rows=(routing.rows[0], *routing.rows[1:5], changed))
    opts = build_options(parse_args(argv))
    opts.study = study
    from hmora_ds.ablate.cli import run

    with caplog.at_level("INFO", logger="hmora_ds.ablate"):
        assert run(opts) == 0
    text = caplog.text
    assert "soft seed 0: eval" in text and "soft seed 0: train" not in text
    assert (soft / "train" / "summary.json").stat().st_mtime_ns == soft_summary  # not retrained
    assert "topk-aux seed 0: configuration changed, starting the row over" in text
    assert "topk-aux seed 0: train" in text
    rec = rowio.read_row(topk)
    assert rec["status"] == "done" and "method.loss.gamma_c=0.2" in rec["row_overrides"]
    assert rowio.read_row(soft)["status"] == "done"


# ---------------------------------------------------------------------------- methods study
def test_methods_study_has_one_row_per_registered_method_with_its_preset(tmp_path):
    """Every registered method once, its own default preset, table order; the CPU recipe of
    the ``learning`` study; full fine-tuning only at paper scale. Guards against a method added
    to the registry but missing from the comparison."""
    from hmora_ds.methods import available_methods, get_method

    s = get_study("methods")
    expected = [n for n in sorted(available_methods(), key=lambda n: (get_method(n).order, n))
                if get_method(n).preset]  # fmt: skip
    assert [r.name for r in s.rows] == [n.replace("_", "-") for n in expected]
    assert {r.name: r.overrides["preset"] for r in s.rows} == {
        n.replace("_", "-"): get_method(n).preset for n in expected
    }
    assert not [r.name for r in s.rows if r.paper_only]
    jobs = plan(_options("methods", CPU, tmp_path), s.rows_for("cpu"))
    assert all(j.run.train.max_steps == 40 and j.run.train.router_lr_mult == 20.0 for j in jobs)
    assert {j.run.hmora_config().method for j in jobs} == set(expected)


def test_methods_table_by_hand(tmp_path):
    """s/step = training seconds / steps; the validation loss that chose the checkpoint; the
    average's interval over questions and the paired difference to LoRA, by hand. LoRA: ARC-E
    2/4 → 50 [-6.6, 106.6] (s² = 1/3, Var = s²/4); MoLoRA 3/4, paired d = (0,0,1,0): +25 ±
    1.96·25."""
    from hmora_ds.ablate.methods_table import csv_text as methods_csv
    from hmora_ds.ablate.methods_table import markdown as methods_md
    from tests.test_ood import _results

    s = get_study("methods")
    rows = {r.name: r for r in s.rows}

    def rec(name, flags, seconds, val, routing=None):
        r = _results(tmp_path, name, 0, {"arc_easy": flags})
        r["stages"]["train"] = {"steps": 40, "train_seconds": seconds,
                                "best": {"metric": "val_loss", "value": val}}  # fmt: skip
        r["metrics"] = {"routing": routing or {}}
        return r

    table = [
        TableRow(rows["lora"], [rec("lora", [True, True, False, False], 200.0, 3.1)], {}),
        TableRow(rows["molora"], [rec("mo", [True, True, True, False], 300.0, 3.05,
                                      {"token_certainty": 0.612, "token_balance": 0.9})], {}),
        TableRow(rows["hmora"], [], {0: "not run"}),
    ]  # fmt: skip
    md = methods_md(s, table, "setting")
    assert ("| Method | TP | s/step | Val. loss | Avg (n = 4) | Δ Avg vs LoRA r = 8 | Tok. cert. "
            "| Tok. bal. | Experts/token | Seeds |") in md  # fmt: skip
    assert "| LoRA r = 8 | 1.00% | 5.0 | 3.100 | 50.0 [-6.6, 106.6] | (reference) | — | — |" in md
    assert (
        "| MoLoRA | 1.00% | 7.5 | 3.050 | 75.0 [26.0, 124.0] | +25.0 [-24.0, +74.0] | "
        "0.612 | 0.900 | — | 0 |" in md
    )
    assert "- hmora seed 0: not run" in md
    lines = methods_csv(s, table).splitlines()
    assert lines[0].startswith("row,Method,seeds,tp_percent,step_s,val_loss,arc_easy_acc")
    assert lines[2].startswith("molora,MoLoRA,0,1.000000,7.500000,3.050000,0.750000,")


# ---------------------------------------------------------------------------- composition
def test_composition_grid_library_rows_and_hashes(tmp_path):
    """The held-out task is never in the library; rows that train nothing have no analysis;
    everything that uses the library depends on its recipe (a --set changes their hashes)."""
    from hmora_ds.ablate.runner import LIBRARY, library_tasks
    from hmora_ds.data.offline_tasks import TASKS

    study = get_study("composition")
    held = study.held_out
    assert held in TASKS and held not in library_tasks(study)
    assert sorted(library_tasks(study)) == sorted(set(TASKS) - {held})
    rows = {r.name: r for r in study.rows}
    assert {r.task for r in rows.values() if r.kind == "library"} == set(library_tasks(study))
    assert rows["base"].kind == "base" and rows["lorahub"].kind == "lorahub"
    assert rows["lora-held-out"].overrides["data.tasks"] == [held]
    opts = _options("composition", CPU, tmp_path, analyze=True)
    jobs = {j.row.name: j for j in plan(opts, study.rows_for("cpu"))}
    for name in ("base", "lib-arc-easy", "lorahub"):
        assert jobs[name].hashes["analyze"] is None, name
    for name in ("mole", "mixture-of-loras"):
        job = jobs[name]
        if job.run is not None:  # registered: the placeholder became the study's library
            assert f"method.options.library={opts.out / LIBRARY}" in job.overrides
            assert f"data.exclude_tasks=[{held}]" in job.overrides
    other = plan(dataclasses.replace(opts, sets=["train.lr=0.001"]), study.rows_for("cpu"))
    changed = {j.row.name for j in other if j.hashes["train"] != jobs[j.row.name].hashes["train"]}
    assert {"lib-arc-easy", "lorahub", "lora-held-out"} <= changed
    assert "base" not in changed  # the base model does not depend on the training recipe


def test_composition_stages(monkeypatch, tmp_path):
    """The library build, LoraHub and evaluation commands; a library row evaluates its task's
    adapter, the base row evaluates without one."""
    from hmora_ds.ablate import runner
    from hmora_ds.library import Library
    from tests.test_library import _library

    opts = _options("composition", CPU, tmp_path)
    opts.out.mkdir(parents=True)
    jobs = {j.row.name: j for j in plan(opts, get_study("composition").rows_for("cpu"))}
    seen = []

    def fake_run(cmd, log, env, timeout):
        seen.append([str(c) for c in cmd])
        if "build" in cmd:  # the library of two tasks, as `hmora_ds.library build` writes it
            lib, _ = _library(opts.out / "library", tasks=("arc_easy", "piqa"))
            assert lib.tasks == ["arc_easy", "piqa"]
        if "lorahub" in cmd:
            out = cmd[cmd.index("--out") + 1]
            (tmp_path / "lh").mkdir(exist_ok=True)
            import pathlib

            pathlib.Path(out).mkdir(parents=True, exist_ok=True)
            (pathlib.Path(out) / "lorahub.json").write_text(json.dumps({"weights": {"a": 1}}))
        if "--output-dir" in cmd:
            import pathlib

            out = pathlib.Path(cmd[cmd.index("--output-dir") + 1])
            out.mkdir(parents=True, exist_ok=True)
            doc = {"benchmarks": {"commonsense_qa": {"status": "ok", "accuracy": 50.0,
                                                    "num_questions": 2}},
                   "average": {"value": 50.0, "over": ["commonsense_qa"]}}  # fmt: skip
            (out / "results.json").write_text(json.dumps(doc))
        return 0

    monkeypatch.setattr(runner, "run_logged", fake_run)
    runner.prepare_composition(opts, list(jobs.values()))
    build = seen[0]
    assert build[1:4] == ["-m", "hmora_ds.library", "build"]
    assert build[build.index("--tasks") + 1] == ",".join(runner.library_tasks(opts.study))
    assert build[build.index("--out") + 1] == str(opts.out / "library")
    sets = [build[i + 1] for i, x in enumerate(build) if x == "--set"]
    assert "train.max_steps=40" in sets and "data.kind=offline" in sets
    examples = [json.loads(x) for x in (opts.out / "lorahub_examples.jsonl").read_text().split("\n")
                if x]  # fmt: skip
    assert len(examples) == 5 and {e["task_name"] for e in examples} == {"commonsense_qa"}
    assert Library.load(opts.out / "library").tasks == ["arc_easy", "piqa"]

    record, _ = runner.run_job(opts, jobs["lib-arc-easy"], None)
    adapter = str((opts.out / "library" / "arc_easy" / "adapter").resolve())
    assert record["status"] == "done", record.get("error")
    assert record["stages"]["train"]["adapter"] == adapter
    assert seen[-1][seen[-1].index("--adapter") + 1] == adapter
    record, _ = runner.run_job(opts, jobs["base"], None)
    assert record["status"] == "done" and "--adapter" not in seen[-1]
    assert record["tp_percent"] == 0.0
    record, _ = runner.run_job(opts, jobs["lorahub"], None)
    lorahub = seen[-2]
    assert lorahub[:3] == [sys.executable, "-m", "hmora_ds.library"] and lorahub[3] == "lorahub"
    assert lorahub[lorahub.index("--examples") + 1] == str(opts.out / "lorahub_examples.jsonl")
    assert seen[-1][seen[-1].index("--adapter") + 1] == str(jobs["lorahub"].dir / "lorahub")
    # A library row whose task the library lacks fails with the library's one-line error.
    record, _ = runner.run_job(opts, jobs["lib-boolq"], None)
    assert record["status"] == "failed" and "no LoRA for task 'boolq'" in record["error"]


def test_how_a_step_is_computed_leaves_finished_rows_valid(tmp_path):
    """train.ce_chunk_tokens / compile / compile_backend at their defaults do not enter the
    training hash (rows trained before they existed stay done); set otherwise, they do."""
    study = get_study("task_encoder")
    opts = _options("task_encoder", CPU, tmp_path)
    base = {j.row.name: j.hashes["train"] for j in plan(opts, study.rows_for("cpu"))}
    for sets, same in (
        (["train.ce_chunk_tokens=1024", "train.compile=none"], True),
        (["train.compile=layers"], False),
        (["train.ce_chunk_tokens=0"], False),
    ):
        other = plan(dataclasses.replace(opts, sets=sets), study.rows_for("cpu"))
        assert all((j.hashes["train"] == base[j.row.name]) is same for j in other), sets

"""``make bench BENCH_ARGS=--quick`` as a smoke test: every benchmark runs and writes its files.

No timing assertions (timings live in bench/results, measured on a quiet machine); what is
checked is that each variant ran, the report has its rows, targets and fast paths, and the
expert-parallel payload equals its formula.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from hmora_ds.bench.step import INTERLEAVED, variants

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_make_bench_quick(tmp_path):
    proc = subprocess.run(
        ["make", "-s", "bench", f"BENCH_ARGS=--quick --out {tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    step = json.loads((tmp_path / "step_cpu_quick.json").read_text())
    names = [r["name"] for r in step["rows"]]
    assert names == [v.name for v in variants("cpu")]
    for row in step["rows"]:
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["peak_mb"] > 0, row
    by = {r["name"]: r for r in step["rows"]}
    assert by["frozen base"]["tp_percent"] == 0 and by["LoRA r=64"]["vs_lora_r64"] == 1.0
    # TP grows with the number of experts; the loop reference shares the dense row's parameters
    tps = [by[f"HMoRA e={e} dense"]["tp_percent"] for e in (4, 8, 16, 32)]
    assert tps == sorted(tps) and by["HMoRA e=8 per-expert loop"]["tp_percent"] == tps[1]
    assert by["HMoRA e=32 sparse"]["sparse_blocks"] == by["HMoRA e=32 sparse"]["mixture_blocks"]
    # (the e=32 row is the one adapter.compute=auto picks: sparse at the quick shape's width)
    assert {t["target"].partition(" (ours")[0] for t in step["targets"]} == {
        "HMoRA w LW step / LoRA r=64 step",
        "compiled: HMoRA w LW step / LoRA r=64 step",
        "HMoRA w LW step / frozen-base limit",
        "compiled: HMoRA w LW step / frozen-base limit",
        "HMoRA w/o LW step / LoRA r=64 step",
        "HMoRA w LW peak memory / LoRA r=64",
        "our LoRA r=8 step / PEFT LoRA r=8 step",
        "HMoRA w LW: fraction of the GEMM peak",
        "speed-up over the per-expert loop, e=8",
        "speed-up over the per-expert loop, e=32",
    }
    assert {f["fast path"] for f in step["fast_paths"]} >= {
        "shared routers computed once",
        "dropout once",
        "no .item() in the step",
        "chunked LM-head cross-entropy",
        "compiled decoder layers (HMoRA w LW)",
    }
    # The roofline: executed FLOPs per step (compiled rows: their eager twin's) over the
    # measured GEMM peak; PEFT's LoRA executes the same products as ours plus the full logits.
    assert step["machine"]["gemm_peak_tflops"] > 0
    assert all(r["gflop"] > 0 and r["roofline"] > 0 for r in step["rows"]), step["rows"]
    assert by["HMoRA w LW compiled"]["gflop"] == by["HMoRA w LW"]["gflop"]
    assert by["LoRA r=8"]["gflop"] < by["PEFT LoRA r=8"]["gflop"]  # prompt rows skip the head
    assert by["PEFT LoRA r=8"]["tp_percent"] == pytest.approx(by["LoRA r=8"]["tp_percent"])
    md = (tmp_path / "step_cpu_quick.md").read_text()
    assert md.startswith("# Training-step benchmark (cpu)") and "## Targets" in md
    # the step targets between eager rows come from the interleaved timing
    assert list(step["interleaved"]) == list(INTERLEAVED)
    assert all(ms > 0 for ms in step["interleaved"].values())
    t = {x["target"]: x for x in step["targets"]}
    lw = t["HMoRA w LW step / LoRA r=64 step"]
    assert lw["value"] == step["interleaved"]["HMoRA w LW"] / step["interleaved"]["LoRA r=64"]
    assert lw["rows_value"] == by["HMoRA w LW"]["vs_lora_r64"]
    assert t["HMoRA w LW peak memory / LoRA r=64"]["rows_value"] is None
    assert "timed one step each in turn" in md

    ep = json.loads((tmp_path / "expert_parallel_quick.json").read_text())
    rows = {r["ep_size"]: r for r in ep["rows"]}
    assert set(rows) == {1, 2} and all(
        r["block_ms"] > 0 and r["step_ms"] > 0 for r in rows.values()
    )
    # The measured all-to-all payload is exactly the formula 2·K·(I+O)·4 bytes per token.
    assert rows[2]["bytes_per_token_block"] == rows[2]["formula_bytes_per_token_block"] > 0


def test_bench_step_runs_only_in_the_given_order_and_records_a_failed_variant(
    tmp_path, monkeypatch
):
    """``--only`` runs the named variants in the order given (the wanted rows first when a GPU
    lease is short); a variant that raises is listed under "Failed variants" with its error,
    the others are still measured and written, and the run then exits naming it."""
    from hmora_ds.bench import step as bench_step

    real = bench_step.measure

    def measure(v, *args, **kwargs):
        if v.name == "LoRA r=8":
            raise RuntimeError("strides should be multiple of 16 bytes")
        return real(v, *args, **kwargs)

    monkeypatch.setattr(bench_step, "measure", measure)
    with pytest.raises(SystemExit, match=r"1 variant\(s\) failed \(LoRA r=8\); the others are in"):
        only = ["LoRA r=64", "LoRA r=8", "frozen base"]
        bench_step.run("cpu", quick=True, out_dir=tmp_path, only=only, steps=1, warmup=1)
    doc = json.loads((tmp_path / "step_cpu_quick.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["LoRA r=64", "frozen base"]
    assert doc["failed"] == [
        {"name": "LoRA r=8", "error": "RuntimeError: strides should be multiple of 16 bytes"}
    ]
    assert doc["shape"]["steps"] == 1
    md = (tmp_path / "step_cpu_quick.md").read_text()
    assert "## Failed variants (not measured)\n\n- LoRA r=8: RuntimeError: strides" in md
    with pytest.raises(SystemExit, match=r"unknown variant\(s\) \['LoRA r=7'\]"):
        bench_step.run("cpu", quick=True, out_dir=tmp_path, only=["LoRA r=7"])


def test_flops_not_counted_where_torch_cannot_count_them(caplog):
    """torch < 2.13's FlopCounterMode asserts on grouped-query SDPA (seen on a GPU machine with
    torch 2.11): the row is then measured with no FLOP count (shown as "–") instead of failing."""
    from hmora_ds.bench.step import _step_flops

    def step():
        raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")

    assert _step_flops(step) is None
    assert "FLOPs not counted (sdpa_flop_count" in caplog.text
    assert _step_flops(lambda: torch.ones(4, 8) @ torch.ones(8, 2)) == 2 * 4 * 8 * 2


def test_gpu_check_script_stays_within_its_budget(tmp_path):
    """bench/gpu_check.sh gives each phase what is left of BUDGET_S and skips a phase with
    under 20 s left (saying so), so a device lease is never overrun; its outputs still land in
    OUT (log.txt, results.tar.gz)."""
    import sys
    import tarfile

    out = tmp_path / "out"
    env = {"BUDGET_S": "15", "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (out / "log.txt").read_text()
    for phase in ("gpu tests", "bench 4x1024", "bench 8x1024"):
        assert f"== {phase}: skipped, " in log and "s of the budget left" in log, log
    assert "python 3." in log and "torch " in log  # the versions it ran with
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "./log.txt" in tar.getnames()


def test_interleave_times_one_step_of_each_variant_in_turn(monkeypatch):
    """The targets' timing: every round runs one step of each variant, in the same order."""
    from hmora_ds.bench import step as bench

    calls = []
    monkeypatch.setattr(bench, "_prepare", lambda v, *a: (None, None, lambda: calls.append(v.name)))
    todo = [v for v in variants("cpu") if v.name in ("frozen base", "LoRA r=64", "HMoRA w LW")]
    shape = {**bench.SHAPES["quick"], "warmup": 1, "steps": 3}
    got = bench.interleave(todo, None, shape, "quick", torch.device("cpu"))
    assert calls == ["frozen base", "LoRA r=64", "HMoRA w LW"] * 4
    assert list(got) == ["frozen base", "LoRA r=64", "HMoRA w LW"] and min(got.values()) >= 0
    patched = [v for v in variants("cpu") if v.patch is not None][:1]
    with pytest.raises(ValueError, match="patched variants"):
        bench.interleave(patched, None, shape, "quick", torch.device("cpu"))

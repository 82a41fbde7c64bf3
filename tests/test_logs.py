"""Logs people can read: progress lines off a terminal, ``trainer_log.jsonl``, W&B offline,
``loss_curve.png``, per-benchmark evaluation lines and no DeepSpeed deprecation flood.

Unit tests check the line format, the ETA and the files' rules; one 2-rank run (the
``deepspeed`` launcher, ZeRO-2, stdout a pipe as under SLURM) and its resume check the whole
path through ``launchers/train.py``.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import warnings

import pytest

from hmora_ds.train.sinks import (
    TRAINER_LOG,
    Sinks,
    TrainerLog,
    eta_seconds,
    format_duration,
    format_progress,
    read_trainer_log,
    resolve_progress,
    write_loss_curve,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: One progress line as logged (after the ``[hh:mm:ss r0] INFO`` prefix).
PROGRESS_LINE = re.compile(
    r"step (\d+)/(\d+) \(\d+%\) \| loss [\d.]+ \| lm [\d.]+ .*\| [\d,]+ tok/s \| "
    r"elapsed \w+ \| ETA \w+$"
)


# ------------------------------------------------------------------ the line and the ETA
def test_progress_line_format():
    m = {"loss": 2.31412, "lm_loss": 2.20119, "aux_loss": 0.1131, "lr": 2.8e-4,
         "grad_norm": 0.523, "tokens_per_s": 1234.4}  # fmt: skip
    line = format_progress(40, 200, m, elapsed=192.0, eta=770.0)
    assert line == (
        "step 40/200 (20%) | loss 2.3141 | lm 2.2012 | aux 0.113 | lr 2.8e-04 | gnorm 0.523 | "
        "1,234 tok/s | elapsed 3m12s | ETA 12m50s"
    )
    # No auxiliary loss (plain LoRA), no gradient norm, nothing known of the pace yet.
    plain = {"loss": 1.5, "lm_loss": 1.5, "aux_loss": 0.0, "lr": 1e-5, "tokens_per_s": 10.0}
    assert format_progress(1, 3, plain, None, None) == (
        "step 1/3 (33%) | loss 1.5000 | lm 1.5000 | lr 1.0e-05 | 10 tok/s | elapsed ? | ETA ?"
    )


def test_durations_and_eta():
    assert [format_duration(s) for s in (0, 59.4, 60, 192, 3599, 3600, 7500, 90000)] == [
        "0s", "59s", "1m00s", "3m12s", "59m59s", "1h00m", "2h05m", "1d01h",
    ]  # fmt: skip
    assert format_duration(None) == format_duration(float("inf")) == "?"
    # 40 steps in 192 s: 4.8 s a step, 160 left.
    assert eta_seconds(40, 200, 0, 192.0) == pytest.approx(768.0)
    # A resumed session's pace counts its own steps only (it started at step 100).
    assert eta_seconds(120, 200, 100, 40.0) == pytest.approx(160.0)
    assert eta_seconds(100, 200, 100, 5.0) is None  # no step of this session yet
    assert eta_seconds(200, 200, 0, 50.0) == 0.0


def test_progress_mode_follows_the_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert resolve_progress("auto", Tty()) == "bar"
    assert resolve_progress("auto", io.StringIO()) == "lines"
    assert resolve_progress("lines", Tty()) == "lines"
    assert resolve_progress("bar", io.StringIO()) == "bar"
    assert resolve_progress("none", Tty()) == "none"


def test_progress_lines_need_their_window_read_back():
    """``log.progress_every`` off the ``train.log_every`` grid still gets its lines: the loop
    reads the window back there (on every rank alike: decided from the config)."""
    from hmora_ds.train.config import RunConfig
    from hmora_ds.train.loop import Cadence

    run = RunConfig()
    run.train.max_steps, run.train.log_every, run.log.progress_every = 12, 4, 6
    c = Cadence.from_run(run, evaluates=False, has_mixture=False)
    assert [s for s in range(1, 13) if c.due_flush(s, {}, False, False)] == [1, 4, 6, 8, 12]
    run.log.progress_every = None  # the default: train.log_every, no extra read-back
    c = Cadence.from_run(run, evaluates=False, has_mixture=False)
    assert [s for s in range(1, 13) if c.due_flush(s, {}, False, False)] == [1, 4, 8, 12]


# ------------------------------------------------------------------ the sinks, in process
class _Writer:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step))


def _metrics(step: int) -> dict[str, float]:
    return {"loss": 3.0 - 0.1 * step, "lm_loss": 2.9 - 0.1 * step, "aux_loss": 0.1,
            "aux_loss_token": 0.1, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 100.0,
            "applied": 1.0}  # fmt: skip


def test_sinks_write_lines_and_trainer_log_and_resume_drops_later_steps(tmp_path, caplog):
    log = TrainerLog(tmp_path / TRAINER_LOG, initial_step=0)
    sinks = Sinks(tmp_path, _Writer(), None, True, 2, progress="lines", progress_every=3,
                  max_steps=7, trainer_log=log, steps_per_epoch=4.0)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="hmora_ds.train.sinks"):
        sinks.log_window([1], [_metrics(1)], {}, elapsed=1.0)
        sinks.log_window([2, 3, 4], [_metrics(s) for s in (2, 3, 4)], {}, elapsed=4.0)
        sinks.log_eval({"val_loss": 2.5, "other": 1.0}, 4, "val_loss",
                       {"value": 2.5, "step": 4}, True, 4.5)  # fmt: skip
        sinks.log_window([5, 6, 7], [_metrics(s) for s in (5, 6, 7)], {}, elapsed=7.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [int(PROGRESS_LINE.match(x).group(1)) for x in lines] == [1, 3, 6, 7], lines
    sinks.close(exit_code=0)
    records = read_trainer_log(tmp_path / TRAINER_LOG)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 4, 6]  # log_every=2, and step 1
    assert train[1]["epoch"] == 0.5 and train[1]["elapsed_s"] == 4.0
    for key in ("loss", "lm_loss", "aux_loss", "aux_loss_token", "lr", "grad_norm",
                "tokens_per_s"):  # fmt: skip
        assert key in train[0], key
    (ev,) = [r for r in records if r["kind"] == "eval"]
    assert ev == {"kind": "eval", "step": 4, "epoch": 1.0, "metric": "val_loss", "value": 2.5,
                  "best": 2.5, "best_step": 4, "new_best": True, "results": {"other": 1.0},
                  "elapsed_s": 4.5}  # fmt: skip
    # Resumed from the step-4 checkpoint: steps 5.. of the interrupted session go, a line cut
    # short by the kill too, and the resumed session appends.
    with (tmp_path / TRAINER_LOG).open("a") as f:
        f.write('{"kind": "train", "st')
    resumed = TrainerLog(tmp_path / TRAINER_LOG, initial_step=4)
    resumed.write({"kind": "train", "step": 5, "loss": float("nan")})
    resumed.close()
    records = read_trainer_log(tmp_path / TRAINER_LOG)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("train", 4), ("eval", 4), ("train", 5),
    ]  # fmt: skip
    assert records[-1]["loss"] is None  # non-finite: null, the file stays plain JSON
    # A fresh start does not append to an earlier run's file.
    TrainerLog(tmp_path / TRAINER_LOG, initial_step=0).close()
    assert read_trainer_log(tmp_path / TRAINER_LOG) == []


def test_loss_curve_is_a_png(tmp_path):
    history = [{"step": s, "loss": 3.0 / s, "lm_loss": 2.5 / s} for s in range(1, 301)]
    history[7]["loss"] = float("nan")  # a skipped step leaves a gap, not an error
    evals = [{"step": s, "metric": "val_loss", "value": 2.0 / s} for s in (100, 200, 300)]
    assert write_loss_curve(tmp_path / "loss_curve.png", history, evals)
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == PNG_MAGIC
    assert not write_loss_curve(tmp_path / "none.png", [], [])


# ------------------------------------------------------------------ config, warnings, eval lines
def test_log_config_is_checked(monkeypatch):
    import importlib.util

    from hmora_ds.train.config import load_run_config

    with pytest.raises(ValueError, match=r"log\.progress: must be auto, bar, lines or none"):
        load_run_config(None, ["log.progress=fancy"])
    with pytest.raises(ValueError, match=r"log\.wandb_mode: must be offline, online or disabled"):
        load_run_config(None, ["log.wandb_mode=cloud"])
    with pytest.raises(ValueError, match=r"log\.progress_every: must be a positive integer"):
        load_run_config(None, ["log.progress_every=0"])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name)
    )
    with pytest.raises(ValueError) as err:
        load_run_config(None, ["log.wandb=true"])
    assert "log.wandb: is true but wandb is not installed: pip install wandb" in str(err.value)
    assert "pip install hmora-ds[wandb]" in str(err.value)
    assert load_run_config(None, ["log.wandb=false"]).log.wandb is False


def test_log_keys_leave_a_study_rows_hash_alone():
    from hmora_ds.ablate.runner import _hashes
    from hmora_ds.train.config import load_run_config

    class Opts:  # what the training hash reads of the study options: nothing but these
        benchmarks = split = mode = max_questions = max_input_tokens = source = None
        local_dir = None
        analyze = False

    plain = _hashes(Opts(), load_run_config(None, []), {"zero": 2}, 1)
    logged = load_run_config(None, ["log.progress=lines", "log.wandb_mode=online"])
    assert _hashes(Opts(), logged, {"zero": 2}, 1) == plain
    assert _hashes(Opts(), load_run_config(None, ["train.lr=1e-3"]), {"zero": 2}, 1) != plain


def test_only_deepspeeds_deprecated_collectives_are_filtered():
    from hmora_ds.runtime.dist import quiet_known_warnings

    messages = [
        ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use …", FutureWarning),
        ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use …", FutureWarning),
        (
            "`torch.distributed._all_gather_base` is a private function and will be deprecated. "
            "Please use …",
            FutureWarning,
        ),
        ("`torch.distributed.reduce_op` is deprecated", FutureWarning),
        ("`torch.distributed.all_gather_into_tensor` is deprecated", UserWarning),
        ("something else is deprecated", FutureWarning),
    ]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_warnings()
        for text, category in messages:
            warnings.warn(text, category, stacklevel=1)
    assert [str(w.message) for w in seen] == [
        "`torch.distributed.reduce_op` is deprecated",
        "`torch.distributed.all_gather_into_tensor` is deprecated",
        "something else is deprecated",
    ]


def test_suite_logs_a_line_per_benchmark_off_a_terminal(monkeypatch, caplog):
    from hmora_ds.eval import suite
    from hmora_ds.eval.suite import Prepared, run_suite
    from tests._eval_helpers import toy_questions

    qs = toy_questions(4)
    prepared = {
        "arc_easy": Prepared("arc_easy", qs, source="local"),
        "openbookqa": Prepared("openbookqa", unavailable="not in local"),
    }
    monkeypatch.setattr(suite, "score_questions", lambda m, s, q, *a, **k: {x.id: 0 for x in q})
    with caplog.at_level(logging.INFO, logger="hmora_ds.eval.suite"):
        results = run_suite(None, None, prepared, None, progress="lines")
    assert results["openbookqa"]["status"] == "unavailable"
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "arc_easy: scoring 4 questions"
    assert re.fullmatch(r"arc_easy: accuracy 50\.00% \(4 questions, \d+\.\d s\)", messages[1])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hmora_ds.eval.suite"):
        run_suite(None, None, prepared, None, progress="none")  # the result lines only
    (only,) = [r.getMessage() for r in caplog.records]
    assert only.startswith("arc_easy: accuracy 50.00% (4 questions, ")


# ------------------------------------------------------------------ end to end (2 ranks)
@pytest.fixture(scope="module")
def logged_run(tiny_run_inputs, tmp_path_factory):
    """A 2-rank ZeRO-2 run (the deepspeed launcher, output piped: no terminal) with benchmark
    evaluation on local questions and W&B offline; returns (run dir, its output)."""
    from tests._eval_helpers import toy_questions, write_local
    from tests._train_helpers import launch, overrides

    tmp = tmp_path_factory.mktemp("logs")
    local = write_local(
        tmp / "bench",
        {
            "arc_easy": {"validation": toy_questions(5)},
            "commonsense_qa": {"validation": toy_questions(6, "commonsense_qa")},
        },
    )
    out = tmp / "run"
    args = overrides(
        tiny_run_inputs, out, "train.micro_batch_size=2", "train.grad_accum=1",
        "checkpoint.keep_last=3", "eval.kind=benchmarks", "eval.source=local",
        f"eval.local_dir={local}", "eval.benchmarks=arc_easy,csqa", "log.wandb=true",
    )  # fmt: skip
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    log = launch("deepspeed", "zero2.json", args, env=env)
    return out, log, args, env


@pytest.mark.slow
def test_piped_run_prints_lines_not_a_bar_and_no_deprecation_flood(logged_run):
    _, log, *_ = logged_run
    steps = [int(m.group(1)) for m in map(PROGRESS_LINE.search, log.splitlines()) if m]
    assert steps == [1, 2, 3, 4, 5, 6], log[-3000:]  # train.log_every=1 in the helpers
    assert "ETA 0s" in log
    assert "\r" not in log and not re.search(r"train:\s+\d+%\|", log)  # no bar fragments
    # Per benchmark, at both evaluations: a start line and a result line with the seconds.
    assert log.count("arc_easy: scoring 5 questions") == 2
    assert (
        len(re.findall(r"commonsense_qa: accuracy [\d.]+% \(\d+ questions, [\d.]+ s\)", log)) == 2
    )
    assert len(re.findall(r"step [36]: mean_acc = ", log)) == 2
    # DeepSpeed's deprecated collectives (all_gather_into_tensor under ZeRO-2) stay quiet.
    assert "`torch.distributed." not in log and "FutureWarning" not in log, log[-3000:]


@pytest.mark.slow
def test_trainer_log_loss_curve_and_wandb_offline(logged_run):
    out, log, *_ = logged_run
    records = read_trainer_log(out / TRAINER_LOG)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:
        for key in ("epoch", "loss", "lm_loss", "aux_loss", "lr", "grad_norm",
                    "tokens_per_s", "elapsed_s"):  # fmt: skip
            assert key in r, (key, r)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["step"], r["metric"]) for r in evals] == [(3, "mean_acc"), (6, "mean_acc")]
    best = json.loads((out / "summary.json").read_text())["best"]
    assert (
        evals[-1]["best"] == pytest.approx(best["value"]) and evals[-1]["best_step"] == best["step"]
    )
    assert {"acc_arc_easy", "acc_commonsense_qa"} <= set(evals[0]["results"])
    assert (out / "loss_curve.png").read_bytes()[:8] == PNG_MAGIC
    # W&B offline: one run directory under <output_dir>/wandb holding the logged scalars.
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (data,) = run_dir.glob("run-*.wandb")
    raw = data.read_bytes()
    for tag in (b"train/loss", b"train/lm_loss", b"eval/mean_acc", b"router_balance/"):
        assert tag in raw, tag
    assert "W&B run run (offline)" in log


@pytest.mark.slow
def test_resumed_run_does_not_repeat_steps_in_trainer_log(logged_run, tmp_path):
    """The run copied as if killed after its step-3 checkpoint (step 6's removed): resuming
    trains 4-6 again, and trainer_log.jsonl ends with each step once, in order."""
    from tests._train_helpers import launch

    out, _, args, env = logged_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step00000006")
    args = [a if not a.startswith("output_dir=") else f"output_dir={copy}" for a in args]
    log = launch("deepspeed", "zero2.json", [*args, "log.wandb=false", "--resume", "auto"],
                 env=env)  # fmt: skip
    steps = [int(m.group(1)) for m in map(PROGRESS_LINE.search, log.splitlines()) if m]
    assert steps == [4, 5, 6], log[-3000:]
    records = read_trainer_log(copy / TRAINER_LOG)
    train = [r["step"] for r in records if r["kind"] == "train"]
    assert train == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]

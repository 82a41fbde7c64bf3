"""``python -m hmora_ds.library build`` / ``show``: argument errors, the command line of each
task's training run, skipping and resuming, and the manifest written against the adapters.

The training launcher is replaced by a fake that writes what ``launchers/train.py`` leaves in
``output_dir`` (an adapter of a tiny random model, ``summary.json``): the build's own logic is
under test, not training (a real task run takes minutes here; the build time is measured in
docs/methods.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hmora_ds.adapter_io import read_adapter_config, save_adapter
from hmora_ds.library import Library, load_lora
from hmora_ds.library import build as lb
from hmora_ds.library.build import BuildError, BuildOptions, build, table
from hmora_ds.library.cli import main
from tests.conftest import randomize_adapters, tiny_hmora


class FakeTrain:
    """Stands in for ``run_logged``: records each command, writes a finished run (or fails)."""

    def __init__(self, fail: set[str] | None = None, preset: str = "lora_r8") -> None:
        self.calls: list[list[str]] = []
        self.fail = set(fail or ())
        self.preset = preset

    def __call__(self, cmd, log, env, timeout):
        self.calls.append(cmd)
        log.write_text("$ fake\n")
        opts = dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("-"))
        task = opts["data.tasks"].strip("[]")
        out = Path(opts["output_dir"])
        if task in self.fail:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            log.write_text("error: the fake run of this task failed\n")
            return 1
        model = tiny_hmora(self.preset, seed=0)
        randomize_adapters(model, seed=len(self.calls))
        save_adapter(model, out / "adapter_best")
        save_adapter(model, out / "adapter")
        summary = {
            "steps": 40,
            "seconds": 12.34,
            "best": {"value": 1.5 + len(self.calls), "step": 40, "tag": "s", "metric": "val_loss"},
            "adapter": str(out / "adapter"),
            "adapter_best": str(out / "adapter_best"),
        }
        (out / "summary.json").write_text(json.dumps(summary))
        return 0


def _opts(tmp_path, **kw) -> BuildOptions:
    kw.setdefault("tasks", ["arc_easy", "openbookqa"])
    kw.setdefault("launcher", "python")
    return BuildOptions(out=tmp_path / "lib", **kw)


def _tasks_of(calls) -> list[str]:
    return [next(a for a in c if a.startswith("data.tasks=")).split("=", 1)[1] for c in calls]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"tasks": ["arc_easy", "nope"]}, "--tasks: unknown task(s) nope in the offline mixture"),
        ({"exclude": ["nope"]}, "--exclude-tasks: unknown task(s) nope"),
        ({"tasks": ["piqa"], "exclude": ["piqa"]}, "--exclude-tasks: leaves no task to build"),
        ({"tasks": ["piqa", "piqa"]}, "--tasks: a task is named twice"),
        ({"preset": "hmora_lw"}, "--preset hmora_lw: a library holds plain LoRAs"),
        ({"preset": "nope"}, "--config/--set/--preset:"),
        (
            {"sets": ["output_dir=x"]},
            "--set output_dir=x: output_dir is set by the build; use --out",
        ),
        ({"sets": ["data.tasks=[piqa]"]}, "data.tasks is set by the build; use --tasks"),
        ({"sets": ["train.max_steps=0"]}, "--config/--set/--preset: train.max_steps"),
        ({"sets": ["novalue"]}, "--set: "),
        ({"launcher": "python", "nproc": 2}, "--nproc: --launcher python runs one process"),
        ({"launcher": "deepspeed", "nproc": 0}, "--nproc: must be >= 1"),
        ({"launcher": "mpirun"}, "--launcher: must be deepspeed, torchrun or python"),
        ({"stage_timeout": 0}, "--stage-timeout: must be > 0"),
        ({"config": Path("missing.yaml")}, "--config: missing.yaml does not exist"),
        ({"deepspeed": Path("missing.json")}, "--deepspeed: cannot read missing.json"),
    ],
)
def test_argument_errors(tmp_path, monkeypatch, kw, message):
    fake = FakeTrain()
    monkeypatch.setattr(lb, "run_logged", fake)
    with pytest.raises(BuildError) as err:
        build(_opts(tmp_path, **kw))
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert fake.calls == []  # refused before anything trains


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    rc = main(["build", "--out", str(tmp_path / "l"), "--tasks", "a,,b", "--launcher", "python"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --tasks: expected comma-separated task names")
    assert main(["show", str(tmp_path)]) == 2
    assert "library.json not found" in capsys.readouterr().err


def test_build_trains_each_task_and_writes_the_manifest(tmp_path, monkeypatch, capsys):
    fake = FakeTrain()
    monkeypatch.setattr(lb, "run_logged", fake)
    _, failed = build(_opts(tmp_path, sets=["train.max_steps=7"]))
    assert failed == []
    assert _tasks_of(fake.calls) == ["[arc_easy]", "[openbookqa]"]
    cmd = fake.calls[0]
    assert cmd[1:3] == ["-m", "hmora_ds.train"]
    assert cmd[cmd.index("--resume") + 1] == "auto"  # a half-trained task continues
    assert f"output_dir={tmp_path / 'lib' / 'arc_easy'}" in cmd
    assert "preset=lora_r8" in cmd and "train.max_steps=7" in cmd
    assert cmd.index("train.max_steps=40") < cmd.index("train.max_steps=7")  # --set wins
    back = Library.load(tmp_path / "lib")
    assert back.tasks == ["arc_easy", "openbookqa"]
    data = json.loads((tmp_path / "lib" / "library.json").read_text())
    assert [e["adapter"] for e in data["entries"]] == [
        "arc_easy/adapter_best",
        "openbookqa/adapter_best",
    ]
    for i, e in enumerate(back.entries):
        meta = read_adapter_config(e.adapter)
        assert meta["config"]["method"] == "lora"
        assert back.fingerprint == meta["base_model"]["fingerprint"]
        assert e.val_loss == pytest.approx(2.5 + i) and e.steps == 40 and e.seconds == 12.3
        assert set(load_lora(e.adapter))  # the tensors read back
    assert back.check_uniform()["rank"] == 8
    assert main(["show", str(tmp_path / "lib")]) == 0
    shown = capsys.readouterr().out
    assert "LoRA rank 8, alpha 16" in shown
    assert "arc_easy   | 2.5000   | 40    | 12.3" in shown
    assert table(back) in shown


def test_build_skips_done_tasks_and_retries_failed_ones(tmp_path, monkeypatch):
    fake = FakeTrain(fail={"openbookqa"})
    monkeypatch.setattr(lb, "run_logged", fake)
    _, failed = build(_opts(tmp_path))
    assert failed == ["openbookqa"]
    assert Library.load(tmp_path / "lib").tasks == ["arc_easy"]  # written after the good task
    fake.fail.clear()
    _, failed = build(_opts(tmp_path, tasks=["arc_easy", "openbookqa", "piqa"]))
    assert failed == []
    # arc_easy is skipped; openbookqa runs again with --resume auto (its checkpoints kept)
    assert _tasks_of(fake.calls) == ["[arc_easy]", "[openbookqa]", "[openbookqa]", "[piqa]"]
    assert (tmp_path / "lib" / "openbookqa" / "checkpoints").is_dir()
    assert Library.load(tmp_path / "lib").tasks == ["arc_easy", "openbookqa", "piqa"]
    # a deleted adapter is trained again; everything else is skipped
    import shutil

    shutil.rmtree(tmp_path / "lib" / "piqa" / "adapter_best")
    build(_opts(tmp_path, tasks=["arc_easy", "openbookqa", "piqa"]))
    assert _tasks_of(fake.calls)[4:] == ["[piqa]"]
    assert Library.load(tmp_path / "lib").tasks == ["arc_easy", "openbookqa", "piqa"]


def test_build_refuses_a_library_of_another_rank(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(lb, "run_logged", fake)
    build(_opts(tmp_path, tasks=["arc_easy"]))
    with pytest.raises(BuildError, match=r"--preset/--set: .* holds LoRAs of another shape: "
                       r"rank 8 \(library\) vs 4 \(this build\)"):  # fmt: skip
        build(_opts(tmp_path, tasks=["piqa"], sets=["method.adapter.rank=4"]))
    assert len(fake.calls) == 1


def test_mixed_library_is_refused(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(lb, "run_logged", fake)
    build(_opts(tmp_path, tasks=["arc_easy"]))
    fake.preset = "lora_r64"  # a run that ignored the settings: its LoRA must not join
    _, failed = build(_opts(tmp_path, tasks=["arc_easy", "piqa"]))
    assert failed == ["piqa"]
    assert Library.load(tmp_path / "lib").tasks == ["arc_easy"]


def test_local_data_tasks_come_from_the_file(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    rows = [{"source": f"q{i}", "target": "a", "task_name": t} for i, t in enumerate("xyxz")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake = FakeTrain()
    monkeypatch.setattr(lb, "run_logged", fake)
    sets = ["data.kind=local", f"data.path={data}"]
    build(_opts(tmp_path, tasks=None, exclude=["z"], sets=sets))
    assert _tasks_of(fake.calls) == ["[x]", "[y]"]
    with pytest.raises(BuildError, match=r"--tasks: unknown task\(s\) w in .*d.jsonl; its tasks"):
        build(_opts(tmp_path, tasks=["w"], sets=sets))


def test_parallel_tasks_take_one_gpu_slot_each(tmp_path, monkeypatch):
    from hmora_ds.ablate import runner

    gpus = ["0", "1", "2", "3"]
    monkeypatch.setattr(runner, "cuda_devices", lambda: gpus)
    monkeypatch.setattr(lb, "cuda_devices", lambda: gpus)
    par = _opts(tmp_path, launcher="torchrun", parallel_tasks=True)
    assert lb.world_size(par) == 1 and lb._slots(par) == [["0"], ["1"], ["2"], ["3"]]
    par.nproc = 2
    assert lb._slots(par) == [["0", "1"], ["2", "3"]]
    one = _opts(tmp_path, launcher="torchrun")
    assert lb.world_size(one) == 4 and lb._slots(one) == [gpus]  # one task on every GPU
    one.nproc = 8
    with pytest.raises(BuildError, match="--nproc 8 exceeds the 4 visible CUDA device"):
        lb._slots(one)
    monkeypatch.setattr(runner, "cuda_devices", lambda: [])
    monkeypatch.setattr(lb, "cuda_devices", lambda: [])
    assert lb._slots(par) == [None] and lb.world_size(_opts(tmp_path, launcher="torchrun")) == 2

"""One namespace of dotted keys (docs/config.md): the run config's ``method.*`` keys work the same
in launchers/train.py, ``hmora_ds.plan``, ``hmora_ds.ablate --set`` and ``hmora_ds.params``; a key
a tool cannot use is a one-line error (exit code 2) naming the key."""

from __future__ import annotations

import re

import pytest

from hmora_ds import params as params_cli
from hmora_ds import plan as plan_cli
from hmora_ds.ablate import cli as ablate_cli
from hmora_ds.ablate.runner import Options, plan
from hmora_ds.ablate.scales import CPU
from hmora_ds.ablate.studies import get_study
from hmora_ds.train import cli as train_cli
from hmora_ds.train.config import load_run_config

#: The same keys, given to every tool.
KEYS = ["method.adapter.num_experts=16", "method.routing.eps=2"]
SHORT = ["adapter.num_experts=16", "routing.eps=2"]


def _trainable(text: str) -> int:
    """The trainable-parameter count of a params table or a plan header."""
    match = re.search(r"\btrainable\s+([\d,]+)", text)
    assert match, text
    return int(match.group(1).replace(",", ""))


def _params(capsys, *overrides: str) -> str:
    argv = ["--model-config", "qwen2-1.5b", "--preset", "hmora_lw", *overrides]
    assert params_cli.main(argv) == 0
    return capsys.readouterr().out


def test_params_takes_run_config_keys_and_its_short_keys(capsys):
    assert params_cli.method_overrides(KEYS) == params_cli.method_overrides(SHORT)
    assert params_cli.method_overrides(KEYS) == {"adapter.num_experts": 16, "routing.eps": 2}
    long, short, default = _params(capsys, *KEYS), _params(capsys, *SHORT), _params(capsys)
    assert long.splitlines()[1:] == short.splitlines()[1:]  # line 0 echoes the overrides
    assert _trainable(long) != _trainable(default)


def test_plan_counts_what_params_counts_for_the_same_keys(capsys):
    # configs/paper_qwen2_1.5b.yaml: Qwen2-1.5B with the hmora_lw preset.
    assert plan_cli.main(["--preset", "paper_qwen2_1.5b", *KEYS]) in (0, 1)
    planned = capsys.readouterr().out
    assert _trainable(planned) == _trainable(_params(capsys, *KEYS))


def test_train_takes_the_same_keys(tmp_path, capsys):
    cfg = load_run_config(None, KEYS).hmora_config()
    assert (cfg.adapter.num_experts, cfg.routing.eps) == (16, 2)
    # The launcher gets past the run config and stops at the next check (no ranks started).
    missing = tmp_path / "missing.json"
    assert train_cli.main(["--deepspeed", str(missing), *KEYS]) == 2
    assert capsys.readouterr().err.startswith(f"error: --deepspeed: {missing} is neither a file")


def test_ablate_set_takes_the_same_keys(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["routing", "--rows", "soft", "--dry-run", "--no-analyze", "--out", str(out)]
    assert ablate_cli.main([*argv, "--set", *KEYS]) == 0
    assert f"--set: {' '.join(KEYS)}" in capsys.readouterr().out
    study = get_study("routing")
    opts = Options(study, CPU, out, CPU.config, [0], sets=KEYS, launcher="python")
    for job in plan(opts, study.rows_for("cpu")):
        cfg = job.run.hmora_config()
        assert (cfg.adapter.num_experts, cfg.routing.eps) == (16, 2)


def _run_tool(tool: str, key: str, tmp_path) -> int:
    if tool == "params":
        return params_cli.main(["--model-config", "qwen2-1.5b", "--preset", "hmora", key])
    if tool == "plan":
        return plan_cli.main(["--preset", "paper_qwen2_1.5b", key])
    if tool == "train":
        return train_cli.main([key])
    out = str(tmp_path / "o")
    return ablate_cli.main(["routing", "--dry-run", "--no-analyze", "--out", out, "--set", key])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("tool", ["params", "plan", "train", "ablate"])
def test_unknown_method_key_is_a_one_line_error_naming_it(tool, tmp_path, capsys):
    assert _run_tool(tool, "method.adapter.num_expert=16", tmp_path) == 2
    assert "unknown key 'method.adapter.num_expert'" in _one_line_error(capsys)


@pytest.mark.parametrize("tool", ["plan", "train", "ablate"])
def test_short_method_key_in_a_run_config_tool_names_the_run_config_key(tool, tmp_path, capsys):
    assert _run_tool(tool, "adapter.num_experts=16", tmp_path) == 2
    err = _one_line_error(capsys)
    assert "override adapter.num_experts: a method key" in err
    assert "write method.adapter.num_experts" in err


@pytest.mark.parametrize(
    ("key", "extra"),
    [("train.lr=1e-4", ""), ("data.kind=local", ""), ("model.dtype=float32", "--model-config")],
)
def test_params_refuses_other_run_config_keys_naming_the_tools(key, extra, tmp_path, capsys):
    assert _run_tool("params", key, tmp_path) == 2
    err = _one_line_error(capsys)
    name = key.split("=")[0]
    assert f"override {name}: a run-config key for launchers/train.py" in err
    assert "hmora_ds.plan" in err and "hmora_ds.ablate --set" in err and extra in err


def test_params_knows_every_run_config_key():
    from dataclasses import fields

    from hmora_ds.params import RUN_CONFIG_KEYS
    from hmora_ds.train.config import RunConfig

    assert {f.name for f in fields(RunConfig)} - {"method"} == set(RUN_CONFIG_KEYS)

"""The package as users get it: a wheel installed into a fresh venv, the ``hmora-ds`` command.

The wheel is built from this working tree and installed with ``--no-deps`` into a new venv
whose dependencies come from the test venv through a ``.pth`` line (pip would otherwise fetch
torch and DeepSpeed again: minutes of download that test nothing of ours). The checkout's own
``hmora_ds`` is not importable there: the test venv's editable-install hook lives in a ``.pth``
file, and Python does not process ``.pth`` files of a directory added by another ``.pth``.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from hmora_ds import cli

REPO = Path(__file__).resolve().parents[1]


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.fixture(autouse=True)
def _reset_invocation():
    yield
    cli._invoked_as = None


#: Another project's command line, passed through unchanged (its help is its own).
PASSTHROUGH = {"lm-eval"}


@pytest.mark.parametrize("command", sorted(set(cli.COMMANDS) - PASSTHROUGH))
def test_every_subcommand_help_names_itself_shows_defaults_and_has_no_markup(command, capsys):
    text = _help(command, capsys)
    assert text.startswith(f"usage: hmora-ds {command}")
    for markup in ("``", ":func:", ":mod:", ":class:"):
        assert markup not in text, f"{command} --help shows {markup}"


def test_defaults_are_shown_even_for_options_without_help_text(capsys):
    train = _help("train", capsys)
    assert "(default: zero2)" in train
    evaluate = _help("eval", capsys)
    # --batch-size has no help text of its own; its default is still printed.
    assert "--batch-size BATCH_SIZE" in evaluate and "(default: 8)" in evaluate
    assert "(default: runs/eval)" in evaluate


def test_top_level_help_lists_every_command_and_an_unknown_one_is_one_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert f"  {command} " in out
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown command 'trian'") and "train" in err
    assert len(err.splitlines()) == 1


def test_python_dash_m_and_the_launcher_script_name_themselves():
    for how, usage in (
        (["-m", "hmora_ds.eval"], "usage: python -m hmora_ds.eval "),
        ([str(REPO / "launchers" / "train.py")], "usage: launchers/train.py "),
    ):
        out = subprocess.run(
            [sys.executable, *how, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
        ).stdout
        assert out.startswith(usage), out[:200]


def test_shipped_configs_resolve_by_name_and_a_wrong_name_lists_them(tmp_path, monkeypatch):
    from hmora_ds.resources import CONFIGS_DIR, resolve_ds_config, resolve_run_config

    monkeypatch.chdir(tmp_path)  # far from the checkout
    default = CONFIGS_DIR / "default.yaml"
    for name in ("default", "default.yaml", "configs/default.yaml"):
        assert resolve_run_config(name) == default
    assert resolve_ds_config("zero3").name == "zero3.json"
    own = tmp_path / "mine.yaml"
    own.write_text("train: {}\n")
    assert resolve_run_config("mine.yaml") == Path("mine.yaml")
    with pytest.raises(ValueError, match=r"^--deepspeed: zero4 is neither .*zero2, zero2_ep"):
        resolve_ds_config("zero4")


def test_the_cache_defaults_to_the_user_cache_directory(monkeypatch, tmp_path):
    from hmora_ds.assets import cache_root

    monkeypatch.delenv("HMORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "hmora-ds"
    monkeypatch.setenv("HMORA_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def _copy_source(dst: Path) -> None:
    """The files a wheel is built from (the working tree, uncommitted changes included)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(REPO / "hmora_ds", dst / "hmora_ds", ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, dst / name)


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_runs_from_any_directory(tmp_path):
    src, dist, venv, work = (tmp_path / d for d in ("src", "dist", "venv", "work"))
    _copy_source(src)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HMORA_CACHE"] = str(tmp_path / "cache")

    def run(cmd: list, cwd: Path = work) -> str:
        proc = subprocess.run(
            [str(c) for c in cmd], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
        )
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    pip_quiet = ["--quiet", "--disable-pip-version-check"]
    run([sys.executable, "-m", "pip", "wheel", *pip_quiet, "--no-deps", "--no-build-isolation",
         "-w", dist, src])  # fmt: skip
    wheels = list(dist.glob("hmora_ds-*.whl"))
    assert len(wheels) == 1
    run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    purelib = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    (Path(purelib) / "deps_from_test_venv.pth").write_text("\n".join(site.getsitepackages()))
    run([py, "-m", "pip", "install", *pip_quiet, "--no-deps", "--no-index", wheels[0]])

    where = run([py, "-c", "import hmora_ds; print(hmora_ds.__file__)"])
    assert where.startswith(str(venv)), where
    cmd = venv / "bin" / "hmora-ds"
    params = run([cmd, "params", "--model-config", "qwen2-1.5b", "--preset", "hmora_lw"])
    assert "TP 3.91%" in params  # the paper's HMoRA w LW on Qwen2-1.5B (spec: 3.9 %)
    usage = run([cmd, "train", "--help"])
    assert usage.startswith("usage: hmora-ds train") and "(default: zero2)" in usage
    # The shipped run configs are package data: the plan of `default` works from here.
    plan = run([cmd, "plan", "--preset", "default"])
    assert "verdict: the run config as written FITS" in plan
    assert not (work / ".cache").exists()  # nothing written next to the user
    # lm-eval's own command finds the model class through the wheel's start-up hook, and its
    # built-in models are all still there.
    found = "from lm_eval.api.registry import get_model as g; print(g('hmora').__name__, g('hf'))"
    models = run([py, "-c", found])
    assert models.split()[0] == "HMoRALM" and "HFLM" in models


def test_train_nproc_starts_the_ranks_through_the_deepspeed_launcher(monkeypatch, capsys):
    """``hmora-ds train --nproc N``: N ranks of ``python -m hmora_ds.train`` under the deepspeed
    launcher, CPU ranks where torch sees no GPU, every other argument passed through unchanged.
    The launcher itself runs in the end-to-end tests; here, the command it is given."""
    import subprocess as sp

    calls = []
    monkeypatch.setattr(sp, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.setattr("hmora_ds.runtime.dist.on_cpu", lambda: True)
    assert cli.main(["train", "--nproc", "2", "--config", "default", "train.max_steps=3"]) == 0
    ((cmd, env),) = calls
    assert cmd[0].endswith("deepspeed") and cmd[cmd.index("--num_gpus") + 1] == "2"
    assert cmd[cmd.index("--module") + 1 :] == [
        "hmora_ds.train", "--config", "default", "train.max_steps=3"
    ]  # fmt: skip
    assert env["DS_ACCELERATOR"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert cli.main(["train", "--nproc", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --nproc: give a number of ranks >= 1"

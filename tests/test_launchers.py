"""Launch scripts: valid bash, quoted arguments, and hostfiles checked before anything starts."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

# Also run inside the CPU image by `make image-test` (tests/test_image.py).
pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "launchers").glob("*.sh")) + sorted(
    (REPO / "launchers" / "slurm").glob("*.sbatch")
)
TRAIN_PY = str(REPO / "launchers" / "train.py")


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=30, env=env, cwd=REPO
    )


def _command(proc: subprocess.CompletedProcess) -> list[str]:
    """The command a --dry-run printed (``+ cmd args…``, shell-quoted), as argv."""
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("+ "))
    return shlex.split(line[2:])


def test_every_launcher_is_present():
    names = {p.name for p in SCRIPTS}
    assert {"run_deepspeed.sh", "run_torchrun.sh", "run_mpirun.sh", "train.sbatch"} <= names
    assert (REPO / "launchers" / "hostfile.example").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = _run("bash", "-n", script)
    assert proc.returncode == 0, proc.stderr


def test_example_hostfile_is_valid():
    proc = _run(
        REPO / "launchers" / "run_deepspeed.sh",
        "--hostfile",
        REPO / "launchers" / "hostfile.example",
        "--dry-run",
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 node(s), 16 rank(s), master node0:29500" in proc.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("node0 slots=8\nnode1 8\n", "line 2: 'node1 8' is malformed"),
        ("node0 slots=0\n", "line 1: 'node0 slots=0' is malformed"),
        ("node0 slots=8\nnode0 slots=8\n", "host 'node0' is listed twice"),
        ("# only a comment\n\n", "names no host"),
        ("node0 slots=8 gpus=2\n", "is malformed"),
    ],
)
@pytest.mark.parametrize("script", ["run_deepspeed.sh", "run_mpirun.sh"])
def test_malformed_hostfile_is_rejected_before_launch(tmp_path, script, text, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    proc = _run(REPO / "launchers" / script, "--hostfile", hostfile, "--dry-run")
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert "+ " not in proc.stderr  # nothing was launched (not even printed)


def test_missing_hostfile(tmp_path):
    proc = _run(REPO / "launchers" / "run_deepspeed.sh", "--hostfile", tmp_path / "nope")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_arguments_are_passed_quoted(tmp_path):
    """A value with spaces and shell metacharacters reaches train.py as one argument."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    tricky = ["--config", "my configs/run $1.yaml", "output_dir=runs/a b;echo x"]
    proc = _run(
        REPO / "launchers" / "run_deepspeed.sh",
        "--hostfile",
        hostfile,
        "--node-rank",
        "1",
        "--master-port",
        "29611",
        "--dry-run",
        "--",
        *tricky,
    )
    assert proc.returncode == 0, proc.stderr
    argv = _command(proc)
    assert argv[-4:] == [TRAIN_PY, *tricky]
    assert argv[:3] == ["deepspeed", "--master_port", "29611"]
    assert argv[argv.index("--no_ssh") :][:3] == ["--no_ssh", "--node_rank", "1"]
    assert argv[argv.index("--master_addr") + 1] == "node-a"  # the hostfile's first host

    proc = _run(REPO / "launchers" / "run_mpirun.sh", "--np", "2", "--dry-run", "--", *tricky)
    assert proc.returncode == 0, proc.stderr
    argv = _command(proc)
    assert argv[-3:] == tricky and argv[argv.index("-np") + 1] == "2"
    assert argv[argv.index("MASTER_PORT") - 1] == "-x"  # exported to every rank

    proc = _run(
        REPO / "launchers" / "run_torchrun.sh",
        "--nnodes",
        "2",
        "--node-rank",
        "0",
        "--master-addr",
        "10.0.0.1",
        "--dry-run",
        *tricky,
    )
    assert proc.returncode == 0, proc.stderr
    argv = _command(proc)
    assert argv[-4:] == [TRAIN_PY, *tricky] and "--standalone" not in argv


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run_torchrun.sh", "--nnodes", "2"], "needs --node-rank"),
        (["run_torchrun.sh", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "not in"),
        (["run_deepspeed.sh", "--node-rank", "0"], "needs --hostfile"),
        (["run_deepspeed.sh", "--launcher", "ssh"], "pdsh or openmpi"),
        (["run_deepspeed.sh", "--master-port", "80a"], "non-negative integer"),
    ],
)
def test_bad_options_fail_clearly(args, message):
    proc = _run(REPO / "launchers" / args[0], *args[1:], "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_node_rank_must_be_in_the_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=1\nb slots=1\n")
    proc = _run(REPO / "launchers" / "run_deepspeed.sh", "--hostfile", hostfile, "--node-rank", "2")
    assert proc.returncode == 2 and "lists 2 node(s)" in proc.stderr


def test_an_unreachable_node_fails_naming_it_before_deepspeed_starts(tmp_path):
    """Over ssh, every node is waited for (SSH_WAIT seconds), then named if it never answers;
    DeepSpeed's own one-shot check would give a traceback instead."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\nnode-b.invalid slots=1\n")
    env = {**os.environ, "SSH_WAIT": "0", "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    # localhost answers (a stand-in ssh that accepts it), node-b.invalid does not.
    fake_ssh = tmp_path / "ssh"
    fake_ssh.write_text('#!/usr/bin/env bash\n[[ "$*" == *" localhost true" ]]\n')
    fake_ssh.chmod(0o755)
    proc = _run(REPO / "launchers" / "run_deepspeed.sh", "--hostfile", hostfile, "--", env=env)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        "error: node 'node-b.invalid' is not reachable over ssh after 0 s "
        "(try: ssh node-b.invalid true); SSH_WAIT=N waits longer"
    )
    assert "+ deepspeed" not in proc.stderr

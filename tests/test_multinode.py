"""Multi-node launch paths, for real, with two "nodes" on localhost (CPU, gloo, timeouts).

* Two DeepSpeed launchers, one per "node", each started by ``launchers/run_deepspeed.sh``
  with a two-entry hostfile and ``--node-rank`` (DeepSpeed's ``--no_ssh`` multi-node mode:
  exactly what runs on each machine of a cluster without pdsh), rendezvous over TCP.
* ``mpirun -np 2`` through ``launchers/run_mpirun.sh``: no RANK / WORLD_SIZE / MASTER_ADDR in
  the environment, so the ranks only find each other through mpi4py discovery.

Both train a few ZeRO-2 steps of the tiny LLaMA and must repeat the single-process run's
per-step losses (same global batch: 2 ranks × micro 1 vs 1 process × micro 2, accumulation 2).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._dist import free_port
from tests._train_helpers import BIN, NO_DROPOUT, REPO, TIMEOUT, launch, overrides, summary

# Also run inside the CPU image by `make image-test` (tests/test_image.py).
pytestmark = [pytest.mark.slow, pytest.mark.multirank, pytest.mark.image]

#: Launcher variables a test must not inherit (each path sets or discovers its own).
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DIST_ARGS = (*NO_DROPOUT, "train.micro_batch_size=1", "train.grad_accum=2")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env.update(
        DS_ACCELERATOR="cpu",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    )
    return env


def _run_all(cmds: list[list[str]], timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    """Start every command at once (one per "node"); kill all of them on timeout."""
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for cmd in cmds
    ]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        raise TimeoutError(f"multi-node launch exceeded {timeout:.0f}s") from None
    return results


@pytest.fixture(scope="module")
def single(tiny_run_inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multinode") / "single"
    args = overrides(tiny_run_inputs, out, *NO_DROPOUT, "train.micro_batch_size=2")
    launch("python", "zero2.json", [*args, "train.grad_accum=2"])
    return out


def _assert_same_run(run: Path, single: Path) -> None:
    assert summary(run)["world_size"] == 2 and summary(run)["zero_stage"] == 2
    losses = [torch.tensor([h["loss"] for h in summary(r)["history"]]) for r in (run, single)]
    assert len(losses[0]) == 6
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=name)


def test_two_nodes_through_hostfile_equal_single_node(tiny_run_inputs, single, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two 'nodes', both this machine\nnode-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    train_args = ["--deepspeed", "ds_configs/zero2.json"]
    train_args += overrides(tiny_run_inputs, tmp_path / "run", *DIST_ARGS)
    cmds = [
        [
            str(REPO / "launchers" / "run_deepspeed.sh"),
            "--hostfile",
            str(hostfile),
            "--node-rank",
            str(rank),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            port,
            "--",
            *train_args,
        ]
        for rank in (0, 1)
    ]
    results = _run_all(cmds)
    for rank, (rc, out) in enumerate(results):
        assert rc == 0, f"node {rank} exited {rc}:\n{out[-4000:]}"
    assert "nnodes=2" in results[1][1] and "node_rank=1" in results[1][1]
    _assert_same_run(tmp_path / "run", single)


def test_mpirun_with_mpi4py_discovery_equals_single_node(tiny_run_inputs, single, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip(
            "OpenMPI is absent (no mpirun): `make test` installs it with apt-get when run as "
            "root; elsewhere `apt-get install openmpi-bin libopenmpi-dev`"
        )
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is absent: pip install -c constraints.txt '.[mpi]' (or `make test`)")
    cmd = [
        str(REPO / "launchers" / "run_mpirun.sh"),
        "--np",
        "2",
        "--master-port",
        str(free_port()),
        "--",
        "--deepspeed",
        "ds_configs/zero2.json",
        *overrides(tiny_run_inputs, tmp_path / "run", *DIST_ARGS),
    ]
    [(rc, out)] = _run_all([cmd])
    assert rc == 0, f"mpirun exited {rc}:\n{out[-4000:]}"
    _assert_same_run(tmp_path / "run", single)

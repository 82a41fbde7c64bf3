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

from tests._dist import free_port
from tests._train_helpers import (
    BIN,
    DIST_ARGS,
    REPO,
    TIMEOUT,
    assert_same_two_rank_run,
    node_commands,
    overrides,
    single_process_run,
)

# Also run inside the CPU image by `make image-test` (tests/test_image.py).
pytestmark = [pytest.mark.slow, pytest.mark.multirank, pytest.mark.image]

#: Launcher variables a test must not inherit (each path sets or discovers its own).
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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
    return single_process_run(tiny_run_inputs, tmp_path_factory.mktemp("multinode") / "single")


def test_two_nodes_through_hostfile_equal_single_node(tiny_run_inputs, single, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two 'nodes', both this machine\nnode-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    script = str(REPO / "launchers" / "run_deepspeed.sh")
    cmds = node_commands(script, str(hostfile), port, tiny_run_inputs, tmp_path / "run")
    results = _run_all(cmds)
    for rank, (rc, out) in enumerate(results):
        assert rc == 0, f"node {rank} exited {rc}:\n{out[-4000:]}"
    assert "nnodes=2" in results[1][1] and "node_rank=1" in results[1][1]
    assert_same_two_rank_run(tmp_path / "run", single)


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
    assert_same_two_rank_run(tmp_path / "run", single)

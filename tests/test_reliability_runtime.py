"""Runtime faults a training run must survive or report in one line (issue 15, items 4, 6, 9):

* a non-finite validation score never becomes the best checkpoint;
* a rank that stops answering is named by rank 0's watchdog before the collective timeout
  (``dist.timeout_s``), and the run then ends with a non-zero exit and no process left behind;
* an ``output_dir`` that cannot be written is refused before anything loads.

The real-run tests use the real entry point (``launchers/train.py``) on the tiny random-init
LLaMA (tests/_train_helpers.py), each with a timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch.distributed as dist

from hmora_ds.runtime.watchdog import (
    ABORT_KEY,
    BEAT_KEY,
    EXIT_CODE,
    Beat,
    RankWatch,
    diagnose,
    is_collective_failure,
    stall_message,
)
from hmora_ds.runtime.writable import check_writable_dir
from hmora_ds.train import cli as train_cli
from hmora_ds.train.config import load_run_config
from hmora_ds.train.evaluate import improved
from hmora_ds.train.loop import LoopState, record_eval
from tests._dist import free_port
from tests._train_helpers import BIN, LAUNCHER, REPO, launch, overrides, summary

WATCH_LOG = "hmora_ds.runtime.watchdog"


# ------------------------------------------------------------------ item 4: non-finite scores
@pytest.mark.parametrize("mode", ["min", "max"])
def test_nonfinite_score_is_never_the_best(mode, caplog):
    """Fault: a diverged model's NaN validation loss (or a NaN / inf accuracy) became the best
    checkpoint, and nothing finite could beat NaN afterwards (every comparison is False)."""
    state = LoopState(step=1)
    with caplog.at_level(logging.WARNING, logger="hmora_ds.train.loop"):
        assert not record_eval(state, math.nan, "val", mode)
    assert state.best["value"] is None and state.evals_without_improvement == 1
    assert "step 1: val is nan (not finite): not a best checkpoint" in caplog.text
    state.step = 2
    assert record_eval(state, 1.0, "val", mode)  # a finite score after it is the best
    assert state.best["step"] == 2 and state.evals_without_improvement == 0
    for state.step, bad in enumerate((math.inf, -math.inf, math.nan), start=3):
        assert not record_eval(state, bad, "val", mode)
        assert state.best["step"] == 2
    assert state.evals_without_improvement == 3
    # A non-finite best restored from an older checkpoint is beaten by any finite score.
    assert improved(5.0, math.nan, mode) and not improved(math.nan, None, mode)


@pytest.mark.slow
def test_nan_validation_loss_is_not_the_best_checkpoint(tiny_run_inputs, tmp_path):
    """Fault: lr 1e30 makes step 1's update overflow the adapters, so the first validation loss
    is non-finite; it used to become ``adapter_best`` (and the best for the rest of the run).
    The divergence stop still ends the run (exit 3) at the next, non-finite, step."""
    out = tmp_path / "nan_eval"
    log = launch(
        "python",
        "zero2.json",
        overrides(
            tiny_run_inputs,
            out,
            "train.lr=1e30",
            "train.warmup_steps=0",
            "train.max_nonfinite_steps=1",
            "train.micro_batch_size=1",
            "train.grad_accum=1",
            "eval.every=1",
            "eval.max_batches=1",
        ),
        expect=3,
    )
    assert re.search(r"step 1: val_loss is -?(nan|inf) \(not finite\): not a best checkpoint", log)
    s = summary(out)
    assert s["stop_reason"] == "1 non-finite steps in a row" and s["steps"] == 2
    assert s["best"]["value"] is None and s["best"]["step"] is None
    assert not (out / "adapter_best").exists()
    assert "Logging error" not in log  # the eval line without a best formats


# ------------------------------------------------------------------ item 6: the rank watchdog
def _beat(n: int, step: int | None, where: str = "train.py:1 in f", where_s=0.0, coll=False):
    return Beat(n, step, where, where_s, coll, pid=1, host="h", started=1.0)


def test_diagnose_names_silent_stuck_and_waiting_ranks():
    """The watchdog's classification: a rank without new heartbeats is silent; a reporting rank
    sitting at one line outside a collective is stuck (a stuck read, a hung device call)."""
    beats = {
        0: _beat(5, 3, "torch/distributed/distributed_c10d.py:2 in all_reduce", 40.0, True),
        1: _beat(5, 3, "hmora_ds/data/io.py:88 in read", 40.0),
        2: _beat(2, 3),
        3: None,
    }
    seen = {0: 99.0, 1: 99.0, 2: 55.0, 3: 0.0}
    d = diagnose(beats, seen, now=100.0, warn_after=30.0)
    assert d.silent == {2: 45.0, 3: 100.0}
    assert list(d.stuck) == [1] and d.waiting == [0]
    text = stall_message(d, beats, 60)
    assert text.startswith("rank 1 has sat at hmora_ds/data/io.py:88 in read for 40 s (step 3)")
    assert text.endswith("rank(s) 0 wait for it; collectives time out at dist.timeout_s=60")
    beats[1] = _beat(5, 3, "torch/distributed/distributed_c10d.py:2 in barrier", 40.0, True)
    d = diagnose(beats, {**seen, 2: 99.0, 3: 99.0}, now=100.0, warn_after=30.0)
    assert not d.silent and not d.stuck and d.waiting == [0, 1]
    assert stall_message(d, beats, 60).startswith("rank(s) 0, 1 have waited for the other ranks")
    beats[1] = Beat(6, 3, done=True)
    assert 1 not in diagnose(beats, {**seen, 1: 0.0}, now=100.0, warn_after=30.0).silent


def test_collective_failures_are_recognised():
    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
        "Timed out waiting 20000ms for recv operation to complete"
    )
    assert is_collective_failure(gloo)
    assert is_collective_failure(dist.DistBackendError("NCCL communicator was aborted"))
    assert not is_collective_failure(RuntimeError("shape mismatch"))
    assert not is_collective_failure(ValueError("Timed out waiting"))


class _Exit(Exception):
    pass


def _watch(store, rank: int, world: int, codes: list[int], timeout_s: float = 20.0):
    def fake_exit(code: int) -> None:
        codes.append(code)
        raise _Exit

    return RankWatch(store, rank, world, timeout_s, 0.5, step=lambda: 3, exit=fake_exit)


def test_watchdog_warns_then_stops_the_run_and_other_ranks_follow(caplog):
    """Rank 0's watchdog: a warning at watchdog_fraction × timeout_s, the stop message and exit
    code 4 at timeout_s, an abort key the other ranks' heartbeat threads follow."""
    store = dist.HashStore()
    codes: list[int] = []
    watch = _watch(store, 0, 2, codes)
    watch.last_seen = {0: 0.0, 1: 0.0}
    store.set(BEAT_KEY.format(rank=0), _beat(1, 3).to_json())
    store.set(BEAT_KEY.format(rank=1), _beat(1, 3).to_json())
    with caplog.at_level(logging.WARNING, logger=WATCH_LOG):
        watch.check(now=1.0)
        store.set(BEAT_KEY.format(rank=0), _beat(2, 3).to_json())  # rank 0 goes on, 1 not
        assert not caplog.text
        watch.check(now=12.0)
        assert (
            "rank 1 has not reported since step 3 (11 s ago); "
            "the run will stop at dist.timeout_s=20" in caplog.text
        )
        watch.check(now=15.0)  # warned once per silence
        assert caplog.text.count("has not reported") == 1
        with pytest.raises(_Exit):
            watch.check(now=21.5)
    assert codes == [EXIT_CODE]
    assert (
        "rank 1 has not reported since step 3 (20 s ago): stopping the run (dist.timeout_s=20)"
        in caplog.text
    )
    assert store.get(ABORT_KEY).decode().startswith("rank 1 has not reported since step 3")
    # Rank 1 (alive in this story) sees the abort on its next heartbeat and exits too.
    other: list[int] = []
    watch1 = _watch(store, 1, 2, other, timeout_s=1.0)
    with caplog.at_level(logging.ERROR, logger=WATCH_LOG):
        watch1.start()
        deadline = time.monotonic() + 10
        while not other and time.monotonic() < deadline:
            time.sleep(0.05)
        watch1._stop.set()
    assert other == [EXIT_CODE]
    assert "stopping: rank 0 ended the run: rank 1 has not reported" in caplog.text


def test_collective_timeout_in_the_main_thread_becomes_one_line(caplog):
    """When gloo's timeout fires before the watchdog, the exception leaving the run becomes the
    watchdog's one-line diagnosis and exit code 4 (no traceback)."""
    store = dist.HashStore()
    codes: list[int] = []
    watch = _watch(store, 0, 2, codes)
    watch.last_seen = {0: time.monotonic(), 1: time.monotonic() - 19.0}
    watch.beats = {0: _beat(9, 3), 1: _beat(4, 2)}
    store.set(BEAT_KEY.format(rank=0), _beat(10, 3).to_json())
    store.set(BEAT_KEY.format(rank=1), _beat(4, 2).to_json())
    err = RuntimeError("[/gloo/transport/tcp/pair.cc:1] Timed out waiting 20000ms for recv")
    with caplog.at_level(logging.ERROR, logger=WATCH_LOG), pytest.raises(_Exit):
        watch.__exit__(RuntimeError, err, None)
    assert codes == [EXIT_CODE]
    assert re.search(
        r"rank 1 has not reported since step 2 \(19 s ago\): stopping the run "
        r"\(dist.timeout_s=20\); a collective failed",
        caplog.text,
    )
    # Any other exception passes through untouched.
    assert watch.__exit__(ValueError, ValueError("x"), None) is False
    # Another rank whose collective timed out: one line naming it, its step and the timeout.
    other: list[int] = []
    with caplog.at_level(logging.ERROR, logger=WATCH_LOG), pytest.raises(_Exit):
        _watch(store, 1, 2, other).__exit__(RuntimeError, err, None)
    assert other == [EXIT_CODE]
    assert (
        "a collective failed on rank 1 at step 3: [/gloo/transport/tcp/pair.cc:1] Timed out "
        "waiting 20000ms for recv (dist.timeout_s=20)\n" in caplog.text
    )
    # Rank 0 frozen: the store in its process stopped taking rank 1's heartbeats.
    frozen0 = _watch(store, 1, 2, other)
    frozen0._store_ok -= 30
    with caplog.at_level(logging.ERROR, logger=WATCH_LOG), pytest.raises(_Exit):
        frozen0.__exit__(RuntimeError, err, None)
    assert re.search(
        r"\(dist.timeout_s=20\); the rendezvous store has not answered for 3\d s \(it runs in "
        r"rank 0's process unless torchrun hosts it\): rank 0 has probably stopped",
        caplog.text,
    )


def test_rank0_first_waits_while_rank0_reports_and_stops_when_it_is_silent():
    """Fault: with a collective timeout of a few minutes, the other ranks' barrier in
    rank0_first timed out while rank 0 was still downloading the base model. They now wait for
    as long as rank 0 reports, and end (RankSilent, one line) once it has been silent for
    dist.timeout_s."""
    from hmora_ds.runtime.watchdog import RankSilent

    store = dist.HashStore()
    r0, r1 = _watch(store, 0, 2, [], timeout_s=1.0), _watch(store, 1, 2, [], timeout_s=1.0)
    r0._spawn(r0._heartbeat_loop, "r0-heartbeat")  # rank 0 alive, busy 2 × timeout_s
    worker = threading.Thread(target=r0.rank0_first, args=(lambda: time.sleep(2.0),))
    t0 = time.monotonic()
    worker.start()
    try:
        assert r1.rank0_first(lambda: "cached") == "cached"
    finally:
        worker.join()
        r0._stop.set()
    assert time.monotonic() - t0 >= 2.0
    time.sleep(0.3)  # rank 0's heartbeat thread has stopped: it is silent from now on
    with pytest.raises(RankSilent, match=r"rank 0 has not reported since step 3 \(\d+ s ago\)"):
        r1.rank0_first(lambda: "never")


def test_dist_config_is_validated():
    run = load_run_config(None, ["dist.timeout_s=30", "dist.watchdog_fraction=0.25"])
    assert (run.dist.timeout_s, run.dist.watchdog_fraction, run.dist.watchdog) == (30, 0.25, True)
    with pytest.raises(ValueError, match=r"dist.timeout_s: must be > 0"):
        load_run_config(None, ["dist.timeout_s=0"])
    with pytest.raises(ValueError, match=r"dist.watchdog_fraction: must lie in \(0, 1\]"):
        load_run_config(None, ["dist.watchdog_fraction=1.5"])


def _children_with_rank(pid: int, rank: str):
    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == rank:
                return child
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
@pytest.mark.multirank
def test_frozen_rank_is_named_and_the_run_ends(tiny_run_inputs, tmp_path):
    """Fault: a frozen rank (SIGSTOP here; a stuck NFS read or a GPU hang alike) stalled the run
    silently for DeepSpeed's 10-minute default timeout. With dist.timeout_s=20 rank 0's watchdog
    names the rank and its last step at 10 s and ends the run (non-zero exit) at about 20 s,
    leaving no process behind (the frozen rank is killed; the launcher ends the rest)."""
    import psutil

    timeout_s = 20
    out = tmp_path / "frozen"
    args = overrides(
        tiny_run_inputs,
        out,
        "train.max_steps=200",
        "train.micro_batch_size=1",
        "train.grad_accum=1",
        "eval.every=1000",
        "checkpoint.every=1000",
        f"dist.timeout_s={timeout_s}",
    )
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [LAUNCHER, "--deepspeed", str(REPO / "ds_configs" / "zero2.json"), *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    chunks: list[str] = []

    def read() -> None:  # the progress bar ends its updates with \r, not \n
        while data := os.read(proc.stdout.fileno(), 65536):
            chunks.append(data.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    procs: list = []
    stopped_at = None
    try:
        deadline = time.monotonic() + 240
        while stopped_at is None and proc.poll() is None and time.monotonic() < deadline:
            # rank 0 finished step 1: its progress line (output is a pipe), or a bar's update
            if re.search(r"step [1-9]\d*/200 |\| [1-9]\d*/200 \[", "".join(chunks)):
                procs = psutil.Process(proc.pid).children(recursive=True)
                victim = _children_with_rank(proc.pid, "1")
                assert victim is not None, "rank 1's process not found"
                time.sleep(0.5)  # let rank 1 report a step or two
                victim.send_signal(signal.SIGSTOP)
                stopped_at = time.monotonic()
            time.sleep(0.05)
        assert stopped_at is not None, "".join(chunks)[-3000:]
        rc = proc.wait(timeout=timeout_s + 40)
        ended_after = time.monotonic() - stopped_at
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        proc.wait(timeout=30)
        reader.join(timeout=5)
    log = "".join(chunks)
    assert rc != 0, log[-3000:]
    assert ended_after < timeout_s + 20, (ended_after, log[-3000:])
    warned = re.search(
        rf"WARNING rank 1 has not reported since step (\d+) \((\d+) s ago\); "
        rf"the run will stop at dist.timeout_s={timeout_s}",
        log,
    )
    assert warned, log[-3000:]
    step = int(warned.group(1))
    assert re.search(
        rf"ERROR rank 1 has not reported since step {step} \(\d+ s ago\): stopping the run "
        rf"\(dist.timeout_s={timeout_s}\)",
        log,
    ), log[-3000:]
    # The step named is rank 1's: rank 0 got at most one step further without it.
    done = [int(a or b) for a, b in re.findall(r"step (\d+)/200 |\| (\d+)/200 \[", log)]
    assert step >= 1 and max(done) in (step, step + 1), (step, max(done))
    assert "Traceback" not in log, log[-3000:]
    time.sleep(0.5)
    alive = [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {alive}"


# ------------------------------------------------------------------ item 9: output_dir
@pytest.mark.slow
def test_unwritable_output_dir_is_refused_before_loading(tmp_path):
    """Fault: a read-only output_dir failed only at the first write (after loading the model,
    or at the first checkpoint). A path under /proc cannot be written even by root."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, LAUNCHER, "output_dir=/proc/hmora-test/run", "train.max_steps=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(
        "error: output_dir: /proc/hmora-test/run (its nearest existing parent /proc) is not "
        "writable ("
    ), proc.stderr[-2000:]
    assert "Loading" not in proc.stderr + proc.stdout  # refused before the model loads
    assert time.monotonic() - t0 < 60


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    """Fault: a file where the run directory (or one of its parents) should be."""
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    assert train_cli.main([f"output_dir={afile}"]) == 2
    assert capsys.readouterr().err == f"error: output_dir: {afile} exists and is not a directory\n"
    assert train_cli.main([f"output_dir={afile}/run"]) == 2
    assert capsys.readouterr().err == (
        f"error: output_dir: {afile}/run cannot be created: {afile} is not a directory\n"
    )
    check_writable_dir(tmp_path / "new" / "deeper")  # creatable: fine, and nothing created
    assert not (tmp_path / "new").exists() and sorted(os.listdir(tmp_path)) == ["notes.txt"]


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root ignores permission bits (the /proc test covers an unwritable parent as root)",
)
def test_read_only_output_dir_is_refused(tmp_path, capsys):
    """Fault: an output_dir (or its parent) without write permission."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert train_cli.main([f"output_dir={ro}"]) == 2
        assert capsys.readouterr().err == (
            f"error: output_dir: {ro} is not writable (Permission denied)\n"
        )
        assert train_cli.main([f"output_dir={ro}/run"]) == 2
        assert "(its nearest existing parent" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_json_beat_round_trip():
    beat = _beat(3, 7, "a.py:1 in f", 2.5, True)
    assert Beat.from_json(beat.to_json()) == beat
    assert json.loads(beat.to_json())["step"] == 7

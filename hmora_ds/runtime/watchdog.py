"""Heartbeats of every rank and rank 0's watchdog: a rank that stops answering is named before
the collective timeout ends the run, and the run then ends with one line and a non-zero exit.

Why: a frozen rank (``SIGSTOP``, a host out of memory, a stuck NFS read, a GPU hang) leaves the
other ranks waiting inside a collective, silently, until the process group's timeout
(``dist.timeout_s``); then gloo raises a C++ message on some rank and NCCL aborts, neither saying
which rank stopped or where.

How: every rank runs a daemon thread that writes a small heartbeat to the process group's
rendezvous store (the TCPStore the ranks met through; not the gloo / NCCL group, which a frozen
rank blocks) every ``interval`` seconds and whenever a step finishes: a counter, the optimizer
steps done, where the main thread is (file:line and function) and for how long it has been
there, and the process's pid, host and start time. Rank 0 runs a second thread, the watchdog,
that reads every rank's heartbeat and measures silence on its own clock (no clock skew between
hosts):

* a rank silent for ``watchdog_fraction × timeout_s`` is named in a warning
  (``rank 1 has not reported since step 3 (45 s ago); the run will stop at dist.timeout_s=60``);
* a rank whose main thread has sat at one line that long is named with that line (a stuck read,
  a hung device call), together with the ranks waiting for it in a collective;
* a rank silent for ``timeout_s`` ends the run: rank 0 logs one error line, tells every rank
  through the store to exit (ranks blocked in a collective cannot notice otherwise), kills the
  silent ranks on its own host (a frozen process ignores the launcher's SIGTERM, which would
  otherwise wait 30 s before its SIGKILL) and exits with :data:`EXIT_CODE`.

When a collective times out first (gloo raises on the waiting rank), :class:`RankWatch` turns the
exception into the same one-line error and exit (see :meth:`RankWatch.__exit__`); on a rank
other than 0 the line adds what it knows of rank 0 (its heartbeats, and whether the store, which
runs in rank 0's process under the deepspeed launcher, still answers), since a frozen rank 0
takes its watchdog with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hmora_ds.runtime.errors import first_line

logger = logging.getLogger(__name__)

#: Exit code of a run ended because a rank stopped answering or a collective failed.
EXIT_CODE = 4
#: Store keys (under the default store's own prefix).
BEAT_KEY = "hmora_watch/beat/{rank}"
ABORT_KEY = "hmora_watch/abort"
RANK0_DONE_KEY = "hmora_watch/rank0_first/{n}"
#: Where a main thread waits for the other ranks (an innermost Python frame in these files):
#: collectives, and :meth:`RankWatch.rank0_first`'s wait.
WAITING_FILES = ("torch/distributed/", "deepspeed/comm/", "hmora_ds/runtime/watchdog.py")
#: Substrings of exception messages of failed collectives (gloo and NCCL raise RuntimeError).
COLLECTIVE_ERRORS = (
    "Timed out waiting",  # gloo: a peer did not answer within the timeout
    "Connection closed by peer",  # gloo: a peer died
    "Connection reset by peer",
    "/gloo/",  # gloo's messages start with its source file
    "NCCL error",
    "ProcessGroupNCCL",
)


class RankSilent(RuntimeError):
    """A rank stopped reporting while this one waited for it."""


#: The :class:`RankWatch` running in this process (``rank0_first`` waits through it), or None.
_active: RankWatch | None = None


def active_watch() -> RankWatch | None:
    return _active


@dataclass
class Beat:
    """One heartbeat, as a rank writes it to the store.

    Attributes:
        n: the heartbeat counter (rank 0's watchdog measures silence by when it last changed).
        step: optimizer steps done (None before the training loop starts).
        where: the main thread's innermost Python frame, ``file:line in function``.
        where_s: seconds the main thread has been at ``where``.
        in_collective: ``where`` waits for other ranks (torch.distributed, deepspeed.comm,
            :meth:`RankWatch.rank0_first`).
        pid, host, started: the process (``started``: its start time, which tells a reused pid
            apart).
        done: the rank finished its run (silence after this is expected).
    """

    n: int
    step: int | None
    where: str = "?"
    where_s: float = 0.0
    in_collective: bool = False
    pid: int = 0
    host: str = ""
    started: float = 0.0
    done: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Beat:
        return cls(**json.loads(text))


def at_step(step: int | None) -> str:
    """``step 3``, or where a rank is before its first step."""
    return f"step {step}" if step else "start-up (before step 1)"


def silence_message(rank: int, beat: Beat | None, seconds: float, timeout_s: float) -> str:
    """The warning for a rank that has not reported for ``seconds``."""
    step = beat.step if beat is not None else None
    return (
        f"rank {rank} has not reported since {at_step(step)} ({seconds:.0f} s ago); "
        f"the run will stop at dist.timeout_s={timeout_s:g}"
    )


def stop_message(rank: int, beat: Beat | None, seconds: float, timeout_s: float) -> str:
    """The error that ends the run for a rank silent for ``seconds`` (≈ ``timeout_s``)."""
    step = beat.step if beat is not None else None
    return (
        f"rank {rank} has not reported since {at_step(step)} ({seconds:.0f} s ago): "
        f"stopping the run (dist.timeout_s={timeout_s:g})"
    )


def _at(beat: Beat) -> str:
    return f"{beat.where}, {at_step(beat.step)}"


def stall_message(d: Diagnosis, beats: dict[int, Beat | None], timeout_s: float) -> str:
    """The warning for ranks that report but have not moved: ``d.stuck`` (not waiting for
    other ranks: the likely cause) and ``d.waiting`` (waiting for them)."""
    if d.stuck:
        text = "; ".join(
            f"rank {r} has sat at {b.where} for {b.where_s:.0f} s ({at_step(b.step)})"
            for r, b in sorted(d.stuck.items())
        )
        if d.waiting:
            text += f"; rank(s) {', '.join(map(str, d.waiting))} wait for it"
    else:
        first = beats[d.waiting[0]]
        text = (
            f"rank(s) {', '.join(map(str, d.waiting))} have waited for the other ranks for "
            f"{first.where_s:.0f} s ({at_step(first.step)})"
        )
        others = {r: b for r, b in beats.items() if b is not None and r not in d.waiting}
        if others:
            text += "; elsewhere: " + "; ".join(
                f"rank {r} at {_at(b)}" for r, b in sorted(others.items())
            )
    return f"{text}; collectives time out at dist.timeout_s={timeout_s:g}"


@dataclass
class Diagnosis:
    """What rank 0's watchdog concludes from every rank's heartbeats at one moment.

    Attributes:
        silent: rank → seconds without a new heartbeat, for ranks silent for at least
            ``warn_after`` (finished ranks excluded).
        stuck: rank → heartbeat, for reporting ranks whose main thread has sat at one line,
            not waiting for other ranks, for at least ``warn_after`` (a stuck read, a hung
            device call).
        waiting: reporting ranks that have waited for other ranks (a collective) for at least
            ``warn_after``.
    """

    silent: dict[int, float] = field(default_factory=dict)
    stuck: dict[int, Beat] = field(default_factory=dict)
    waiting: list[int] = field(default_factory=list)


def diagnose(
    beats: dict[int, Beat | None], last_seen: dict[int, float], now: float, warn_after: float
) -> Diagnosis:
    """Classify ranks from their last heartbeats (``beats``; None: never reported) and when
    each last changed on the watchdog's clock (``last_seen``)."""
    d = Diagnosis()
    for rank, beat in sorted(beats.items()):
        if beat is not None and beat.done:
            continue
        quiet = now - last_seen[rank]
        if quiet >= warn_after:
            d.silent[rank] = quiet
    for rank, beat in sorted(beats.items()):
        if beat is None or beat.done or rank in d.silent or beat.where_s < warn_after:
            continue
        if beat.in_collective:
            d.waiting.append(rank)
        else:
            d.stuck[rank] = beat
    return d


def is_collective_failure(err: BaseException) -> bool:
    """A failed collective (timeout, a peer gone): torch's DistError, gloo / NCCL's
    RuntimeError, or :class:`RankSilent`."""
    if isinstance(err, RankSilent):
        return True
    try:
        from torch.distributed import DistError

        if isinstance(err, DistError):
            return True
    except ImportError:  # pragma: no cover - older torch
        pass
    return isinstance(err, RuntimeError) and any(s in str(err) for s in COLLECTIVE_ERRORS)


def _short(path: str) -> str:
    """A frame's file, from its package down (``torch/distributed/distributed_c10d.py``)."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    parts = path.replace(os.sep, "/").split("/")
    if "hmora_ds" in parts:
        return "/".join(parts[parts.index("hmora_ds") :])
    return "/".join(parts[-2:])


def _process_start(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # psutil missing or the process gone
        return 0.0


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream: nothing left to flush
            stream.flush()


class _MainThreadProbe:
    """Where the main thread is, and since when (same frame object at the same line)."""

    def __init__(self) -> None:
        self.ident = threading.main_thread().ident
        self.key: tuple[int, int] | None = None
        self.since = time.monotonic()

    def sample(self) -> tuple[str, float, bool]:
        frame = sys._current_frames().get(self.ident)  # CPython's thread dump
        if frame is None:
            return "?", 0.0, False
        key = (id(frame), frame.f_lineno)
        now = time.monotonic()
        if key != self.key:
            self.key, self.since = key, now
        code = frame.f_code
        path = code.co_filename.replace(os.sep, "/")
        where = f"{_short(path)}:{frame.f_lineno} in {code.co_name}"
        del frame
        return where, now - self.since, any(m in path for m in WAITING_FILES)


class RankWatch:
    """Heartbeats on every rank, the watchdog on rank 0; a context manager around a run.

    Args:
        store: the process group's rendezvous store (``torch.distributed``'s default store).
        rank, world_size: this process in the group.
        timeout_s: ``dist.timeout_s``.
        warn_fraction: ``dist.watchdog_fraction``.
        step: returns the optimizer steps done (None before training); see :meth:`follow`.
        exit: how the run is ended (``os._exit``; tests replace it).
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        timeout_s: float,
        warn_fraction: float,
        step: Callable[[], int | None] = lambda: None,
        exit: Callable[[int], Any] = os._exit,
    ) -> None:
        self.store = store
        self.rank, self.world = rank, world_size
        self.timeout_s = timeout_s
        self.warn_after = warn_fraction * timeout_s
        self.interval = min(5.0, max(0.2, self.warn_after / 5))
        self.step = step
        self._exit = exit
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._n = 0
        self._probe = _MainThreadProbe()
        self._me = (os.getpid(), socket.gethostname(), _process_start(os.getpid()))
        # Rank 0's view: every rank's last heartbeat and when it last changed.
        self.beats: dict[int, Beat | None] = dict.fromkeys(range(world_size))
        self.last_seen: dict[int, float] = {}
        self._warned: set[tuple] = set()
        self._ending = threading.Lock()
        self._rank0_calls = 0
        self._store_ok = time.monotonic()  # the last heartbeat the store took

    # ------------------------------------------------------------------ life cycle
    def start(self) -> RankWatch:
        global _active
        _active = self
        self.last_seen = dict.fromkeys(range(self.world), time.monotonic())
        self._store_ok = time.monotonic()
        self._beat()
        self._spawn(self._heartbeat_loop, "hmora-heartbeat")
        if self.rank == 0:
            self._spawn(self._watch_loop, "hmora-watchdog")
        return self

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def follow(self, step: Callable[[], int | None]) -> None:
        """Report ``step()`` (optimizer steps done) from now on."""
        self.step = step

    def stop(self, done: bool = True) -> None:
        """Stop both threads; the last heartbeat says whether this rank is ``done``."""
        global _active
        if _active is self:
            _active = None
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2 * self.interval + 1)
        if not done:
            return
        try:
            self._beat(done=True)
        except Exception:  # the store may be gone at the very end
            logger.debug("last heartbeat not written", exc_info=True)

    def __enter__(self) -> RankWatch:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and is_collective_failure(exc):
            self.fail(exc)  # does not return (unless a test replaced exit)
            return True
        # Leaving with another error is no "done": rank 0 keeps counting this rank's silence.
        self.stop(done=exc is None)
        return False

    # ------------------------------------------------------------------ every rank
    def _current_step(self) -> int | None:
        try:
            return self.step()
        except Exception:  # the step source is not ready yet
            return None

    def _beat(self, done: bool = False) -> None:
        where, where_s, in_collective = self._probe.sample()
        self._n += 1
        pid, host, started = self._me
        beat = Beat(
            self._n,
            self._current_step(),
            where,
            where_s,
            in_collective,
            pid,
            host,
            started,
            done,
        )
        self.store.set(BEAT_KEY.format(rank=self.rank), beat.to_json())

    def _heartbeat_loop(self) -> None:
        last_step, last_beat = self._current_step(), time.monotonic()
        # A finished step is reported within a tick, so a frozen rank's last report is at most
        # one step behind what the other ranks saw it do, even with steps of a few tens of ms
        # (at 0.1 s, two tiny CPU steps could pass unreported). Reading the step is cheap.
        tick = min(0.01, self.interval)
        while not self._stop.wait(tick):
            step = self._current_step()
            if step == last_step and time.monotonic() - last_beat < self.interval:
                continue
            last_step, last_beat = step, time.monotonic()
            try:
                self._beat()
                self._store_ok = time.monotonic()
                if self.rank != 0:
                    if self.store.check([ABORT_KEY]):
                        self._follow_abort()
                    self._read_beats(self._store_ok, ranks=[0])  # for fail()'s diagnosis
            except Exception:  # the store went away: the run is ending
                logger.debug("heartbeat not written", exc_info=True)
                return

    def _follow_abort(self) -> None:
        message = self.store.get(ABORT_KEY).decode(errors="replace")
        logger.error("stopping: rank 0 ended the run: %s", message)
        _flush()
        self._exit(EXIT_CODE)

    def rank0_first(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0, then on the other ranks (``hmora_ds.runtime.dist.rank0_first``
        while a watch runs). The other ranks wait through the store, not in a barrier: for as
        long as rank 0 keeps reporting (a first download may outlast ``timeout_s``), and
        until it has been silent for ``timeout_s`` (then :class:`RankSilent`). Rank 0 signals
        even when ``fn`` fails, so the other ranks run into the same error."""
        self._rank0_calls += 1
        key = RANK0_DONE_KEY.format(n=self._rank0_calls)
        if self.rank == 0:
            try:
                return fn()
            finally:
                self.store.set(key, "done")
        self._wait_for_rank0(key)
        return fn()

    def _wait_for_rank0(self, key: str) -> None:
        beat_key = BEAT_KEY.format(rank=0)
        beat: Beat | None = None
        seen = time.monotonic()
        while not self.store.check([key]):
            now = time.monotonic()
            if self.store.check([beat_key]):
                new = Beat.from_json(self.store.get(beat_key))
                if beat is None or new.n != beat.n:
                    beat, seen = new, now
            if now - seen >= self.timeout_s:
                raise RankSilent(stop_message(0, beat, now - seen, self.timeout_s))
            time.sleep(min(0.5, self.interval))

    # ------------------------------------------------------------------ rank 0
    def _read_beats(self, now: float, ranks: Any = None) -> None:
        for rank in range(self.world) if ranks is None else ranks:
            key = BEAT_KEY.format(rank=rank)
            if not self.store.check([key]):
                continue
            beat = Beat.from_json(self.store.get(key))
            old = self.beats[rank]
            if old is None or beat.n != old.n:
                self.last_seen[rank] = now
            self.beats[rank] = beat

    def check(self, now: float | None = None) -> Diagnosis:
        """One round of the watchdog: read the heartbeats, warn, end the run at the timeout."""
        now = time.monotonic() if now is None else now
        self._read_beats(now)
        d = diagnose(self.beats, self.last_seen, now, self.warn_after)
        for rank, quiet in d.silent.items():
            beat = self.beats[rank]
            if quiet >= self.timeout_s:
                self.end(stop_message(rank, beat, quiet, self.timeout_s))
                return d
            key = ("silent", rank, beat.n if beat else None)
            if key not in self._warned:
                self._warned.add(key)
                logger.warning("%s", silence_message(rank, beat, quiet, self.timeout_s))
        if not d.silent and (d.stuck or d.waiting):  # silence explains the waiting
            key = ("stall", *sorted((r, self.beats[r].where) for r in [*d.stuck, *d.waiting]))
            if key not in self._warned:
                self._warned.add(key)
                logger.warning("%s", stall_message(d, self.beats, self.timeout_s))
        return d

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the store went away: the run is ending
                logger.debug("watchdog round failed", exc_info=True)
                return

    # ------------------------------------------------------------------ the end
    def fail(self, err: BaseException) -> None:
        """A collective failed in the main thread: one line (with the watchdog's diagnosis on
        rank 0), then end the run."""
        if isinstance(err, RankSilent):
            self.end(str(err), everyone=self.rank == 0)
            return
        plain = self._failure_line(err)
        if self.rank != 0:
            self.end(plain + self._rank0_note(), everyone=False)
            return
        now = time.monotonic()
        try:
            self._read_beats(now)
        except Exception:  # the store is gone too: no diagnosis
            logger.debug("heartbeats not read", exc_info=True)
        d = diagnose(self.beats, self.last_seen, now, self.warn_after)
        if d.silent:
            rank, quiet = max(d.silent.items(), key=lambda item: item[1])
            message = stop_message(rank, self.beats[rank], quiet, self.timeout_s)
            message += "; a collective failed"
        elif d.stuck or d.waiting:
            message = "stopping the run: " + stall_message(d, self.beats, self.timeout_s)
        else:
            message = plain
        self.end(message)

    def _rank0_note(self) -> str:
        """What a rank other than 0 knows about rank 0 when its collective failed: the store
        stopped answering its heartbeats (under the deepspeed launcher and ``env://`` the
        store lives in rank 0's process), or rank 0's heartbeats stopped."""
        now = time.monotonic()
        if now - self._store_ok >= self.warn_after:
            return (
                f"; the rendezvous store has not answered for {now - self._store_ok:.0f} s "
                "(it runs in rank 0's process unless torchrun hosts it): rank 0 has probably "
                "stopped"
            )
        quiet = now - self.last_seen.get(0, now)
        if quiet >= self.warn_after:
            beat = self.beats.get(0)
            step = beat.step if beat is not None else None
            return f"; rank 0 has not reported since {at_step(step)} ({quiet:.0f} s ago)"
        return ""

    def _failure_line(self, err: BaseException) -> str:
        """``a collective failed on rank 1 at step 3: <the error's first line>``."""
        first = first_line(err)
        line = f"a collective failed on rank {self.rank} at {at_step(self._current_step())}"
        line += f": {first}"
        if "timed out" in first.lower():
            line += f" (dist.timeout_s={self.timeout_s:g})"
        return line

    def end(self, message: str, everyone: bool = True) -> None:
        """Log ``message``, tell every rank to exit (rank 0), kill the silent ranks on this
        host, exit with :data:`EXIT_CODE`."""
        if not self._ending.acquire(blocking=False):
            return  # the other thread is ending the run already
        self._stop.set()
        logger.error("%s", message)
        if everyone and self.rank == 0:
            try:
                self.store.set(ABORT_KEY, message)
            except Exception:  # the store is gone: the launcher ends the rest
                logger.debug("abort not published", exc_info=True)
            self._kill_silent_local_ranks()
        _flush()
        self._exit(EXIT_CODE)

    def _kill_silent_local_ranks(self) -> None:
        """SIGKILL the ranks that stopped reporting and run on this host (pid and start time
        checked): a frozen process does not act on SIGTERM."""
        now = time.monotonic()
        host = socket.gethostname()
        for rank, beat in self.beats.items():
            if rank == self.rank or beat is None or beat.done or beat.host != host:
                continue
            if now - self.last_seen[rank] < self.warn_after:
                continue
            if not beat.started or _process_start(beat.pid) != beat.started:
                continue
            try:
                os.kill(beat.pid, signal.SIGKILL)
                logger.error("killed rank %d (pid %d), which stopped answering", rank, beat.pid)
            except OSError:
                pass


def watch_ranks(rank: int, world_size: int, config: Any) -> RankWatch:
    """A :class:`RankWatch` on the default process group's store, configured by ``config``
    (the run config's ``dist`` section: ``timeout_s``, ``watchdog_fraction``, ``watchdog``);
    a no-op context for one rank, with the watchdog off, or without a store."""
    import torch.distributed as dist

    store = None
    if config.watchdog and world_size > 1:
        try:
            store = dist.distributed_c10d._get_default_store()
        except Exception as err:  # e.g. an MPI process group without a store
            logger.warning("no rendezvous store (%s): the rank watchdog is off", err)
    if store is None:
        return _NoWatch(rank, config.timeout_s)
    return RankWatch(store, rank, world_size, config.timeout_s, config.watchdog_fraction)


class _NoWatch(RankWatch):
    """One rank, or the watchdog off: nothing runs, exceptions pass through unchanged."""

    def __init__(self, rank: int, timeout_s: float) -> None:
        super().__init__(None, rank, 1, timeout_s, 1.0)

    def start(self) -> RankWatch:
        return self

    def stop(self, done: bool = True) -> None:
        pass

    def __exit__(self, exc_type, exc, tb) -> bool:
        return False

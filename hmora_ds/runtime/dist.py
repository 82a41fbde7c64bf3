"""Process start-up for training and evaluation: devices, process groups, DeepSpeed on CPU.

Works the same under ``deepspeed`` (which injects ``--local_rank``), ``torchrun``, ``mpirun``
and plain ``python`` (one process). On a machine without CUDA, DeepSpeed runs on its CPU
accelerator with gloo and fp32.

DeepSpeed-on-CPU trap (measured, ``shared/design/environment.md``): every
``deepspeed.init_distributed()`` JIT-compiles a shared-memory communication op (70–90 s cold)
that training never uses. We disable that one op builder before initialising; every other op
is left alone, and a project-local ``TORCH_EXTENSIONS_DIR`` caches anything else compiled.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: The deprecation warnings DeepSpeed 0.19 sets off in recent torch (2.13 here) through the
#: collectives it proxies (``deepspeed/comm/torch.py``): once per rank under ZeRO-2, on every
#: step of every rank under ZeRO-3. Nothing a user can act on: :func:`quiet_known_warnings`
#: drops exactly these messages (every other warning, deprecations included, still shows).
DEEPSPEED_COLLECTIVE_DEPRECATIONS = (
    r"`torch\.distributed\."
    r"(all_gather_into_tensor|_all_gather_base|reduce_scatter_tensor|_reduce_scatter_base"
    r"|all_reduce_coalesced)` (is deprecated|is a private function|will be deprecated)"
)


def quiet_known_warnings() -> None:
    """Ignore :data:`DEEPSPEED_COLLECTIVE_DEPRECATIONS` (FutureWarnings of
    ``torch.distributed``) in this process, at the start of training and evaluation (calling
    it again adds nothing: ``warnings`` keeps one copy of a filter)."""
    # By message, not by module: the frame a warning is attributed to depends on how torch
    # wraps the collective (today torch.distributed.c10d_logger).
    warnings.filterwarnings(
        "ignore", message=DEEPSPEED_COLLECTIVE_DEPRECATIONS, category=FutureWarning
    )


def resolve_progress(mode: str, stream: Any = None) -> str:
    """``log.progress`` as shown: ``auto`` is ``bar`` when ``stream`` (stderr) is a
    terminal, ``lines`` otherwise; ``bar``, ``lines`` and ``none`` stay as they are."""
    if mode != "auto":
        return mode
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a replaced or closed stream
        return "lines"


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(name: str) -> str | None:
    """A launcher (``deepspeed``, ``torchrun``) of this Python's environment, else on PATH."""
    import shutil
    from pathlib import Path

    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def prepare_environment(cache_dir: str | None = None) -> None:
    """Environment variables that must be set before DeepSpeed is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if cache_dir:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(cache_dir, "torch_extensions"))
    # Plain `python`: make a one-process group out of nothing.
    if "WORLD_SIZE" not in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    os.environ.setdefault("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def rank0_first(fn, rank: int):
    """Run ``fn`` on rank 0, then on the other ranks (which reuse what rank 0 cached).

    Rank 0 reaches the barrier even when ``fn`` fails, so the other ranks run into the same
    error instead of waiting for it forever. While a rank watch runs (training), the other
    ranks wait through it instead, for as long as rank 0 keeps reporting: a first download may
    take longer than the collective timeout (``hmora_ds.runtime.watchdog``).
    """
    import torch.distributed as dist

    from hmora_ds.runtime.watchdog import active_watch

    watch = active_watch()
    if watch is not None:
        return watch.rank0_first(fn)
    if rank != 0:
        dist.barrier()
        return fn()
    try:
        return fn()
    finally:
        dist.barrier()


def skip_cpu_shm_build() -> None:
    """Trap 1 of the environment note: skip the unused shared-memory op build on CPU.

    (``import deepspeed.comm.torch as m`` would bind the package attribute, not the module.)
    """
    import deepspeed.comm.torch  # noqa: F401  (make sure the module is loaded)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed(cache_dir: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU).

    ``timeout_s`` bounds every collective's wait for the other ranks (the run config's
    ``dist.timeout_s``); None keeps DeepSpeed's default (10 minutes, ``DEEPSPEED_TIMEOUT``).
    DeepSpeed's deprecated-collective warnings are filtered first (:func:`quiet_known_warnings`).
    """
    quiet_known_warnings()
    prepare_environment(cache_dir)
    import deepspeed

    cpu = on_cpu()
    if cpu:
        skip_cpu_shm_build()
    if not torch.distributed.is_initialized():
        # Under mpirun without RANK/WORLD_SIZE, DeepSpeed discovers ranks through mpi4py and
        # sets MASTER_PORT to `distributed_port` (default 29500, overwriting ours): pass the
        # user's MASTER_PORT (exported with `mpirun -x MASTER_PORT`) so jobs can pick a port.
        port = int(os.environ.get("MASTER_PORT", "29500"))
        extra = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(
            dist_backend="gloo" if cpu else "nccl", verbose=False, distributed_port=port, **extra
        )
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cpu:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return DistInfo(rank, world, local_rank, device)


class _RankZeroFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Log INFO from rank 0 only (warnings from every rank, prefixed with the rank)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"[%(asctime)s r{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    )
    handler.addFilter(_RankZeroFilter(rank))
    root = logging.getLogger("hmora_ds")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # DeepSpeed is chatty at INFO on every rank.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

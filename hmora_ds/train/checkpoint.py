"""DeepSpeed checkpoints that resume exactly and are never half-trusted.

Layout of ``<output_dir>/checkpoints``::

    latest                    # tag of the newest *complete* checkpoint (atomic replace)
    step00000200/
        mp_rank_00_model_states.pt, *_optim_states.pt   # DeepSpeed (frozen base excluded)
        rng_rank000.pt …      # per-rank RNG states (dropout masks continue identically)
        run_config.json       # the resolved run config
        adapter_meta.json     # what `python -m hmora_ds.export` needs (config, base fingerprint)
        complete.json         # written last: a checkpoint without it is ignored

DeepSpeed's own ``latest`` is written non-atomically, after the save; we disable it and write
ours with ``os.replace`` once every rank has finished, so a run killed during a save resumes
from the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hmora_ds.methods import adapter_parameters

logger = logging.getLogger(__name__)

LATEST = "latest"
COMPLETE = "complete.json"
TAG_RE = re.compile(r"^step(\d{8})$")
#: Fault injection for tests: exit right after DeepSpeed wrote this tag, before it is committed.
CRASH_ENV = "HMORA_CRASH_DURING_SAVE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


@contextlib.contextmanager
def frozen_weights_excluded(module: torch.nn.Module):
    """While saving, drop every frozen weight from ``module.state_dict()``, tied aliases too.

    DeepSpeed's ``exclude_frozen_parameters`` deletes the names ``named_parameters()`` yields,
    which lists a tied weight once (``embed_tokens``), so the alias (``lm_head.weight``) was
    still written: +113 MB per SmolLM2 checkpoint, ~0.5 GB for Qwen2-1.5B. A state-dict hook on
    our own module, removed right after the save, drops the aliases by storage. (Not under
    ZeRO-3, whose module tensors are empty placeholders and whose state is saved by partition.)
    """
    trainable = {id(p) for p in adapter_parameters(module).values()}
    frozen = {p.data_ptr() for p in module.parameters() if id(p) not in trainable and p.numel()}

    def drop(_module, state, _prefix, _meta):
        for key in [k for k, v in state.items() if v.numel() and v.data_ptr() in frozen]:
            del state[key]
        return state

    handle = module._register_state_dict_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def save_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    client_state: dict[str, Any],
    extra_files: dict[str, Any],
    keep_last: int,
    protect: set[str],
    rank: int,
) -> str:
    """Save, commit and prune (every rank must call this). Returns the tag."""
    tag = tag_for(step)
    stage3 = engine.zero_optimization_partition_weights()
    with contextlib.nullcontext() if stage3 else frozen_weights_excluded(engine.module):
        engine.save_checkpoint(
            str(ckpt_dir),
            tag=tag,
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=True,
        )
    tag_dir = ckpt_dir / tag
    torch.save(rng_state(), tag_dir / f"rng_rank{rank:03d}.pt")
    if os.environ.get(CRASH_ENV) == tag:
        logger.error("fault injection: exiting during the save of %s", tag)
        os._exit(17)
    dist.barrier()
    if rank == 0:
        for name, data in extra_files.items():
            _write_json_atomic(tag_dir / name, data)
        _write_json_atomic(tag_dir / COMPLETE, {"step": step})
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        prune(ckpt_dir, keep_last, protect | {tag})
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int, protect: set[str]) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never a protected one),
    and incomplete checkpoints older than the newest complete one."""
    tags = complete_tags(ckpt_dir)
    keep = set(tags[-keep_last:]) | protect
    newest = tags[-1] if tags else None
    for path in ckpt_dir.iterdir():
        if not TAG_RE.match(path.name) or path.name in keep:
            continue
        if path.name in tags or (newest is not None and path.name < newest):
            shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoint dir, tag) from a run's checkpoint dir (its ``latest``) or a tag dir."""
    path = Path(path)
    if (path / LATEST).is_file():
        tag = (path / LATEST).read_text().strip()
        if not (path / tag / COMPLETE).is_file():
            raise ValueError(f"--resume: {path / tag} is not a complete checkpoint")
        return path, tag
    if (path / COMPLETE).is_file():
        return path.parent, path.name
    if (path / "checkpoints" / LATEST).is_file():
        return find_checkpoint(path / "checkpoints")
    raise ValueError(
        f"--resume: no complete checkpoint at {path} (expected a 'latest' file or a step dir)"
    )


def load_checkpoint(engine: Any, ckpt_dir: Path, tag: str, rank: int) -> dict[str, Any]:
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the client state."""
    _, client_state = engine.load_checkpoint(
        str(ckpt_dir),
        tag=tag,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if client_state is None:
        raise ValueError(f"--resume: DeepSpeed could not load {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng_rank{rank:03d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("resume: %s missing (different world size?); RNG not restored", rng_file)
    return client_state

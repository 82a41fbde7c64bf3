"""DeepSpeed checkpoints that resume exactly and are never half-trusted.

Layout of ``<output_dir>/checkpoints``::

    latest                    # tag of the newest committed checkpoint (for people and
                              # DeepSpeed's tools; resuming scans the tags instead)
    step00000200/
        mp_rank_00_model_states.pt, *_optim_states.pt   # DeepSpeed (frozen base excluded)
        rng_rank000.pt …      # per-rank RNG states: tensors and numbers only
        run_config.json       # the resolved run config
        adapter_meta.json     # what `python -m hmora_ds.export` needs (config, base fingerprint)
        loop_state.json       # the loop's position, best, loss history (JSON)
        manifest.json         # written last: size + SHA-256 of every other file
    .tmp-step00000400/        # a save in progress (or one that was killed): never read

**Saving** (:func:`save_checkpoint`): every rank writes into ``.tmp-<tag>``; after a barrier,
rank 0 adds the JSON files and the manifest, then renames the directory to ``<tag>``
(replacing a checkpoint of the same step: a save never skips a step) and rewrites ``latest``.
A run killed during a save leaves only the ``.tmp-`` directory, which nothing reads and the
next save removes. A write that fails (a full disk) raises :class:`CheckpointWriteError`
naming the file; the previous checkpoints are untouched.

**Loading** (:func:`verify_checkpoint`, before anything is unpickled): every file must have
the size and SHA-256 the manifest recorded at save time (a truncated or modified file is
named), and every pickle may only reference tensors, containers and the few DeepSpeed state
classes of :func:`_safe_globals` (a planted ``__reduce__`` payload is refused, not run). Our
own files load with ``weights_only=True``, DeepSpeed's under ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
(:func:`weights_only_loads`). A checkpoint saved before manifests existed (``complete.json``
instead of ``manifest.json``) cannot be verified: it is accepted with a warning, and its
pickles are still scanned and loaded weights-only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hmora_ds.methods import adapter_parameters
from hmora_ds.runtime.errors import first_line

logger = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"
LOOP_STATE = "loop_state.json"
#: The completion marker of checkpoints saved before manifests existed.
LEGACY_COMPLETE = "complete.json"
TAG_RE = re.compile(r"^step(\d{8})$")
#: A save in progress is written under this prefix, then renamed to its tag.
TMP_PREFIX = ".tmp-"
#: A replaced checkpoint is moved aside under this prefix, then deleted.
OLD_PREFIX = ".old-"
#: Fault injection for tests: exit right after DeepSpeed wrote this tag, before it is committed.
CRASH_ENV = "HMORA_CRASH_DURING_SAVE"
_HASH_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: the message names the file and the reason."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the message names the file."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


# ----------------------------------------------------------------------------- safe loading
def _safe_globals() -> list[Any]:
    """Classes DeepSpeed's checkpoint files reference besides tensors and containers (ZeRO
    optimizer states: the loss scaler, the stage enum, fragment addresses), and numpy's array
    reconstruction, which RNG files written before hmora-ds stored plain numbers used."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    found: list[Any] = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    found += [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    core = getattr(np, "_core", None) or np.core
    found.append(core.multiarray._reconstruct)
    # Some Pythons (Debian's 3.11.2, 3.12+) pickle an enum member as getattr(EnumClass, "NAME"):
    # that name is served by a lookup of members of the allowed enums only, never a real getattr.
    found.append((_enum_member, "builtins.getattr"))
    return found


def _allowed_enums() -> tuple[type, ...]:
    """Enums whose members checkpoints may name (``getattr(cls, name)`` in the pickle)."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return (ZeroStageEnum,)


def _enum_member(cls: Any, name: Any) -> Any:
    """The weights-only unpickler's ``builtins.getattr``: a member of an allowed enum by name."""
    if cls not in _allowed_enums() or not isinstance(name, str) or name not in cls.__members__:
        raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) is not an allowed enum member")
    return cls.__members__[name]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's too, which pass ``weights_only=False``) runs
    the weights-only unpickler: tensors, containers and :func:`_safe_globals` only."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def safe_load(path: Path, map_location: str | None = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` (and :func:`_safe_globals`); an unsafe or
    unreadable file raises :class:`CheckpointError` naming it."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # the unpickler's errors name neither the file nor the fix
        raise CheckpointError(f"{path}: cannot be loaded safely ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    """The informative line of an error: the weights-only unpickler's own reason (torch puts
    it after a paragraph of advice), else the first line."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        # The reason follows the marker, on its line or (for errors raised by an allowed
        # callable) on the next non-empty one.
        rest = text.split("WeightsUnpickler error:", 1)[1]
        reason = next((line.strip() for line in rest.splitlines() if line.strip()), "")
        return reason.split(". Please")[0][:300]
    return first_line(err)[:300]


def scan_pickle(path: Path) -> None:
    """Refuse a ``torch.save`` file whose pickle references anything but tensors, containers
    and :func:`_safe_globals`, without unpickling it (a static read of its opcodes)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            unsafe = get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint, refused before unpickling "
            f"({_first_line(err)})"
        ) from err
    if unsafe:
        raise CheckpointError(
            f"{path}: refused before unpickling: it references {', '.join(sorted(unsafe))}, "
            "which no hmora-ds / DeepSpeed checkpoint contains (modified or planted file)"
        )


# ----------------------------------------------------------------------------- manifests
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(tag_dir: Path) -> list[Path]:
    """Every file under ``tag_dir`` but the manifest (relative paths, sorted)."""
    return sorted(
        p.relative_to(tag_dir)
        for p in tag_dir.rglob("*")
        if p.is_file() and p.relative_to(tag_dir) != Path(MANIFEST)
    )


def write_manifest(tag_dir: Path, step: int) -> None:
    """Record size and SHA-256 of every file of ``tag_dir``; written last (atomically)."""
    files = {}
    for rel in _files(tag_dir):
        path = tag_dir / rel
        files[str(rel)] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    _write_json_atomic(tag_dir / MANIFEST, {"format": 1, "step": step, "files": files})


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MANIFEST).is_file() or (tag_dir / LEGACY_COMPLETE).is_file()


def verify_checkpoint(tag_dir: Path) -> None:
    """Check ``tag_dir`` before anything in it is unpickled (see the module doc).

    Raises:
        CheckpointError: naming the first file that is missing, added, truncated, modified
            or unsafe to unpickle.
    """
    manifest_path = tag_dir / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            listed = manifest["files"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{manifest_path}: unreadable ({_first_line(err)}); truncated or modified"
            ) from err
        present = {str(rel) for rel in _files(tag_dir)}
        for name in sorted(present - set(listed)):
            raise CheckpointError(
                f"{tag_dir / name}: not in the manifest written at save time (added later)"
            )
        for name, entry in sorted(listed.items()):
            path = tag_dir / name
            if name not in present:
                raise CheckpointError(
                    f"{path}: missing (listed in the manifest written at save time)"
                )
            size = path.stat().st_size
            if size != entry["size"]:
                raise CheckpointError(
                    f"{path}: size differs from the manifest written at save time "
                    f"({size} bytes, {entry['size']} saved; truncated or modified)"
                )
            if _sha256(path) != entry["sha256"]:
                raise CheckpointError(
                    f"{path}: digest differs from the manifest written at save time (modified)"
                )
    elif (tag_dir / LEGACY_COMPLETE).is_file():
        logger.warning(
            "%s was saved before checkpoints had manifests: its files cannot be verified "
            "(their pickles are still checked and loaded weights-only)",
            tag_dir,
        )
    else:
        raise CheckpointError(f"{tag_dir}: not a complete checkpoint (no {MANIFEST})")
    for path in sorted(tag_dir.rglob("*.pt")):
        scan_pickle(path)


def read_loop_state(tag_dir: Path) -> dict[str, Any] | None:
    """The loop state saved as JSON with the checkpoint (None for an older checkpoint)."""
    path = tag_dir / LOOP_STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({_first_line(err)})") from err


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, numbers and strings (loads weights-only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- listing
def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a hidden temporary file beside ``path``, sync it, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: Path, data: Any) -> None:
    _write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of complete checkpoints (a manifest, or an older one's ``complete.json``), oldest
    first. Completeness is not integrity: :func:`verify_checkpoint` checks that."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and is_complete(p))


def find_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoint dir, tag) from a run's dir or its checkpoints dir (the newest complete
    checkpoint) or a tag dir. Not verified: see :func:`verify_checkpoint`."""
    path = Path(path)
    if TAG_RE.match(path.name) and path.is_dir():
        if not is_complete(path):
            raise CheckpointError(
                f"{path} is not a complete checkpoint (no {MANIFEST}: its save did not finish)"
            )
        return path.parent, path.name
    for ckpt_dir in (path, path / "checkpoints"):
        tags = complete_tags(ckpt_dir)
        if tags:
            return ckpt_dir, tags[-1]
    raise CheckpointError(
        f"no complete checkpoint at {path} (expected a run directory, its checkpoints/ "
        "directory or a step directory)"
    )


@dataclass(frozen=True)
class ResumePoint:
    """A verified checkpoint to resume from; ``loop_state`` is its ``loop_state.json`` (None
    for a checkpoint saved before that file existed: then DeepSpeed's client state is used)."""

    ckpt_dir: Path
    tag: str
    loop_state: dict[str, Any] | None

    @property
    def tag_dir(self) -> Path:
        return self.ckpt_dir / self.tag


def newest_verified(ckpt_dir: Path) -> ResumePoint | None:
    """The newest complete checkpoint of ``ckpt_dir`` that verifies (``--resume auto``): a
    corrupt one is skipped with a warning naming the file; None when there is none at all.

    Raises:
        CheckpointError: when complete checkpoints exist but none verifies.
    """
    tags = complete_tags(ckpt_dir)
    problems: list[str] = []
    for tag in reversed(tags):
        try:
            verify_checkpoint(ckpt_dir / tag)
            point = ResumePoint(ckpt_dir, tag, read_loop_state(ckpt_dir / tag))
        except CheckpointError as err:
            logger.warning("resume: skipping checkpoint %s: %s", tag, err)
            problems.append(str(err))
            continue
        if problems:
            logger.warning("resume: falling back to the older checkpoint %s", tag)
        return point
    if problems:
        raise CheckpointError(
            f"--resume auto: no usable checkpoint in {ckpt_dir}: {'; '.join(problems)}"
        )
    return None


def verified(path: str | Path) -> ResumePoint:
    """An explicit ``--resume PATH`` (or export source), verified; no fallback."""
    ckpt_dir, tag = find_checkpoint(path)
    verify_checkpoint(ckpt_dir / tag)
    return ResumePoint(ckpt_dir, tag, read_loop_state(ckpt_dir / tag))


# ----------------------------------------------------------------------------- saving
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


def _write_failure(err: BaseException, where: Path) -> CheckpointWriteError:
    """A one-line :class:`CheckpointWriteError` for ``err``: the OS error in its chain (torch
    wraps a failed write in a RuntimeError) and the file it was writing."""
    seen, cause = set(), err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno is not None:
            reason = os.strerror(cause.errno).lower()
            if cause.errno == errno.ENOSPC:
                reason = "no space left on device"
            file = cause.filename or where
            return CheckpointWriteError(f"{reason} while writing {file}")
        cause = cause.__cause__ or cause.__context__
    return CheckpointWriteError(f"{_first_line(err)} while writing {where}")


def _install_checked_writer(engine: Any) -> None:
    """DeepSpeed's torch engine saves through ``torch.save(obj, path)``, whose C++ writer
    reports a full disk as "unexpected pos …" without an errno or a file name. Ours writes
    through a Python file (the OSError survives, with the file named) and fsyncs it."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is not TorchCheckpointEngine:  # ours already, or a user-chosen engine
        return

    class CheckedTorchCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str):
            try:
                with open(path, "wb") as f:
                    torch.save(
                        state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization
                    )
                    f.flush()
                    os.fsync(f.fileno())
            except Exception as err:
                raise _write_failure(err, Path(path)) from err

    checked = CheckedTorchCheckpointEngine.__new__(CheckedTorchCheckpointEngine)
    checked.__dict__.update(current.__dict__)
    engine.checkpoint_engine = checked


def _remove(path: Path) -> None:
    """Delete a checkpoint directory; a failure is logged, never silently dropped (the
    directory stays on disk and is counted against nothing, but the user should know)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as err:
        logger.warning(
            "checkpoint: could not delete %s (%s); it stays on disk, delete it by hand", path, err
        )


def _commit(tmp_dir: Path, tag_dir: Path) -> None:
    """Rename the finished save to its tag; a checkpoint of the same step is replaced."""
    if tag_dir.exists():
        old = tag_dir.with_name(OLD_PREFIX + tag_dir.name)
        _remove(old)
        os.rename(tag_dir, old)
        os.rename(tmp_dir, tag_dir)
        _remove(old)
    else:
        os.rename(tmp_dir, tag_dir)
    fd = os.open(tag_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Save, commit and prune (every rank must call this). Returns the tag.

    Raises:
        CheckpointWriteError: a file could not be written (the message names it); the
            unfinished save is removed and the earlier checkpoints are kept. Under several
            ranks the others may wait in a collective: the launcher ends them when this
            rank exits.
    """
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    tmp_dir = ckpt_dir / tmp_tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove(tmp_dir)  # a save of this step killed earlier
    dist.barrier()
    _install_checked_writer(engine)
    stage3 = engine.zero_optimization_partition_weights()
    try:
        with contextlib.nullcontext() if stage3 else frozen_weights_excluded(engine.module):
            engine.save_checkpoint(
                str(ckpt_dir),
                tag=tmp_tag,
                client_state=client_state,
                save_latest=False,
                exclude_frozen_parameters=True,
            )
        rng_file = tmp_dir / f"rng_rank{rank:03d}.pt"
        try:
            with rng_file.open("wb") as f:
                torch.save(rng_state(), f)
                f.flush()
                os.fsync(f.fileno())
        except Exception as err:
            raise _write_failure(err, rng_file) from err
    except (CheckpointWriteError, OSError) as err:  # OSError: DeepSpeed's own copies, dirs
        _remove(tmp_dir)
        failure = err if isinstance(err, CheckpointWriteError) else _write_failure(err, tmp_dir)
        raise CheckpointWriteError(
            f"checkpoint {tag} not saved: {failure}; {_kept(ckpt_dir)}"
        ) from err
    if os.environ.get(CRASH_ENV) == tag:
        logger.error("fault injection: exiting during the save of %s", tag)
        os._exit(17)
    dist.barrier()
    if rank == 0:
        try:
            for name, data in extra_files.items():
                _write_json_atomic(tmp_dir / name, data)
            write_manifest(tmp_dir, step)
            _commit(tmp_dir, ckpt_dir / tag)
        except OSError as err:
            _remove(tmp_dir)
            raise CheckpointWriteError(
                f"checkpoint {tag} not saved: {_write_failure(err, tmp_dir)}; {_kept(ckpt_dir)}"
            ) from err
        try:  # informational: resuming scans the tags
            _write_text_atomic(ckpt_dir / LATEST, tag)
        except OSError as err:
            logger.warning("checkpoint %s saved, but %s not updated: %s", tag, LATEST, err)
        prune(ckpt_dir, keep_last, protect | {tag})
    dist.barrier()
    return tag


def _kept(ckpt_dir: Path) -> str:
    tags = complete_tags(ckpt_dir)
    return f"the newest complete checkpoint {tags[-1]} is kept" if tags else "no earlier checkpoint"


def prune(ckpt_dir: Path, keep_last: int, protect: set[str]) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never a protected one),
    incomplete checkpoints older than the newest complete one, and unfinished saves."""
    tags = complete_tags(ckpt_dir)
    keep = set(tags[-keep_last:]) | protect
    newest = tags[-1] if tags else None
    for path in ckpt_dir.iterdir():
        if path.is_dir() and path.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            _remove(path)
            continue
        if not TAG_RE.match(path.name) or path.name in keep:
            continue
        if path.name in tags or (newest is not None and path.name < newest):
            _remove(path)


# ----------------------------------------------------------------------------- loading
def load_checkpoint(engine: Any, point: ResumePoint, rank: int) -> dict[str, Any]:
    """Restore engine, optimizer, scheduler and this rank's RNG from a verified checkpoint
    (every unpickling weights-only); returns DeepSpeed's client state."""
    try:
        with weights_only_loads():
            _, client_state = engine.load_checkpoint(
                str(point.ckpt_dir),
                tag=point.tag,
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
    except CheckpointError:
        raise
    except Exception as err:  # verified, yet unloadable: an incompatible run or an old file
        raise CheckpointError(
            f"--resume: DeepSpeed could not load {point.tag_dir} ({_first_line(err)})"
        ) from err
    if client_state is None:
        raise CheckpointError(f"--resume: DeepSpeed could not load {point.tag_dir}")
    rng_file = point.tag_dir / f"rng_rank{rank:03d}.pt"
    if rng_file.is_file():
        set_rng_state(safe_load(rng_file))
    else:
        logger.warning("resume: %s missing (different world size?); RNG not restored", rng_file)
    return client_state

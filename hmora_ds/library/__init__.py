"""A library of trained LoRAs: one plain LoRA per task of a mixture, on one base model.

The composition methods (MoLE, Mixture-of-LoRAs, LoraHub) start from such a library. On disk
it is a directory holding ``library.json`` and the adapters (ordinary hmora-ds adapter
directories, written by ``launchers/train.py``)::

    DIR/
      library.json          # format, base model (name + shape fingerprint), one entry per task
      arc_easy/adapter_best/{adapter_config.json, adapter_model.safetensors}
      csqa/adapter_best/…

``library.json``::

    {"format": "hmora-ds-lora-library", "version": 1,
     "base_model": {"name_or_path": "...", "fingerprint": {...}},
     "entries": [{"task": "arc_easy", "adapter": "arc_easy/adapter_best",
                  "val_loss": 1.23, "steps": 40, "seconds": 95.0}, ...]}

Adapter paths are relative to the library directory, so a library can be moved or copied as a
whole. :meth:`Library.load` checks the manifest; :func:`load_lora` reads one entry's tensors as
``(A, B, scaling)`` per adapted linear, the form the composition methods consume. Every
problem is a :class:`LibraryError`: one line naming the file or field and what to do.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

LIBRARY_NAME = "library.json"
LIBRARY_FORMAT = "hmora-ds-lora-library"
LIBRARY_VERSION = 1


class LibraryError(ValueError):
    """A library that cannot be used (missing or damaged manifest, an adapter that is not a
    plain LoRA, another base model). One line naming the file and the fix."""


@dataclass(frozen=True)
class LoRASite:
    """One adapted linear of a plain LoRA: ``ΔW x = scaling · B (A x)``.

    Attributes:
        A: ``(r, in_features)``.
        B: ``(out_features, r)``.
        scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rslora).
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        """The dense update ``scaling · B A`` (out, in)."""
        return self.scaling * (self.B @ self.A)


@dataclass(frozen=True)
class LibraryEntry:
    """One task's LoRA. ``adapter`` is absolute (resolved against the library directory)."""

    task: str
    adapter: Path
    val_loss: float | None = None
    steps: int | None = None
    seconds: float | None = None

    def to_json(self, root: Path) -> dict[str, Any]:
        try:
            rel = self.adapter.resolve().relative_to(root.resolve())
        except ValueError:
            rel = self.adapter.resolve()  # outside the library: kept absolute
        return {
            "task": self.task,
            "adapter": str(rel),
            "val_loss": self.val_loss,
            "steps": self.steps,
            "seconds": self.seconds,
        }


@dataclass
class Library:
    """A loaded ``library.json``."""

    root: Path
    base_name: str | None
    fingerprint: dict[str, Any]
    entries: list[LibraryEntry] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return [e.task for e in self.entries]

    def entry(self, task: str) -> LibraryEntry:
        for e in self.entries:
            if e.task == task:
                return e
        raise LibraryError(
            f"library {self.root}: no LoRA for task {task!r}; it holds {', '.join(self.tasks)}"
        )

    def select(self, tasks: list[str] | None = None, exclude: list[str] | None = None) -> Library:
        """A library of the named tasks (in the given order; None = all), minus ``exclude``."""
        entries = [self.entry(t) for t in tasks] if tasks else list(self.entries)
        for t in exclude or []:
            self.entry(t)  # an unknown name is an error, not a silent no-op
        entries = [e for e in entries if e.task not in set(exclude or [])]
        if not entries:
            raise LibraryError(f"library {self.root}: the selection leaves no LoRA")
        return Library(self.root, self.base_name, dict(self.fingerprint), entries)

    def check_uniform(self) -> dict[str, Any]:
        """Refuse a library whose LoRAs differ in rank, alpha, rslora or adapted targets (their
        tensors could not be added); returns the shared :func:`lora_shape`."""
        shapes = {e.task: lora_shape(e.adapter) for e in self.entries}
        first_task, first = next(iter(shapes.items()))
        for task, shape in shapes.items():
            diff = {k: (first[k], v) for k, v in shape.items() if first.get(k) != v}
            if diff:
                details = ", ".join(f"{k} {a} ({first_task}) vs {b} ({task})"
                                    for k, (a, b) in diff.items())  # fmt: skip
                raise LibraryError(
                    f"library {self.root} mixes LoRA shapes: {details}; every task's LoRA must "
                    "share rank and alpha (rebuild the odd ones with the same --preset / --set)"
                )
        return first

    def check_base(self, base_model: torch.nn.Module) -> None:
        """Refuse a base model of another shape than the one the library was trained on."""
        from hmora_ds.base_model import fingerprint_mismatch

        details = fingerprint_mismatch(self.fingerprint, base_model, "library")
        if details:
            raise LibraryError(
                f"library {self.root} was trained on base {self.base_name!r} of another shape: "
                f"{details}; use it with that base model or build a library for this one "
                "(python -m hmora_ds.library build)"
            )

    @classmethod
    def load(cls, directory: str | Path) -> Library:
        """Read and check ``DIR/library.json`` and that every adapter it names exists."""
        root = Path(directory)
        path = root / LIBRARY_NAME
        if not path.is_file():
            raise LibraryError(
                f"library: {path} not found; build one with python -m hmora_ds.library build "
                "--out DIR"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LibraryError(f"{path}: not valid JSON ({err}); rebuild the library") from None
        if not isinstance(data, dict) or data.get("format") != LIBRARY_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise LibraryError(f"{path}: not a LoRA library (format {got!r}, expected "
                               f"{LIBRARY_FORMAT!r})")  # fmt: skip
        if data.get("version") != LIBRARY_VERSION:
            raise LibraryError(
                f"{path}: library version {data.get('version')!r}; this hmora-ds reads version "
                f"{LIBRARY_VERSION}"
            )
        base = data.get("base_model")
        raw = data.get("entries")
        if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), dict):
            raise LibraryError(f"{path}: base_model.fingerprint missing; rebuild the library")
        if not isinstance(raw, list) or not raw:
            raise LibraryError(f"{path}: entries must be a non-empty list; rebuild the library")
        entries, seen = [], set()
        for i, e in enumerate(raw):
            if (
                not isinstance(e, dict)
                or not isinstance(e.get("task"), str)
                or not isinstance(e.get("adapter"), str)
            ):
                raise LibraryError(f"{path}: entries[{i}] needs a task and an adapter (strings)")
            if e["task"] in seen:
                raise LibraryError(f"{path}: task {e['task']!r} appears twice in entries")
            seen.add(e["task"])
            adapter = Path(e["adapter"])
            adapter = adapter if adapter.is_absolute() else root / adapter
            if not (adapter / "adapter_config.json").is_file():
                raise LibraryError(
                    f"{path}: the adapter of task {e['task']!r} ({adapter}) is missing; "
                    "rebuild that task (python -m hmora_ds.library build --tasks "
                    f"{e['task']} --out {root})"
                )
            entry = LibraryEntry(e["task"], adapter, e.get("val_loss"), e.get("steps"),
                                 e.get("seconds"))  # fmt: skip
            entries.append(entry)
        return cls(root, base.get("name_or_path"), base["fingerprint"], entries)

    def write(self) -> Path:
        """Write ``library.json`` atomically (entries in order); returns its path."""
        self.root.mkdir(parents=True, exist_ok=True)
        data = {
            "format": LIBRARY_FORMAT,
            "version": LIBRARY_VERSION,
            "base_model": {"name_or_path": self.base_name, "fingerprint": self.fingerprint},
            "entries": [e.to_json(self.root) for e in self.entries],
        }
        path = self.root / LIBRARY_NAME
        tmp = self.root / f".{LIBRARY_NAME}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
        return path


def lora_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's config, checked to be a plain LoRA (method ``lora``, one expert)."""
    from hmora_ds.adapter_io import read_adapter_config

    meta = read_adapter_config(adapter_dir)
    cfg = meta["config"]
    if cfg.get("method") != "lora" or cfg.get("adapter", {}).get("num_experts", 1) != 1:
        raise LibraryError(
            f"library: {adapter_dir} is a {cfg.get('method')!r} adapter; a library holds plain "
            "LoRAs (method=lora), one per task"
        )
    return meta


def lora_shape(adapter_dir: str | Path) -> dict[str, Any]:
    """What two LoRAs must share to be added tensor by tensor: rank, alpha, rslora, targets."""
    a = lora_config(adapter_dir)["config"]["adapter"]
    return {
        "rank": int(a["rank"]),
        "alpha": float(a["alpha"]),
        "rslora": bool(a.get("rslora", False)),
        "targets": sorted(a.get("targets", [])),
    }


def load_lora(adapter_dir: str | Path) -> dict[str, LoRASite]:
    """A plain LoRA's tensors by adapted module, e.g. ``model.layers.3.self_attn.q_proj``
    (the base model's own module path), as :class:`LoRASite` (fp32, CPU)."""
    from safetensors.torch import load_file

    from hmora_ds.adapter_io import WEIGHTS_NAME, check_adapter

    meta = lora_config(adapter_dir)
    check_adapter(adapter_dir)
    a = meta["config"]["adapter"]
    rank = int(a["rank"])
    scaling = float(a["alpha"]) / (math.sqrt(rank) if a.get("rslora") else rank)
    tensors = load_file(str(Path(adapter_dir) / WEIGHTS_NAME))
    prefix = "base_model."
    sites: dict[str, LoRASite] = {}
    for name, t in tensors.items():
        if not name.endswith(".lora_A"):
            continue
        module = name[: -len(".lora_A")]
        b = tensors.get(module + ".lora_B")
        if b is None:
            raise LibraryError(f"library: {adapter_dir} has {name} but no {module}.lora_B")
        key = module[len(prefix) :] if module.startswith(prefix) else module
        sites[key] = LoRASite(t.float(), b.float(), scaling)
    if not sites:
        raise LibraryError(f"library: {adapter_dir} holds no LoRA tensors")
    return sites


__all__ = [
    "LIBRARY_FORMAT",
    "LIBRARY_NAME",
    "Library",
    "LibraryEntry",
    "LibraryError",
    "LoRASite",
    "load_lora",
    "lora_config",
    "lora_shape",
]

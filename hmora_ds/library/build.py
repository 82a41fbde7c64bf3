"""``python -m hmora_ds.library build``: one plain LoRA per task, trained by ``launchers/train.py``.

Each task is an ordinary training run (``data.tasks=[task]``, ``output_dir=DIR/<task>``,
``--resume auto``) started through the same launchers and helpers as the ablation studies
(:mod:`hmora_ds.ablate.runner`: launcher prefix, logged subprocess with a timeout, device
slots). After every task the manifest ``DIR/library.json`` is rewritten, so an interrupted
build keeps what it finished; running the same command again skips the tasks whose adapter is
in the manifest and resumes a half-trained one from its newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hmora_ds.ablate.runner import (
    TRAIN,
    child_env,
    cuda_devices,
    device_slots,
    eta_seconds,
    last_error,
    module_command,
    on_slots,
    run_logged,
)
from hmora_ds.ablate.scales import CPU
from hmora_ds.library import LIBRARY_FORMAT, LIBRARY_NAME, Library, LibraryEntry, LibraryError
from hmora_ds.resources import DEFAULT_DS_CONFIG

logger = logging.getLogger("hmora_ds.library")

#: Run-config keys the build sets itself, and the flag that sets them instead.
OWNED = {
    "output_dir": "--out",
    "data.tasks": "--tasks",
    "data.exclude_tasks": "--exclude-tasks",
    "preset": "--preset",
}
LOGS = "logs"


class BuildError(ValueError):
    """A user error: printed as one line, exit code 2."""


@dataclass
class BuildOptions:
    """Everything one ``build`` needs (the CLI fills it; tests may build it directly).

    ``config`` + :data:`hmora_ds.ablate.scales.CPU` overrides + ``preset`` + ``sets`` make the
    run config of every task (``data.tasks`` and ``output_dir`` added per task).
    """

    out: Path
    tasks: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    preset: str = "lora_r8"
    config: Path = CPU.config
    sets: list[str] = field(default_factory=list)
    launcher: str = "deepspeed"
    nproc: int | None = None
    deepspeed: Path = DEFAULT_DS_CONFIG
    stage_timeout: float | None = None
    parallel_tasks: bool = False


@dataclass
class TaskRun:
    task: str
    index: int
    overrides: list[str]

    @property
    def key(self) -> str:
        return self.task


def overrides_for(opts: BuildOptions, task: str | None) -> list[str]:
    """The run-config overrides of one task (``task=None``: the shared part only)."""
    out = [*CPU.overrides, f"preset={opts.preset}", *opts.sets]
    if task is not None:
        out += [f"data.tasks=[{task}]", f"output_dir={opts.out / task}"]
    return out


def world_size(opts: BuildOptions) -> int:
    """Ranks per task: 1 with ``python``; ``--nproc``; else 1 per task on GPUs with
    ``--parallel-tasks``, every visible GPU without, 2 on CPU (as the ablation studies)."""
    if opts.launcher == "python":
        return 1
    if opts.nproc is not None:
        return opts.nproc
    gpus = cuda_devices()
    if gpus:
        return 1 if opts.parallel_tasks else len(gpus)
    return CPU.nproc_cpu


def _slots(opts: BuildOptions) -> list[list[str] | None]:
    # device_slots reads the launcher, the ranks per row (nproc) and the CPU default.
    view = SimpleNamespace(
        launcher=opts.launcher, nproc=world_size(opts), scale=SimpleNamespace(nproc_cpu=1)
    )
    try:
        slots = device_slots(view)
    except ValueError as err:
        raise BuildError(str(err)) from None
    return slots if opts.parallel_tasks else slots[:1]


def check_options(opts: BuildOptions) -> list[str]:
    """Every check that needs no training; returns the tasks to build, in order.

    Raises:
        BuildError: one line naming the flag and the fix.
    """
    from hmora_ds.config import parse_override
    from hmora_ds.train.config import load_run_config

    if opts.launcher not in ("deepspeed", "torchrun", "python"):
        raise BuildError(f"--launcher: must be deepspeed, torchrun or python, got {opts.launcher}")
    if opts.nproc is not None and opts.nproc < 1:
        raise BuildError(f"--nproc: must be >= 1, got {opts.nproc}")
    if opts.launcher == "python" and opts.nproc not in (None, 1):
        raise BuildError("--nproc: --launcher python runs one process; use --nproc 1 or deepspeed")
    if opts.stage_timeout is not None and opts.stage_timeout <= 0:
        raise BuildError(f"--stage-timeout: must be > 0 seconds, got {opts.stage_timeout}")
    if not Path(opts.config).is_file():
        raise BuildError(f"--config: {opts.config} does not exist; give a run config YAML")
    try:
        json.loads(Path(opts.deepspeed).read_text())
    except (OSError, ValueError) as err:
        raise BuildError(f"--deepspeed: cannot read {opts.deepspeed} as JSON ({err})") from None
    for item in opts.sets:
        try:
            key, _ = parse_override(item)
        except ValueError as err:
            raise BuildError(f"--set: {err}") from None
        if key in OWNED:
            raise BuildError(f"--set {item}: {key} is set by the build; use {OWNED[key]}")
    if opts.out.exists() and not opts.out.is_dir():
        raise BuildError(f"--out: {opts.out} is a file; give a directory")
    try:
        run = load_run_config(opts.config, overrides_for(opts, None))
        method = run.hmora_config()
    except ValueError as err:
        raise BuildError(f"--config/--set/--preset: {err}") from None
    if method.method != "lora" or method.adapter.num_experts != 1 or method.full_finetune:
        raise BuildError(
            f"--preset {opts.preset}: a library holds plain LoRAs (method lora, one expert); "
            f"this preset is method {method.method!r} with {method.adapter.num_experts} experts; "
            "use --preset lora_r8 or lora_r64"
        )
    tasks = _tasks(opts, run)
    for task in tasks:
        try:
            load_run_config(opts.config, overrides_for(opts, task))
        except ValueError as err:
            raise BuildError(f"--tasks {task}: {err}") from None
    _slots(opts)
    return tasks


def _tasks(opts: BuildOptions, run: Any) -> list[str]:
    """``--tasks`` (default: every task of the data) minus ``--exclude-tasks``."""
    if run.data.kind == "offline":
        from hmora_ds.data.offline_tasks import TASKS

        available = list(TASKS)
        where = "the offline mixture"
    else:
        from hmora_ds.data import load_records

        try:
            records = load_records(run.data.path)
        except (OSError, ValueError) as err:
            raise BuildError(f"--set data.path: {err}") from None
        available = list(dict.fromkeys(str(r.get("task_name")) for r in records))
        where = str(run.data.path)
    for flag, names in (("--tasks", opts.tasks or []), ("--exclude-tasks", opts.exclude)):
        unknown = [t for t in names if t not in available]
        if unknown:
            raise BuildError(
                f"{flag}: unknown task(s) {', '.join(unknown)} in {where}; its tasks are "
                f"{', '.join(available)}"
            )
        if len(set(names)) != len(names):
            raise BuildError(f"{flag}: a task is named twice ({', '.join(names)})")
    tasks = [t for t in (opts.tasks or available) if t not in set(opts.exclude)]
    if not tasks:
        raise BuildError("--exclude-tasks: leaves no task to build; exclude fewer tasks")
    return tasks


def previous_library(out: Path) -> Library | None:
    """The library already in ``out`` with the entries whose adapter is still there (a task
    whose adapter was deleted is built again); None when there is none."""
    path = out / LIBRARY_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BuildError(f"--out: {path} is not valid JSON ({err}); delete it to rebuild") from None
    if not isinstance(data, dict) or data.get("format") != LIBRARY_FORMAT:
        raise BuildError(f"--out: {path} is not a LoRA library manifest; choose another --out")
    base = data.get("base_model") or {}
    entries = []
    for e in data.get("entries") or []:
        adapter = out / e["adapter"]
        if (adapter / "adapter_config.json").is_file():
            entries.append(
                LibraryEntry(
                    e["task"], adapter, e.get("val_loss"), e.get("steps"), e.get("seconds")
                )
            )
        else:
            logger.warning(
                "library: the adapter of %s (%s) is gone; building it again", e["task"], adapter
            )
    return Library(out, base.get("name_or_path"), base.get("fingerprint") or {}, entries)


class _Manifest:
    """The library being built; rewritten (atomically, under a lock) after every task."""

    def __init__(self, out: Path, previous: Library | None) -> None:
        self.lock = threading.Lock()
        self.lib = previous or Library(out, None, {}, [])

    def done(self, task: str) -> bool:
        return any(e.task == task for e in self.lib.entries)

    def add(self, entry: LibraryEntry, base_name: str | None, fingerprint: dict) -> None:
        with self.lock:
            lib = self.lib
            if lib.entries and lib.fingerprint and lib.fingerprint != fingerprint:
                raise LibraryError(
                    f"task {entry.task}: trained on base {base_name!r}, but library {lib.root} "
                    f"holds LoRAs of base {lib.base_name!r} of another shape; build into "
                    "another --out"
                )
            if not lib.entries:
                lib.base_name, lib.fingerprint = base_name, dict(fingerprint)
            lib.entries = [e for e in lib.entries if e.task != entry.task] + [entry]
            try:
                lib.check_uniform()
            except LibraryError:
                lib.entries = lib.entries[:-1]
                raise
            lib.write()


def entry_of(out: Path, task: str) -> tuple[LibraryEntry, str | None, dict[str, Any]]:
    """The manifest entry of a finished task run (``DIR/<task>/summary.json``), with the base
    model's name and fingerprint from its adapter."""
    from hmora_ds.adapter_io import read_adapter_config

    run_dir = out / task
    path = run_dir / "summary.json"
    if not path.is_file():
        raise LibraryError(f"task {task}: no {path} after training")
    s = json.loads(path.read_text())
    adapter = run_dir / "adapter_best" if s.get("adapter_best") else run_dir / "adapter"
    meta = read_adapter_config(adapter)
    best = s.get("best") or {}
    val_loss = best.get("value") if best.get("metric") == "val_loss" else None
    seconds = s.get("seconds")
    entry = LibraryEntry(
        task,
        adapter,
        val_loss,
        s.get("steps"),
        None if seconds is None else round(float(seconds), 1),
    )
    base = meta["base_model"]
    return entry, base.get("name_or_path"), base["fingerprint"]


def _train(opts: BuildOptions, run: TaskRun, gpus: list[str] | None) -> None:
    cmd = module_command(opts.launcher, world_size(opts), gpus, TRAIN)
    cmd += ["--deepspeed", str(opts.deepspeed), "--config", str(opts.config)]
    cmd += ["--resume", "auto", *run.overrides]  # a half-trained task continues
    log = opts.out / LOGS / f"{run.task}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    rc = run_logged(cmd, log, child_env(gpus), opts.stage_timeout)
    if rc != 0:
        what = "timed out (--stage-timeout)" if rc == 124 else f"exit code {rc}"
        raise LibraryError(f"task {run.task}: training {what}: {last_error(log)} (log: {log})")


def build(opts: BuildOptions) -> tuple[Library, list[str]]:
    """Train every missing task's LoRA and write the manifest after each one.

    Returns:
        The library and the tasks that failed (their error is logged; the others are built).
    """
    tasks = check_options(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    manifest = _Manifest(opts.out, previous_library(opts.out))
    if manifest.lib.entries:
        try:
            held = manifest.lib.check_uniform()
        except LibraryError as err:
            raise BuildError(f"--out: {err}") from None
        ours = _preset_shape(opts)
        diff = [k for k in ("rank", "alpha", "rslora", "targets") if held[k] != ours[k]]
        if diff:
            details = ", ".join(f"{k} {held[k]} (library) vs {ours[k]} (this build)" for k in diff)
            raise BuildError(
                f"--preset/--set: {opts.out} holds LoRAs of another shape: {details}; every "
                "task's LoRA must share rank and alpha; build with the same settings or into "
                "another --out"
            )
    n = len(tasks)
    runs = [TaskRun(t, i + 1, overrides_for(opts, t)) for i, t in enumerate(tasks)]
    todo = [r for r in runs if not manifest.done(r.task)]
    for r in runs:
        if manifest.done(r.task):
            logger.info("library: task %d/%d %s: done, skipped", r.index, n, r.task)
    slots = _slots(opts)
    where = "CPU" if slots == [None] else f"device slot(s) {slots}"
    logger.info(
        "library: %d task(s), %d to train, %d rank(s) each, on %s; logs in %s",
        n,
        len(todo),
        world_size(opts),
        where,
        opts.out / LOGS,
    )
    durations: list[float] = []
    failed: list[str] = []
    waiting = {r.task for r in todo}

    def work(run: TaskRun, slot: list[str] | None) -> str | None:
        """Train one task and add it to the manifest; its error message, or None."""
        try:
            logger.info("library: task %d/%d %s: training", run.index, n, run.task)
            _train(opts, run, slot)
            entry, base_name, fp = entry_of(opts.out, run.task)
            manifest.add(entry, base_name, fp)
            return None
        except (ValueError, OSError) as err:  # LibraryError, an unreadable adapter or summary
            return str(err)

    for run, error, seconds in on_slots(todo, slots, work, desc="library", unit="task"):
        waiting.discard(run.task)
        durations.append(seconds)
        eta = eta_seconds(durations, len(waiting), len(slots))
        if error:
            failed.append(run.task)
            logger.error("library: task %d/%d %s failed: %s", run.index, n, run.task, error)
            continue
        e = next(x for x in manifest.lib.entries if x.task == run.task)
        loss = "-" if e.val_loss is None else f"{e.val_loss:.4f}"
        logger.info(
            "library: task %d/%d %s done in %.1f min (val_loss %s); %d to go, ETA %.0f min",
            run.index,
            n,
            run.task,
            seconds / 60,
            loss,
            len(waiting),
            eta / 60,
        )
    return manifest.lib, failed


def _preset_shape(opts: BuildOptions) -> dict[str, Any]:
    from hmora_ds.train.config import load_run_config

    a = load_run_config(opts.config, overrides_for(opts, None)).hmora_config().adapter
    return {
        "rank": int(a.rank),
        "alpha": float(a.alpha),
        "rslora": bool(a.rslora),
        "targets": sorted(a.targets),
    }


def table(lib: Library) -> str:
    """The manifest as a table (``python -m hmora_ds.library show DIR``)."""

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [
        (e.task, num(e.val_loss, ".4f"), num(e.steps, "d"), num(e.seconds, ".1f"), str(e.adapter))
        for e in lib.entries
    ]
    head = ("task", "val_loss", "steps", "seconds", "adapter")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: tuple[str, ...]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    try:
        shape = lib.check_uniform()
        shape_line = (
            f"LoRA rank {shape['rank']}, alpha {shape['alpha']:g}, targets "
            f"{','.join(shape['targets'])}"
        )
    except LibraryError as err:
        shape_line = f"mixed LoRA shapes: {err}"
    out = [
        f"library {lib.root}: {len(lib.entries)} LoRA(s) on base {lib.base_name}",
        shape_line,
        "",
        line(head),
        "-+-".join("-" * w for w in widths),
        *(line(r) for r in rows),
    ]
    return "\n".join(out)

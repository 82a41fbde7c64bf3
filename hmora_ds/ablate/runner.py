"""Run a study: plan every row × seed, then train, evaluate and analyse each in subprocesses.

Each stage is the repository's own entry point, run exactly as a user would run it:
``launchers/train.py`` (under ``deepspeed``, ``torchrun`` or ``python``), then
``launchers/eval.py`` on the run's best adapter, then ``python -m hmora_ds.analyze routing``.
Nothing is re-implemented here; this module only builds command lines, decides what can be
reused (:mod:`hmora_ds.ablate.rows`) and schedules rows onto devices.

Scheduling: with two or more CUDA devices, rows run concurrently, one per group of ``nproc``
devices (``CUDA_VISIBLE_DEVICES``); otherwise one after the other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hmora_ds.ablate import rows as rowio
from hmora_ds.ablate.scales import Scale
from hmora_ds.ablate.studies import (
    COMPOSITION_SHOTS,
    LIBRARY_DIR,
    Row,
    Study,
    as_overrides,
    unregistered_preset,
)
from hmora_ds.lm_head import DEFAULT_CHUNK_TOKENS
from hmora_ds.methods import library_missing
from hmora_ds.resources import DEFAULT_DS_CONFIG
from hmora_ds.train.config import RunConfig, load_run_config

logger = logging.getLogger("hmora_ds.ablate")

# The stages run the package's modules (as launchers/train.py and launchers/eval.py do), so a
# study runs from an installed package as from a checkout.
TRAIN = "hmora_ds.train"
EVAL = "hmora_ds.eval"
STUDY_JSON = "study.json"
#: Keys the runner owns: a ``--set`` of them would fight the runner.
OWNED = {"train.seed": "--seeds", "output_dir": "--out"}
#: ``--analysis-data`` value: route the evaluated benchmarks' own questions (task = benchmark).
BENCHMARK_PROMPTS = "benchmarks"
PROMPTS_FILE = "analysis_prompts.jsonl"
#: A composition study's library (``python -m hmora_ds.library build``) and LoraHub's few-shot
#: examples of its held-out task, inside the study's output directory.
LIBRARY = "library"
EXAMPLES_FILE = "lorahub_examples.jsonl"


class AblateError(ValueError):
    """A user error: printed as one line, exit code 2."""


@dataclass
class Options:
    """Everything one invocation needs (the CLI fills it; tests may build it directly)."""

    study: Study
    scale: Scale
    out: Path
    config: Path
    seeds: list[int]
    sets: list[str] = field(default_factory=list)
    rows: list[str] | None = None
    benchmarks: str = "all"
    split: str = "test"
    mode: str = "loglik"
    max_questions: int | None = None
    max_input_tokens: int = 1024
    source: str = "offline"
    local_dir: Path | None = None
    launcher: str = "deepspeed"
    nproc: int | None = None
    deepspeed: Path = DEFAULT_DS_CONFIG
    analyze: bool = False
    analysis_data: str = "mmlu"
    max_per_task: int | None = None
    stage_timeout: float | None = None
    dry_run: bool = False


@dataclass
class Job:
    """One row × seed, fully resolved.

    ``run`` is None for a row refused before its config could be resolved (a preset no
    registered method ships); ``refused`` then says why, and the row is recorded as
    ``unsupported`` instead of run.
    """

    row: Row
    seed: int
    dir: Path
    overrides: list[str]
    run: RunConfig | None
    hashes: dict[str, str | None]
    refused: str | None = None

    @property
    def unsupported(self) -> str | None:
        """Why this job is not run (None: it runs)."""
        return self.refused or self.row.unsupported

    @property
    def key(self) -> str:
        return f"{self.row.name} seed {self.seed}"


# ---------------------------------------------------------------------------- planning
def check_sets(study: Study, sets: list[str]) -> None:
    """Refuse ``--set`` keys that the grid varies or that the runner owns."""
    from hmora_ds.config import parse_override

    varied = study.varied_keys()
    for item in sets:
        try:
            key, _ = parse_override(item)
        except ValueError as err:
            raise AblateError(f"--set: {err}") from None
        if key in OWNED:
            raise AblateError(f"--set {item}: {key} is set by the runner; use {OWNED[key]}")
        if key in varied:
            raise AblateError(
                f"--set {item}: the {study.name} study varies {key} itself; "
                "pick the rows with --rows instead"
            )


def select_rows(study: Study, scale: Scale, names: list[str] | None) -> list[Row]:
    available = study.rows_for(scale.name)
    if not names:
        return available
    by_name = {r.name: r for r in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        extra = ""
        paper = [n for n in unknown if any(r.name == n for r in study.rows)]
        if paper:
            extra = f" ({', '.join(paper)}: --scale paper only)"
        raise AblateError(
            f"--rows: unknown row(s) {', '.join(unknown)} in study {study.name}{extra}; "
            f"valid: {', '.join(by_name)}"
        )
    return [r for r in available if r.name in names]  # the paper's order, not the user's


def world_size(opts: Options) -> int:
    if opts.launcher == "python":
        return 1
    if opts.nproc is not None:
        return opts.nproc
    return 1 if cuda_devices() else opts.scale.nproc_cpu


def ood_split(opts: Options, run: RunConfig):
    """The ID / OOD division of the evaluated benchmarks for ``run``'s training tasks.

    Raises:
        AblateError: the run does not train on the offline mixture (the only one whose task
            names map to benchmarks), or one side of the division is empty.
    """
    from hmora_ds.eval.benchmarks import DISPLAY, EvalError, parse_benchmarks
    from hmora_ds.eval.ood import split_benchmarks, training_tasks

    if run.data.kind != "offline":
        raise AblateError(
            f"the {opts.study.name} study maps offline task names to benchmarks; "
            f"data.kind must be offline, got {run.data.kind}"
        )
    try:
        benches = parse_benchmarks(opts.benchmarks)
    except EvalError as err:
        raise AblateError(f"--benchmarks: {err}") from None
    tasks = training_tasks(run.data)
    split = split_benchmarks(benches, tasks)
    if not split.id or not split.ood:
        names = {s: ", ".join(DISPLAY[b] for b in bs) or "none"
                 for s, bs in (("ID", split.id), ("OOD", split.ood))}  # fmt: skip
        raise AblateError(
            f"--benchmarks {opts.benchmarks}: the {opts.study.name} study needs in- and "
            f"out-of-distribution benchmarks; training on {', '.join(tasks)} gives ID: "
            f"{names['ID']}, OOD: {names['OOD']}"
        )
    return split


def _eval_overrides(opts: Options, run: RunConfig) -> list[str]:
    """Training that selects its best checkpoint on benchmarks sees the same benchmarks (in
    the ``ood`` study: the in-distribution ones only, never the held-out tasks)."""
    if run.eval.kind != "benchmarks":
        return []
    benchmarks = opts.benchmarks
    if opts.study.ood:
        benchmarks = ",".join(ood_split(opts, run).id)
    out = [
        f"eval.benchmarks={benchmarks}",
        f"eval.mode={opts.mode}",
        f"eval.source={opts.source}",
    ]
    if opts.local_dir is not None:
        out.append(f"eval.local_dir={opts.local_dir}")
    return out


def plan(opts: Options, rows: list[Row], strict: bool = True) -> list[Job]:
    """Resolve every row × seed into a validated run config and its stage hashes.

    ``strict=False`` leaves out rows whose config is invalid instead of failing (used for
    rows only shown in the table, not run now).
    """
    check_sets(opts.study, opts.sets)
    ds_json = _read_json(opts.deepspeed, "--deepspeed")
    world = world_size(opts)
    jobs = []
    for row in rows:
        for seed in opts.seeds:
            row_dir = opts.out / row.name / f"seed{seed}"
            library = str(opts.out / LIBRARY)
            overrides = [
                *shared_overrides(opts),
                *(o.replace(LIBRARY_DIR, library) for o in as_overrides(row.overrides)),
                f"train.seed={seed}",
                f"output_dir={row_dir / 'train'}",
            ]
            try:
                run = load_run_config(opts.config, overrides)
                extra = _eval_overrides(opts, run)
                if extra:
                    overrides[-2:-2] = extra
                    run = load_run_config(opts.config, overrides)
                if opts.study.ood:
                    ood_split(opts, run)
            except AblateError:
                raise
            except ValueError as err:
                reason = unregistered_preset(row)
                if reason is not None:  # refused, reported, never a crash of the study
                    digest = rowio.stable_hash(["refused", row.name, seed, reason])
                    hashes = {"train": digest, "eval": None, "analyze": None}
                    jobs.append(Job(row, seed, row_dir, overrides, None, hashes, reason))
                    continue
                if not strict:
                    break
                raise AblateError(f"row {row.name}: {err}") from None
            hashes = _hashes(opts, run, ds_json, world)
            if row.kind != "train" or any(LIBRARY_DIR in str(v) for v in row.overrides.values()):
                hashes = _composition_hashes(opts, row, seed, run, hashes, ds_json, world)
            # A method composing a LoRA library whose run names none (its shipped preset leaves
            # it to the user: --set method.options.library=DIR): listed, not run, with why.
            missing = library_missing(run.hmora_config()) if row.kind == "train" else None
            jobs.append(Job(row, seed, row_dir, overrides, run, hashes, missing))
    return jobs


def shared_overrides(opts: Options) -> list[str]:
    """The overrides every row of the invocation starts from: the scale's, the study's base,
    then ``--set``."""
    return [
        *opts.scale.overrides,
        *as_overrides(opts.study.base_for(opts.scale.name)),
        *opts.sets,
    ]


def library_hash(opts: Options, ds_json: dict, world: int) -> str:
    """What a composition study's library depends on: its tasks and the shared training
    recipe (a change rebuilds the rows that use the library)."""
    return rowio.stable_hash(
        {
            "tasks": library_tasks(opts.study),
            "overrides": shared_overrides(opts),
            "config": str(opts.config),
            "deepspeed": ds_json,
            "world_size": world,
        }
    )


def library_tasks(study: Study) -> list[str]:
    """The tasks of a composition study's library: the offline mixture's, minus the held-out."""
    from hmora_ds.data.offline_tasks import TASKS

    return [t for t in TASKS if t != study.held_out]


def _composition_hashes(opts: Options, row: Row, seed: int, run: RunConfig,
                        hashes: dict[str, str | None], ds_json: dict,
                        world: int) -> dict[str, str | None]:  # fmt: skip
    """A composition row's stage hashes: the adapter stage of a row that trains nothing
    depends on its kind and the library, a training row's on the library too."""
    lib = library_hash(opts, ds_json, world)
    if row.kind == "train":
        return {**hashes, "train": rowio.stable_hash([hashes["train"], lib])}
    what: dict[str, Any] = {"kind": row.kind, "model": run.model.__dict__}
    if row.kind == "library":
        what.update(task=row.task, library=lib)
    elif row.kind == "lorahub":
        what.update(library=lib, shots=COMPOSITION_SHOTS, seed=seed, held_out=opts.study.held_out)
    return {"train": rowio.stable_hash(what), "eval": hashes["eval"], "analyze": None}


def _read_json(path: Path, flag: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise AblateError(f"{flag} {path}: cannot read it as JSON ({err})") from None


#: Run-config keys added after rows were first run, with their defaults: at the default they
#: are left out of the training hash, so rows trained before the key existed stay reusable.
#: The ``train`` ones but ``epochs`` change how a step is computed, not what it computes (the
#: chunked loss equals the full-logits one, a compiled layer its eager self); the data keys and
#: ``train.epochs`` set to anything else change the row, and its hash.
LATER_KEYS: dict[tuple[str, str], Any] = {
    ("data", "tasks"): None,
    ("data", "exclude_tasks"): [],
    ("data", "format"): "auto",
    ("data", "columns"): None,
    ("data", "split"): "train",
    ("data", "subset"): None,
    ("data", "chat_template"): None,
    ("train", "epochs"): None,
    ("train", "ce_chunk_tokens"): DEFAULT_CHUNK_TOKENS,
    ("train", "compile"): "none",
    ("train", "compile_backend"): "inductor",
}


def _hashes(opts: Options, run: RunConfig, ds_json: dict, world: int) -> dict[str, str | None]:
    train = run.to_dict()
    train.pop("output_dir")
    train.pop("log", None)  # what a run prints and where it logs: never a different row
    for (section, key), default in LATER_KEYS.items():
        if train.get(section, {}).get(key, default) == default:
            train.get(section, {}).pop(key, None)
    train_hash = rowio.stable_hash(
        {
            "run": train,
            "method": run.hmora_config().to_dict(),  # a changed preset file changes the row
            "deepspeed": ds_json,
            "world_size": world,
        }
    )
    eval_hash = rowio.stable_hash(
        {
            "benchmarks": opts.benchmarks,
            "split": opts.split,
            "mode": opts.mode,
            "max_questions": opts.max_questions,
            "max_input_tokens": opts.max_input_tokens,
            "source": opts.source,
            "local_dir": str(opts.local_dir) if opts.local_dir else None,
        }
    )
    analyze_hash = None
    if opts.analyze and run.hmora_config().has_mixture:
        analysis: dict[str, Any] = {"data": opts.analysis_data, "max_per_task": opts.max_per_task}
        if opts.analysis_data == BENCHMARK_PROMPTS:  # the prompts are the evaluated questions
            analysis.update(benchmarks=opts.benchmarks, split=opts.split, source=opts.source,
                            local_dir=str(opts.local_dir) if opts.local_dir else None)  # fmt: skip
        if opts.study.ood:
            analysis["per_task"] = True
        analyze_hash = rowio.stable_hash(analysis)
    return {"train": train_hash, "eval": eval_hash, "analyze": analyze_hash}


def check_out_dir(out: Path, study: Study, scale: Scale, create: bool) -> None:
    """The output directory is this study's at this scale, or new; never another's."""
    marker = out / STUDY_JSON
    if marker.is_file():
        try:
            held = json.loads(marker.read_text())
        except ValueError:
            held = {}
        if held.get("study") != study.name:
            raise AblateError(
                f"--out {out} holds the {held.get('study')!r} study, not {study.name!r}; "
                "choose another --out"
            )
        if held.get("scale") != scale.name:
            raise AblateError(
                f"--out {out} holds the {study.name} study at --scale {held.get('scale')}, "
                f"not {scale.name}; choose another --out"
            )
    elif out.exists() and any(out.iterdir()):
        raise AblateError(
            f"--out {out} is not empty and holds no {STUDY_JSON}; choose a new directory"
        )
    if create:
        out.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            doc = {"study": study.name, "scale": scale.name, "title": study.title}
            marker.write_text(json.dumps(doc, indent=2) + "\n")


# ---------------------------------------------------------------------------- TP %
_TP_CACHE: dict[str, dict[str, Any] | None] = {}


def model_config_source(name_or_path: str) -> str | None:
    """Where :func:`hmora_ds.params.load_model_config` finds the base model's shape."""
    from hmora_ds.params import MODEL_CONFIGS_DIR

    path = Path(name_or_path)
    if (path / "config.json").is_file() or (path.suffix == ".json" and path.is_file()):
        return str(path)
    shipped = path.name.lower()  # Qwen/Qwen2-1.5B -> qwen2-1.5b, the shipped shape
    return shipped if (MODEL_CONFIGS_DIR / f"{shipped}.json").is_file() else None


def parameters(run: RunConfig | None) -> dict[str, Any] | None:
    """TP % and trainable count of the run's method on its base model (meta device).

    None when the base model's shape is not known without fetching it (an HF name that is not
    a shipped architecture; training then reports the real count), or without a run (a
    refused row).
    """
    if run is None:
        return None
    method = run.hmora_config()
    key = rowio.stable_hash([run.model.name_or_path, method.to_dict()])
    if key not in _TP_CACHE:
        _TP_CACHE[key] = None
        source = model_config_source(run.model.name_or_path)
        if source is not None:
            from hmora_ds.params import build_meta_model, load_model_config, parameter_report

            quiet = logging.getLogger("hmora_ds.model")
            level = quiet.level
            quiet.setLevel(logging.WARNING)  # its per-model TP line would repeat every row's
            try:
                report = parameter_report(build_meta_model(load_model_config(source), method))
                _TP_CACHE[key] = {"tp_percent": report.tp_percent, "trainable": report.trainable}
            except (ValueError, OSError) as err:
                logger.warning("TP of %s: %s", run.model.name_or_path, err)
            finally:
                quiet.setLevel(level)
    return _TP_CACHE[key]


# ---------------------------------------------------------------------------- devices
def cuda_devices() -> list[str]:
    """Visible CUDA device ids (as ``CUDA_VISIBLE_DEVICES`` names them), [] without CUDA."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    return ids[:n] if len(ids) >= n else [str(i) for i in range(n)]


def device_slots(opts: Options) -> list[list[str] | None]:
    """Groups of devices that can each run one row; [None] = one row at a time on CPU."""
    devices = cuda_devices()
    if not devices:
        return [None]
    per = world_size(opts)
    if per > len(devices):
        raise AblateError(f"--nproc {per} exceeds the {len(devices)} visible CUDA device(s)")
    return [devices[i : i + per] for i in range(0, len(devices) - per + 1, per)]


# ---------------------------------------------------------------------------- subprocesses
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def kill_children() -> None:
    """End every stage still running (each is its own process group: launcher + ranks)."""
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def run_logged(cmd: list[str], log: Path, env: dict[str, str], timeout: float | None) -> int:
    """Run one stage, its output appended to ``log``; 124 on timeout (its group killed)."""
    with log.open("a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        # A new session per stage: the launcher and its ranks can be killed as one group.
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\nablate: stage exceeded --stage-timeout {timeout:.0f}s and was killed\n")
            return 124
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)


def last_error(log: Path) -> str:
    """The most telling line of a failed stage's log (its ``error:`` line if any)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for marker in ("error:", "Error:", "Error", "ERROR"):
        hits = [ln for ln in lines if marker in ln]
        if hits:
            return hits[-1][-300:]
    return lines[-1][-300:] if lines else "no output"


def _bin(name: str) -> str:
    from hmora_ds.runtime.dist import executable

    found = executable(name)
    if not found:
        raise AblateError(f"--launcher {name}: no {name} executable next to Python or on PATH")
    return found


def launch_prefix(launcher: str, nproc: int, gpus: list[str] | None) -> list[str]:
    """The command that starts ``nproc`` ranks of a launcher script."""
    if launcher == "python":
        return [sys.executable]
    if launcher == "torchrun":
        return [_bin("torchrun"), "--standalone", "--nproc_per_node", str(nproc)]
    from hmora_ds.runtime.dist import free_port

    prefix = [_bin("deepspeed"), "--master_port", str(free_port())]
    # On GPUs the deepspeed launcher honours CUDA_VISIBLE_DEVICES only without --num_gpus.
    return prefix if gpus else [*prefix, "--num_gpus", str(nproc)]


def module_command(launcher: str, nproc: int, gpus: list[str] | None, module: str) -> list[str]:
    """The command that starts ``nproc`` ranks of ``python -m module``."""
    if launcher == "python":
        return [sys.executable, "-m", module]
    flag = "-m" if launcher == "torchrun" else "--module"
    return [*launch_prefix(launcher, nproc, gpus), flag, module]


def child_env(gpus: list[str] | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    else:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


# ---------------------------------------------------------------------------- one job
#: Which ``metrics`` keys each stage writes (kept together with the stage when it is reused).
STAGE_METRICS = {
    "eval": {"accuracy", "questions", "unavailable", "stand_in", "average", "average_over"},
    "analyze": {"routing"},
}


class StageError(RuntimeError):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage


def _record(opts: Options, job: Job, old: dict[str, Any] | None) -> dict[str, Any]:
    """The row's record at start: what it is, with the stages still valid from ``old``."""
    stages: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    if old and rowio.stage_done(old, "train", job.hashes["train"]):
        stages["train"] = old["stages"]["train"]
        for stage in ("eval", "analyze"):
            info = old["stages"].get(stage)
            # An analysis of this very adapter stays valid while analysis is switched off.
            keep = rowio.stage_done(old, stage, job.hashes[stage]) or (
                stage == "analyze" and job.hashes[stage] is None and info
            )
            if keep:
                stages[stage] = info
                metrics.update(
                    {k: v for k, v in old.get("metrics", {}).items() if k in STAGE_METRICS[stage]}
                )
    params = parameters(job.run)
    return {
        "study": opts.study.name,
        "scale": opts.scale.name,
        "row": job.row.name,
        "labels": job.row.labels,
        "seed": job.seed,
        "config": str(opts.config),
        "overrides": job.overrides,
        "row_overrides": as_overrides(job.row.overrides),
        "config_hash": job.hashes["train"],
        "hashes": job.hashes,
        "launcher": opts.launcher,
        "world_size": world_size(opts),
        "tp_percent": params["tp_percent"] if params else None,
        "trainable_parameters": params["trainable"] if params else None,
        "status": rowio.RUNNING,
        "stages": stages,
        "metrics": metrics,
        "timings": {},
    }


def run_job(opts: Options, job: Job, gpus: list[str] | None) -> tuple[dict[str, Any], bool]:
    """Bring one row × seed to done (or failed); returns (record, whether work was done)."""
    old = rowio.read_row(job.dir)
    if rowio.is_complete(old, job.hashes):
        logger.info("%s: skip: done (config %s)", job.key, job.hashes["train"])
        return old, False
    if job.unsupported:
        record = _record(opts, job, None)
        record.update(status=rowio.UNSUPPORTED, error=job.unsupported)
        rowio.write_row(job.dir, record)
        logger.warning("%s: not run: %s", job.key, job.unsupported)
        return record, False
    changed = old is None or old.get("config_hash") != job.hashes["train"]
    if changed and job.dir.exists():  # another config's checkpoints must never be resumed
        logger.info("%s: configuration changed, starting the row over", job.key)
        shutil.rmtree(job.dir)
    record = _record(opts, job, old)
    rowio.write_row(job.dir, record)
    start = time.time()
    try:
        first = {"train": _train, "base": _no_adapter, "library": _library_adapter,
                 "lorahub": _lorahub}[job.row.kind]  # fmt: skip
        for stage, fn in (("train", first), ("eval", _evaluate), ("analyze", _analyze)):
            if job.hashes[stage] is None or stage in record["stages"]:
                continue
            logger.info("%s: %s", job.key, stage)
            t0 = time.time()
            info = fn(opts, job, record, gpus)
            info.update(hash=job.hashes[stage], seconds=round(time.time() - t0, 1))
            record["stages"][stage] = info
            rowio.write_row(job.dir, record)
    except StageError as err:
        record.update(status=rowio.FAILED, failed_stage=err.stage, error=str(err))
        logger.error("%s: failed: %s", job.key, err)
    else:
        record.update(status=rowio.DONE, error=None, failed_stage=None)
    record["timings"] = {
        **{f"{s}_s": info.get("seconds") for s, info in record["stages"].items()},
        "total_s": round(time.time() - start, 1),
    }
    rowio.write_row(job.dir, record)
    return record, True


def _check(rc: int, stage: str, log: Path) -> None:
    if rc != 0:
        raise StageError(stage, f"exit code {rc}: {last_error(log)} (log: {log})")


def _train(opts: Options, job: Job, record: dict, gpus: list[str] | None) -> dict[str, Any]:
    world = world_size(opts)
    cmd = module_command(opts.launcher, world, gpus, TRAIN)
    cmd += ["--deepspeed", str(opts.deepspeed), "--config", str(opts.config)]
    # A row that crashed half-way continues from its last checkpoint (same config hash).
    cmd += ["--resume", "auto", *job.overrides]
    log = job.dir / "train.log"
    _check(run_logged(cmd, log, child_env(gpus), opts.stage_timeout), "train", log)
    summary_path = job.dir / "train" / "summary.json"
    if not summary_path.is_file():
        raise StageError("train", f"no {summary_path} after training (log: {log})")
    s = json.loads(summary_path.read_text())
    adapter = s.get("adapter_best") or s.get("adapter")
    model = s.get("model_best") or s.get("model")  # a full fine-tune's whole model
    record["tp_percent"] = s["tp_percent"]  # the real model's count wins over the meta one
    record["trainable_parameters"] = s["trainable_parameters"]
    return {
        "steps": s["steps"],
        "stop_reason": s["stop_reason"],
        "best": s["best"],
        "lm_loss_first": s["lm_loss_first"],
        "lm_loss_last": s["lm_loss_last"],
        "tokens_per_s": s["tokens_per_s"],
        "train_seconds": s["seconds"],
        "adapter": str(Path(adapter).resolve()) if adapter else None,
        **({"model": str(Path(model).resolve())} if model else {}),
    }


def _no_adapter(opts: Options, job: Job, record: dict, gpus: list[str] | None) -> dict[str, Any]:
    """A ``base`` row: nothing to make; the base model is evaluated."""
    record["tp_percent"], record["trainable_parameters"] = 0.0, 0
    return {"adapter": None}


def _library_adapter(opts: Options, job: Job, record: dict,
                     gpus: list[str] | None) -> dict[str, Any]:  # fmt: skip
    """A ``library`` row: the library's LoRA of the row's task, evaluated as it is."""
    from hmora_ds.library import Library, LibraryError

    try:
        entry = Library.load(opts.out / LIBRARY).entry(job.row.task)
    except LibraryError as err:
        raise StageError("library", str(err)) from None
    _adapter_tp(record, entry.adapter)
    return {"adapter": str(entry.adapter.resolve()), "val_loss": entry.val_loss}


def _adapter_tp(record: dict, adapter: Path) -> None:
    """The trainable share an adapter directory's run reported (its ``summary.json`` two levels
    up: ``<run>/adapter_best``), when there is one."""
    summary = adapter.parent / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        record["tp_percent"] = s.get("tp_percent")
        record["trainable_parameters"] = s.get("trainable_parameters")


def _lorahub(opts: Options, job: Job, record: dict, gpus: list[str] | None) -> dict[str, Any]:
    """A ``lorahub`` row: LoraHub's gradient-free composition of the library's LoRAs on the
    study's few-shot examples of the held-out task (``python -m hmora_ds.library lorahub``)."""
    world = world_size(opts)
    m = job.run.model
    out = job.dir / "lorahub"
    cmd = [*module_command(opts.launcher, world, gpus, "hmora_ds.library"), "lorahub"]
    cmd += ["--library", str(opts.out / LIBRARY), "--examples", str(opts.out / EXAMPLES_FILE)]
    cmd += ["--model", m.name_or_path, "--seed", str(job.seed), "--out", str(out)]
    if m.gguf_file:
        cmd += ["--gguf-file", m.gguf_file]
    if m.tokenizer:
        cmd += ["--tokenizer", m.tokenizer]
    cmd += ["--dtype", m.dtype, "--attn-implementation", m.attn_implementation]
    cmd += ["--max-input-tokens", str(job.run.data.max_input_tokens)]
    cmd += ["--max-output-tokens", str(job.run.data.max_output_tokens)]
    log = job.dir / "lorahub.log"
    _check(run_logged(cmd, log, child_env(gpus), opts.stage_timeout), "lorahub", log)
    info = json.loads((out / "lorahub.json").read_text())
    record["tp_percent"], record["trainable_parameters"] = None, None
    return {"adapter": str(out.resolve()), "lorahub": info}


def prepare_composition(opts: Options, jobs: list[Job]) -> None:
    """Before a composition study's rows: build its library (resumable: ``python -m
    hmora_ds.library build`` skips the tasks already built) and write LoraHub's few-shot
    examples of the held-out task. Nothing happens when no pending row needs them."""
    study = opts.study
    pending = [j for j in jobs if not j.unsupported
               and not rowio.is_complete(rowio.read_row(j.dir), j.hashes)]  # fmt: skip
    needs = [j for j in pending if j.row.kind in ("library", "lorahub")
             or any(LIBRARY_DIR in str(v) for v in j.row.overrides.values())]  # fmt: skip
    if not study.held_out or not needs:
        return
    world = world_size(opts)
    lib = opts.out / LIBRARY
    cmd = [sys.executable, "-m", "hmora_ds.library", "build", "--tasks",
           ",".join(library_tasks(study)), "--out", str(lib), "--config", str(opts.config),
           "--launcher", opts.launcher, "--nproc", str(world), "--deepspeed",
           str(opts.deepspeed)]  # fmt: skip
    for item in shared_overrides(opts):
        cmd += ["--set", item]
    if opts.stage_timeout is not None:
        cmd += ["--stage-timeout", str(opts.stage_timeout)]
    log = opts.out / "library.log"
    logger.info("composition: building the library of %s (log: %s)",
                ", ".join(library_tasks(study)), log)  # fmt: skip
    if run_logged(cmd, log, child_env(None), None) != 0:
        raise AblateError(f"building the library failed: {last_error(log)} (log: {log})")
    if any(j.row.kind == "lorahub" for j in needs):
        write_examples(opts, needs[0].run)


def write_examples(opts: Options, run: RunConfig) -> Path:
    """``<out>/lorahub_examples.jsonl``: the first :data:`COMPOSITION_SHOTS` training records
    of the held-out task (records of its training split: never an evaluated question)."""
    import dataclasses

    from hmora_ds.data.records import write_jsonl
    from hmora_ds.train.data import split_records

    held = opts.study.held_out
    only = dataclasses.replace(run, data=dataclasses.replace(run.data, tasks=[held],
                                                             exclude_tasks=[]))  # fmt: skip
    train, _ = split_records(only)
    path = opts.out / EXAMPLES_FILE
    write_jsonl(path, train[:COMPOSITION_SHOTS])
    return path


def _evaluate(opts: Options, job: Job, record: dict, gpus: list[str] | None) -> dict[str, Any]:
    world = world_size(opts)
    m = job.run.model
    out = job.dir / "eval"
    # A full fine-tune is evaluated as a model of its own (no adapter).
    model = record["stages"]["train"].get("model") or m.name_or_path
    cmd = [*module_command(opts.launcher, world, gpus, EVAL), "--model", model]
    adapter = record["stages"]["train"].get("adapter")
    if adapter:  # None: the base model itself (a composition study's ``base`` row)
        cmd += ["--adapter", adapter]
    if m.gguf_file and model == m.name_or_path:
        cmd += ["--gguf-file", m.gguf_file]
    if m.tokenizer:
        cmd += ["--tokenizer", m.tokenizer]
    cmd += ["--benchmarks", opts.benchmarks, "--split", opts.split, "--mode", opts.mode]
    cmd += ["--source", opts.source, "--max-input-tokens", str(opts.max_input_tokens)]
    cmd += ["--dtype", m.dtype, "--attn-implementation", m.attn_implementation]
    if opts.local_dir is not None:
        cmd += ["--local-dir", str(opts.local_dir)]
    if opts.max_questions is not None:
        cmd += ["--max-questions", str(opts.max_questions)]
    cmd += ["--output-dir", str(out)]
    log = job.dir / "eval.log"
    _check(run_logged(cmd, log, child_env(gpus), opts.stage_timeout), "eval", log)
    doc = json.loads((out / "results.json").read_text())
    ok = {b: r for b, r in doc["benchmarks"].items() if r.get("status") == "ok"}
    record["metrics"]["accuracy"] = {b: r["accuracy"] for b, r in ok.items()}
    record["metrics"]["questions"] = {b: r["num_questions"] for b, r in ok.items()}
    record["metrics"]["unavailable"] = sorted(set(doc["benchmarks"]) - set(ok))
    record["metrics"]["stand_in"] = {b: r["stand_in"] for b, r in ok.items() if r.get("stand_in")}
    record["metrics"]["average"] = doc["average"]["value"]
    record["metrics"]["average_over"] = doc["average"]["over"]
    return {"results": str(out / "results.json")}


def benchmark_prompts(opts: Options) -> Path:
    """``<out>/analysis_prompts.jsonl``: the first ``max_per_task`` evaluated questions of
    every benchmark (the same subsets, in the same order, as the evaluation), task = the
    benchmark's name. Written once per study directory (rewritten when the settings change)."""
    from hmora_ds.eval.suite import SuiteConfig, prepare_suite

    path = opts.out / PROMPTS_FILE
    settings = [opts.benchmarks, opts.split, opts.source, str(opts.local_dir), opts.max_per_task]
    stamp = opts.out / f".{PROMPTS_FILE}.settings"
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return path
    suite = SuiteConfig(benchmarks=[opts.benchmarks], split=opts.split, source=opts.source,
                        local_dir=opts.local_dir, max_questions=opts.max_per_task)  # fmt: skip
    lines = []
    for bench, p in prepare_suite(suite).items():
        for q in p.questions:
            lines.append(json.dumps({"task": bench, "id": q.id, "question": q.question,
                                     "options": list(q.options)}))  # fmt: skip
    if not lines:
        raise StageError("analyze", f"no benchmark of --benchmarks {opts.benchmarks} has questions")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    stamp.write_text(json.dumps(settings))
    return path


def _analyze(opts: Options, job: Job, record: dict, gpus: list[str] | None) -> dict[str, Any]:
    m = job.run.model
    out = job.dir / "analysis"
    data = opts.analysis_data
    if data == BENCHMARK_PROMPTS:
        data = str(benchmark_prompts(opts))
    cmd = [sys.executable, "-m", "hmora_ds.analyze", "routing", "--model", m.name_or_path]
    cmd += ["--adapter", record["stages"]["train"]["adapter"], "--data", data]
    cmd += ["--out", str(out)]
    if opts.max_per_task is not None:
        cmd += ["--max-per-task", str(opts.max_per_task)]
    if opts.study.ood:  # routing of each ID and OOD task on its own
        cmd.append("--per-task")
    log = job.dir / "analyze.log"
    _check(run_logged(cmd, log, child_env(gpus), opts.stage_timeout), "analyze", log)
    path = out / "routing.json"
    try:
        summary = json.loads(path.read_text())["summary"]
    except (OSError, ValueError, KeyError) as err:
        raise StageError("analyze", f"{path}: no summary ({err})") from None
    record["metrics"]["routing"] = summary
    return {"routing": str(path)}


# ---------------------------------------------------------------------------- the study
def prepare_assets(opts: Options, jobs: list[Job]) -> None:
    """Fetch the model and build the data once, before concurrent rows would race on them."""
    done: set[str] = set()
    for job in jobs:
        if job.run is None:
            continue
        key = rowio.stable_hash([job.run.model.name_or_path, job.run.data.__dict__])
        if key in done:
            continue
        done.add(key)
        cmd = [sys.executable, "-m", "hmora_ds.train.prepare", "--config", str(opts.config)]
        log = opts.out / "prepare.log"
        rc = run_logged([*cmd, *job.overrides], log, child_env(None), opts.stage_timeout)
        if rc != 0:
            raise AblateError(f"preparing model and data failed: {last_error(log)} (log: {log})")


def on_slots(items: list, slots: list, work, *, desc: str, unit: str, total: int | None = None):
    """Run ``work(item, slot)`` for every item, one item per device slot at a time (threads:
    the work is a subprocess), and yield ``(item, result, seconds)`` as each finishes, with a
    progress bar (on a terminal) of ``total`` (default: the items). On any exception, Ctrl-C
    included, the items not started are cancelled and every launched process is killed."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    free: queue.Queue = queue.Queue()
    for slot in slots:
        free.put(slot)

    def run(item):
        slot = free.get()
        t0 = time.time()
        try:
            return item, work(item, slot), time.time() - t0
        finally:
            free.put(slot)

    with (
        logging_redirect_tqdm(),
        # disable=None: a bar on a terminal; in a log file the callers' ETA lines say it all.
        tqdm(total=len(items) if total is None else total, desc=desc, unit=unit,
             disable=None) as bar,
        ThreadPoolExecutor(max_workers=len(slots)) as pool,
    ):  # fmt: skip
        futures = [pool.submit(run, item) for item in items]
        try:
            for fut in as_completed(futures):
                bar.update(1)
                yield fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            kill_children()
            raise


def eta_seconds(durations: list[float], left: int, slots: int) -> float:
    """Seconds until ``left`` more items finish, at the mean of ``durations``, over ``slots``."""
    return sum(durations) / len(durations) * left / slots if durations else 0.0


def execute(opts: Options, jobs: list[Job]) -> list[dict[str, Any]]:
    """Run every job (concurrently over device slots when there are several)."""

    slots = device_slots(opts)
    pending = [j for j in jobs if not rowio.is_complete(rowio.read_row(j.dir), j.hashes)]
    if len(slots) > 1 and pending:
        prepare_assets(opts, pending)
    durations: list[float] = []
    records: list[dict[str, Any]] = []
    waiting = {id(j) for j in pending}
    where = "CPU" if slots == [None] else f"{len(slots)} device slot(s) {slots}"
    logger.info(
        "study %s: %d row(s) x %d seed(s) = %d job(s), %d to run, on %s",
        opts.study.name,
        len({j.row.name for j in jobs}),
        len(opts.seeds),
        len(jobs),
        len(waiting),
        where,
    )
    done = on_slots(jobs, slots, lambda job, slot: run_job(opts, job, slot),
                    desc=opts.study.name, unit="row")  # fmt: skip
    for job, (record, worked), seconds in done:
        records.append(record)
        waiting.discard(id(job))
        if not worked:
            continue
        durations.append(seconds)  # the ETA counts the rows that ran (skips take no time)
        logger.info(
            "%s: %s in %.1f min; %d to go, ETA %.0f min",
            job.key,
            record["status"],
            seconds / 60,
            len(waiting),
            eta_seconds(durations, len(waiting), len(slots)) / 60,
        )
    return records

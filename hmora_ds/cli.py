"""The ``hmora-ds`` command: one entry point, a subcommand per tool.

    hmora-ds train --config default [--nproc 2] [key=value …]
    hmora-ds eval --model smollm2-135m-instruct --adapter runs/default/adapter_best …
    hmora-ds params --model-config qwen2-1.5b --preset hmora_lw
    hmora-ds plan --preset paper_qwen2_1.5b --gpus 1 --gpu-mem 48

Each subcommand is the module's own command line (``hmora-ds train`` is
``python -m hmora_ds.train`` is ``launchers/train.py``), so every flag is documented once, in
that module. This file holds what they share: the help formatter (defaults shown, no
reStructuredText markup) and how a command names itself in ``--help`` and errors.

This module imports nothing heavy: ``hmora-ds --help`` answers without loading torch.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import re
import sys
from pathlib import Path

# subcommand -> (module whose main(argv) runs it, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("hmora_ds.train.cli", "fine-tune a model (one process, or --nproc N ranks)"),
    "eval": ("hmora_ds.eval.cli", "evaluate a base model or an adapter on the benchmarks"),
    "export": ("hmora_ds.export", "export a checkpoint's adapter (or PEFT / merged model)"),
    "chat": ("hmora_ds.chat", "talk to a model + adapter in the terminal (streaming)"),
    "generate": ("hmora_ds.generate", "batch generation: JSONL prompts in, JSONL answers out"),
    "params": ("hmora_ds.params", "trainable parameters and TP % of a method on an architecture"),
    "plan": ("hmora_ds.plan", "memory plan: which ZeRO stage and batch fit your GPUs"),
    "data": ("hmora_ds.data.__main__", "build or inspect training data"),
    "analyze": ("hmora_ds.analyze", "routing and task-representation analyses of a run"),
    "ablate": ("hmora_ds.ablate.cli", "run the paper's ablation and comparison studies"),
    "bench": ("hmora_ds.bench.__main__", "step-time, memory and expert-parallel benchmarks"),
    "lm-eval": ("hmora_ds.lm_eval_model", "lm-evaluation-harness with the hmora model class"),
    "library": ("hmora_ds.library.cli", "build, show and compose a library of LoRAs"),
    "compare": ("hmora_ds.eval.compare", "paired comparison of two evaluations"),
}

# Set by the dispatcher: how the running command was invoked ("hmora-ds train").
_invoked_as: str | None = None


def prog_name(module: str, script: str | None = None) -> str:
    """How the running command names itself in ``--help`` and errors.

    ``hmora-ds <cmd>`` under the dispatcher; the launcher script (``launchers/train.py``) when
    that is what ran; ``python -m <module>`` otherwise (also under ``deepspeed --module``).
    """
    if _invoked_as:
        return _invoked_as
    if script and Path(sys.argv[0]).name == Path(script).name:
        return script
    return f"python -m {module}"


_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def plain(text: str) -> str:
    """``text`` with reStructuredText markup removed (``code``, :func:`x` → code, x)."""
    return _ROLE.sub(r"\1", text).replace("``", "")


def _meaningful(default: object) -> bool:
    """Whether a default is worth printing (not None / False / empty / suppressed)."""
    if default in (None, False, argparse.SUPPRESS):
        return False
    return not (isinstance(default, (list, tuple, dict, str)) and not default)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (where it has a meaningful one), without rST markup."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain(action.help or "")
        shown = _meaningful(action.default)
        optional = action.option_strings or action.nargs in ("?", "*")
        if shown and optional and "default" not in text.lower():
            text = f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return text

    def _format_action(self, action: argparse.Action) -> str:
        # argparse prints no help line (so no default) for an option without help text.
        if not (action.help and action.help.strip()) and _meaningful(action.default):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter`; subparsers inherit it."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _top_parser() -> Parser:
    lines = [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    return Parser(
        prog="hmora-ds",
        description="Fine-tune LLMs with mixtures of LoRA experts (HMoRA and peers) on "
        "DeepSpeed.\n\ncommands:\n" + "\n".join(lines) + "\n\n"
        "'hmora-ds <command> --help' describes a command. Run configs and DeepSpeed configs "
        "ship with the package: --config default, --deepspeed zero3 (or a path).",
    )


def _launch(argv: list[str]) -> int:
    """``hmora-ds train --nproc N …``: start N ranks of ``python -m hmora_ds.train``.

    Uses the ``deepspeed`` launcher next to this Python (GPUs when there are any, else CPU
    ranks with gloo), so the ranks see exactly the remaining arguments.
    """
    import subprocess

    from hmora_ds.runtime.dist import executable, free_port, on_cpu

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--nproc", type=int)
    known, rest = p.parse_known_args(argv)
    if known.nproc is None or known.nproc < 1:
        print("error: --nproc: give a number of ranks >= 1", file=sys.stderr)
        return 2
    launcher = executable("deepspeed")
    if not launcher:
        print("error: --nproc needs the deepspeed launcher on PATH", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if on_cpu():
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    cmd = [launcher, "--num_gpus", str(known.nproc), "--master_port", str(free_port())]
    cmd += ["--module", "hmora_ds.train", *rest]
    return subprocess.call(cmd, env=env)


def configure_logging() -> None:
    """Warnings and errors of a command-line run, one line each (a command that sets up its
    own logging, as ``train`` does, replaces this). Not done by the commands' ``main``
    functions, so that calling one from Python leaves the caller's logging alone."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """``hmora-ds <command> [args]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"hmora-ds {version('hmora-ds')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"error: unknown command {command!r}; commands: {names}", file=sys.stderr)
        return 2
    if command == "train" and any(a == "--nproc" or a.startswith("--nproc=") for a in rest):
        return _launch(rest)
    # Set on the imported module: under ``python -m hmora_ds.cli`` this file is __main__.
    importlib.import_module("hmora_ds.cli")._invoked_as = f"hmora-ds {command}"
    configure_logging()
    module = importlib.import_module(COMMANDS[command][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Generate ``docs/config.md``: every run-config key with its type, default and help.

    python -m hmora_ds.config_doc > docs/config.md   # or: --write
    python -m hmora_ds.config_doc --check            # exit 1 if stale or a field lacks help

The keys are found by walking :class:`~hmora_ds.train.config.RunConfig` with
:func:`dataclasses.fields`: a field whose ``default_factory`` is a dataclass is a nested section
(``train``, ``method.routing``), and a dict field whose metadata ``keys_of`` names a dataclass
holds dotted keys of that dataclass (``method``: :class:`~hmora_ds.config.HMoRAConfig`). Help
comes from the ``Attributes:`` section of each dataclass's docstring (``name: text``, several
names as ``a, b: text`` or ``a / b: text``, continuation lines indented deeper); a section's
intro is its entry in the parent's ``Attributes:``, else the first paragraph of its own
docstring. New fields and sections appear when the file is regenerated; :func:`missing_help`
lists the ones without help (the test suite fails on them).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmora_ds.cli import Parser, prog_name

REPO = Path(__file__).resolve().parents[1]
DOC_PATH = REPO / "docs" / "config.md"
COMMAND = "python -m hmora_ds.config_doc --write"

_ENTRY = re.compile(r"^(?P<names>\w+(?:\s*[,/]\s*\w+)*)\s*:(?:\s+(?P<text>.*))?$")


@dataclass(frozen=True)
class Key:
    """One leaf of the run config."""

    key: str
    type: str
    default: Any
    help: str


@dataclass(frozen=True)
class Section:
    """One dataclass in the tree: its dotted prefix (``""`` at the top), intro and leaf keys."""

    prefix: str
    cls: type
    intro: str
    keys: tuple[Key, ...]


def _own_docstring(cls: type) -> str:
    """The class's docstring, or "" where ``@dataclass`` made one up from the signature."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return inspect.cleandoc(doc)


def summary(cls: type) -> str:
    """The first paragraph of the class docstring, on one line."""
    paragraph = _own_docstring(cls).split("\n\n")[0]
    return " ".join(paragraph.split())


def attribute_docs(cls: type) -> dict[str, str]:
    """``{field name: help}`` from the ``Attributes:`` section of the class docstring."""
    lines = _own_docstring(cls).splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes:")
    except StopIteration:
        return {}
    header = len(lines[start]) - len(lines[start].lstrip())
    docs: dict[str, list[str]] = {}
    current: list[str] = []
    entry_indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= header:
            break  # the next section
        if entry_indent is None:
            entry_indent = indent
        match = _ENTRY.match(line.strip()) if indent == entry_indent else None
        if match:
            current = [match.group("text") or ""]
            for name in re.split(r"\s*[,/]\s*", match.group("names")):
                docs[name] = current  # shared by every name of the entry
        elif indent > entry_indent:
            current.append(line.strip())
    return {name: " ".join(" ".join(parts).split()) for name, parts in docs.items()}


def _nested(f: dataclasses.Field) -> type | None:
    """The dataclass a field holds the keys of, if it is a section."""
    if dataclasses.is_dataclass(f.default_factory):
        return f.default_factory  # type: ignore[return-value]
    keys_of = f.metadata.get("keys_of")
    return keys_of if dataclasses.is_dataclass(keys_of) else None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _type_name(f: dataclasses.Field) -> str:
    kind = f.type
    return kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


def sections(root: type, prefix: str = "", intro: str | None = None) -> list[Section]:
    """``root`` and every nested section below it, depth first in field order."""
    docs = attribute_docs(root)
    keys, below = [], []
    for f in dataclasses.fields(root):
        child = _nested(f)
        if child is not None:
            below += sections(child, f"{prefix}{f.name}.", docs.get(f.name) or summary(child))
        else:
            keys.append(Key(prefix + f.name, _type_name(f), _default(f), docs.get(f.name, "")))
    head = Section(prefix.rstrip("."), root, intro if intro is not None else summary(root), ())
    return [dataclasses.replace(head, keys=tuple(keys)), *below]


def missing_help(root: type) -> list[str]:
    """Dotted keys without a docstring entry, and sections without any description."""
    out = []
    for sec in sections(root):
        if not sec.intro:
            out.append(f"{sec.prefix or root.__name__} (section: no docstring)")
        out += [k.key for k in sec.keys if not k.help]
    return out


# ----------------------------------------------------------------------------- rendering
def format_value(value: Any) -> str:
    """A value as it is written on the command line (YAML)."""
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _markdown(text: str) -> str:
    """Docstring markup (``code``, :func:`x`) as Markdown, safe inside a table cell."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`").replace("|", "\\|")


def _cell(value: str) -> str:
    return "`" + value.replace("|", "\\|") + "`"


INTRO = """\
# Run-config keys

<!-- Generated by `{command}` from the dataclasses' docstrings; do not edit by hand. -->

A run is configured by a YAML file (`configs/*.yaml`, `--config` / `--preset`) plus dotted
`key=value` overrides on the command line. This page lists every key: its type, its default
(what a key left out of the YAML file gets) and what it does. The same dotted keys work in
every tool:

- `launchers/train.py` (under `deepspeed`, `torchrun` or `python`): every key below;
- `python -m hmora_ds.plan --preset <run config>`: every key below;
- `python -m hmora_ds.ablate <study> --set …`: every key below but those the study varies,
  `train.seed` (set by `--seeds`) and `output_dir` (by `--out`);
- `python -m hmora_ds.params --preset <method preset>`: the `method.*` keys, with or without
  the `method.` prefix (`method.routing.eps=2` or `routing.eps=2`).

```bash
deepspeed launchers/train.py --deepspeed ds_configs/zero2.json --config configs/default.yaml \\
    train.lr=1e-4 train.max_steps=300 method.routing.eps=2 method.adapter.rank=16
python -m hmora_ds.plan --preset paper_qwen2_1.5b method.adapter.num_experts=16
python -m hmora_ds.ablate routing --set train.max_steps=100 method.adapter.rank=4
python -m hmora_ds.params --model-config qwen2-1.5b --preset hmora_lw method.adapter.num_experts=16
```

Values are read as YAML: `true` / `false`, `null`, numbers (`2e-5` too), lists as `[q,v]`. A
key that does not exist, or one a tool cannot use (`train.lr` given to `hmora_ds.params`),
stops the tool with a one-line error naming it (exit code 2); so does an invalid value, naming
the field.

The `method.*` keys refine the method preset named by `preset`: the preset file
(`hmora_ds/presets/<name>.yaml`) sets them first, so their table shows the dataclass default
and the value with the default preset `{preset}`. In a run-config YAML, `method` is a mapping
of the same keys without the prefix:

```yaml
preset: hmora
method:
  loss.gamma_c: 0.8
  adapter.eta_b: 4.0
```
"""


def render(root: type | None = None) -> str:
    """The whole reference as Markdown (deterministic: field order, no timestamps)."""
    from hmora_ds.config import load_config
    from hmora_ds.train.config import RunConfig

    root = root or RunConfig
    preset = RunConfig().preset
    resolved = {"method": load_config(preset).to_dict()}
    out = [INTRO.format(command=COMMAND, preset=preset)]
    for sec in sections(root):
        if not sec.keys:
            continue
        title = f"`{sec.prefix}`" if sec.prefix else "Top level"
        intro = _markdown(sec.intro)
        out += ["", f"## {title}", "", intro[:1].upper() + intro[1:], ""]
        top = sec.prefix.split(".")[0]
        with_preset = top in resolved and sec.prefix != ""
        if with_preset:
            out += [
                f"| key | type | default | with `preset: {preset}` | help |",
                "| --- | --- | --- | --- | --- |",
            ]
        else:
            out += ["| key | type | default | help |", "| --- | --- | --- | --- |"]
        for k in sec.keys:
            cells = [_cell(k.key), _cell(k.type), _cell(format_value(k.default))]
            if with_preset:
                node: Any = resolved
                for part in k.key.split("."):
                    node = node[part]
                cells.append(_cell(format_value(node)))
            cells.append(_markdown(k.help))
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog=prog_name("hmora_ds.config_doc"),
        description="Print the reference of every run-config key (docs/config.md).",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {DOC_PATH.relative_to(REPO)}")
    mode.add_argument(
        "--check", action="store_true", help="exit 1 if the file is stale or a field lacks help"
    )
    args = p.parse_args(argv)
    from hmora_ds.train.config import RunConfig

    missing = missing_help(RunConfig)
    if missing:
        print(
            f"error: no help for {', '.join(missing)}: add an entry to the dataclass "
            "docstring's Attributes: section",
            file=sys.stderr,
        )
        return 1
    text = render()
    if args.write:
        DOC_PATH.write_text(text)
        print(f"wrote {DOC_PATH}")
    elif args.check:
        if not DOC_PATH.is_file() or DOC_PATH.read_text() != text:
            print(f"error: {DOC_PATH} is stale; regenerate it with {COMMAND}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real P3 prompt templates read from the promptsource sdist, without installing it.

``promptsource/templates/<dataset>/<subset>/templates.yaml`` files are parsed with a
*safe* YAML loader (the ``!Template`` / ``!TemplateMetadata`` tags become plain dicts) and
rendered with a sandboxed jinja2 environment that reproduces promptsource's
``Template.apply``: the ``zip`` global, the ``choice`` / ``most_frequent`` filters,
``answer_choices`` rendered first and split on ``|||``, every variable truncated to 2048
characters, and the output split on ``|||`` into (prompt, target). The ``choice`` filter
draws from a seeded RNG passed per call, so rendering is deterministic.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Template, meta
from jinja2.sandbox import SandboxedEnvironment

# promptsource/templates.py: TEXT_VAR_LENGTH and the "|||" separator.
TEXT_VAR_LENGTH = 2048
SEPARATOR = "|||"
_PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"
# Leftover template syntax in a rendered string means a rendering bug.
LEFTOVER_JINJA = re.compile(r"\{\{|\}\}|\{%|%\}|\{#|#\}")


class _TemplateLoader(yaml.SafeLoader):
    """SafeLoader that reads promptsource's custom tags as plain mappings."""


def _as_mapping(loader: yaml.SafeLoader, node: yaml.Node) -> dict:
    return loader.construct_mapping(node, deep=True)


_TemplateLoader.add_constructor("!Template", _as_mapping)
_TemplateLoader.add_constructor("!TemplateMetadata", _as_mapping)


@dataclass(frozen=True)
class P3Template:
    """One promptsource template.

    Attributes:
        id: The template's UUID.
        name: Human-readable name (recorded per record as ``template``).
        jinja: The prompt/target template (``prompt ||| target``).
        answer_choices: Jinja expression for the answer choices, or ``None``.
        original_task: Whether the template poses the dataset's original task.
        variables: Example fields the template (and its answer choices) reads.
    """

    id: str
    name: str
    jinja: str
    answer_choices: str | None
    original_task: bool
    variables: frozenset[str]


class _Rng:
    """Holds the RNG the ``choice`` filter draws from; set before each render."""

    rng = random.Random(0)


def _env() -> SandboxedEnvironment:
    env = SandboxedEnvironment()
    env.globals["zip"] = zip
    env.filters["choice"] = lambda seq: _Rng.rng.choice(seq)
    env.filters["most_frequent"] = _most_frequent
    env.filters["highlight"] = lambda s: s
    return env


def _most_frequent(items: list) -> list | None:
    if not items:
        return None
    counts = Counter(items).most_common()
    return [c for c, n in counts if n == counts[0][1]]


_PARSE_ENV = _env()


def load_templates(path: Path) -> list[P3Template]:
    """Parse one ``templates.yaml`` safely.

    Args:
        path: The YAML file.

    Returns:
        Its templates, in file order.
    """
    with open(path, encoding="utf-8") as f:
        doc = yaml.load(f, Loader=_TemplateLoader)  # a SafeLoader subclass
    out = []
    for tid, t in (doc.get("templates") or {}).items():
        names = meta.find_undeclared_variables(_PARSE_ENV.parse(t["jinja"]))
        if t.get("answer_choices"):
            names |= meta.find_undeclared_variables(_PARSE_ENV.parse(t["answer_choices"]))
        names -= {"answer_choices", "zip"}
        out.append(
            P3Template(
                id=str(t.get("id", tid)),
                name=str(t["name"]),
                jinja=t["jinja"],
                answer_choices=t.get("answer_choices"),
                original_task=bool((t.get("metadata") or {}).get("original_task")),
                variables=frozenset(names),
            )
        )
    return out


def templates_dir(promptsource_root: Path) -> Path:
    """``<sdist root>/promptsource/templates``."""
    return Path(promptsource_root) / "promptsource" / "templates"


def select_templates(
    templates: list[P3Template], available: set[str], max_templates: int | None = None
) -> list[P3Template]:
    """Templates that pose the original task and read only fields we have.

    Args:
        templates: Parsed templates of one dataset.
        available: Field names our reconstructed examples carry.
        max_templates: Keep at most this many (file order); ``None`` keeps all.
    """
    keep = [t for t in templates if t.original_task and t.variables <= available]
    return keep[:max_templates] if max_templates else keep


def _protect(example: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.replace(SEPARATOR, _PIPE_PROTECTOR) if isinstance(v, str) else v
        for k, v in example.items()
    }


@lru_cache(maxsize=512)
def _compiled(jinja: str, truncate: bool) -> Template:
    if truncate:  # promptsource: every "}}" gets "| string | truncate(TEXT_VAR_LENGTH)"
        jinja = jinja.replace("}}", f" | string | truncate({TEXT_VAR_LENGTH}) }}}}")
    return _PARSE_ENV.from_string(jinja)


def render(
    template: P3Template, example: dict[str, Any], rng: random.Random
) -> tuple[str, str] | None:
    """Apply a template to an example as promptsource's ``Template.apply`` does.

    Args:
        template: The template.
        example: The dataset example (the upstream HF fields).
        rng: Source of randomness for the ``choice`` filter.

    Returns:
        ``(prompt, target)``, or ``None`` when the template yields no target for it.
    """
    _Rng.rng = rng
    ex = _protect(example)
    choices = None
    if template.answer_choices:
        rendered = _compiled(template.answer_choices, False).render(**ex)
        choices = [c.strip().replace(_PIPE_PROTECTOR, SEPARATOR) for c in rendered.split(SEPARATOR)]
    text = _compiled(template.jinja, True).render(**ex, answer_choices=choices)
    parts = [p.replace(_PIPE_PROTECTOR, SEPARATOR).strip() for p in text.split(SEPARATOR)]
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1]

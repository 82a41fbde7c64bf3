"""``data.chat_template``: the chat template every prompt of a run is built with.

* ``None`` (the default): the tokenizer's own; a tokenizer without one is an error naming the
  setting (a base model needs one chosen).
* ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message (Qwen, SmolLM2 …).
* ``llama3``: ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`` per message,
  after the tokenizer's bos token.
* ``plain``: for base models: each system / user message followed by a newline, each answer by
  the eos token, nothing else (the prompt of a source is ``source + "\\n"``).
* a path to a Jinja file: its text.

The marker strings of ``chatml`` and ``llama3`` are special tokens of the tokenizers made for
them; another tokenizer splits them into ordinary tokens (they still delimit the turns).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The named templates of ``data.chat_template``.
NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3": (
        "{{- bos_token if bos_token else '' }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{- message['content'] + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- endif %}"
    ),
    "plain": (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- message['content'] + (eos_token if eos_token else '') }}"
        "{%- else %}{{- message['content'] + '\\n' }}{%- endif %}"
        "{%- endfor %}"
    ),
}
#: ``data.chat_template`` values in words, for messages.
CHOICES = "chatml|llama3|plain or a .jinja file"


def template_problem(value: str | None) -> str | None:
    """Why ``value`` is no ``data.chat_template`` (None when it is one)."""
    if value is None or value in NAMED_TEMPLATES:
        return None
    path = Path(value).expanduser()
    if not value.endswith((".jinja", ".jinja2", ".j2")) and not path.is_file():
        return f"must be {CHOICES}, got {value!r}"
    if not path.is_file():
        return f"{value}: no such file; give {CHOICES}"
    return None


def template_text(value: str) -> str:
    """The Jinja source of a named template or a template file."""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    problem = template_problem(value)
    if problem:
        raise ValueError(f"data.chat_template: {problem}")
    return Path(value).expanduser().read_text(encoding="utf-8")


def apply_chat_template_setting(
    tokenizer: Any, value: str | None, model: str, setting: str = "data.chat_template"
) -> Any:
    """Give ``tokenizer`` the chat template of ``data.chat_template`` (``value``), in place:
    training and every evaluation built from this tokenizer then use the same one.

    Args:
        tokenizer: the run's tokenizer.
        value: ``data.chat_template`` (None: keep the tokenizer's own).
        model: how the model was named (in the error).
        setting: how the user gives the template (``--chat-template`` on a command line).

    Raises:
        ValueError: ``value`` is None and the tokenizer has no template (one line naming the
            setting), or ``value`` is no template.
    """
    if value is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer of {model} has no chat template; set {setting}={CHOICES}"
            )
        return tokenizer
    problem = template_problem(value)
    if problem:
        raise ValueError(f"{setting}: {problem}")
    tokenizer.chat_template = template_text(value)
    return tokenizer

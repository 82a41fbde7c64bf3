"""docs/config.md is generated from the dataclasses and stays in step with them: every key has
help, the committed file is the generator's output, and every key it lists is accepted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hmora_ds import config_doc
from hmora_ds.config import RoutingConfig
from hmora_ds.params import method_overrides
from hmora_ds.train.config import RunConfig, load_run_config


def test_committed_reference_is_the_generators_output():
    text = config_doc.render()
    committed = config_doc.DOC_PATH.read_text() if config_doc.DOC_PATH.is_file() else ""
    assert committed == text, (
        f"docs/config.md is stale; regenerate it with `{config_doc.COMMAND}` and commit it"
    )
    assert config_doc.render() == text  # deterministic
    assert config_doc.main(["--check"]) == 0


def test_every_key_has_help():
    assert config_doc.missing_help(RunConfig) == [], (
        "add an entry to the dataclass docstring's Attributes: section, then run "
        f"`{config_doc.COMMAND}`"
    )
    secs = config_doc.sections(RunConfig)
    prefixes = [s.prefix for s in secs]
    for prefix in ("method", "method.adapter", "method.routing", "method.loss", "train"):
        assert prefix in prefixes
    keys = [k for s in secs for k in s.keys]
    assert all(k.help.strip() for k in keys)
    text = config_doc.render()
    assert all(f"| `{k.key}` |" in text for k in keys)
    assert len({k.key for k in keys}) == len(keys)


def test_every_documented_key_is_accepted_with_its_default():
    for sec in config_doc.sections(RunConfig):
        for k in sec.keys:
            item = f"{k.key}={config_doc.format_value(k.default)}"
            load_run_config(None, [item])
            if k.key.startswith("method."):
                assert list(method_overrides([item])) == [k.key[len("method.") :]]


def test_shared_and_continued_docstring_entries():
    docs = config_doc.attribute_docs(RoutingConfig)
    assert docs["eps"] == docs["mu"] and docs["eps"].startswith("α(l) = σ(")
    assert docs["beta_low"] == docs["beta_high"]


# ---------------------------------------------------------------- the checker itself
@dataclass
class _Inner:
    """An inner section.

    Attributes:
        documented: has help.
    """

    documented: int = 1
    undocumented: str = "x"


@dataclass
class _NoDoc:
    x: int = 0


@dataclass
class _Outer:
    """The outer section.

    Attributes:
        a / b: shared help,
            continued on the next line.
        keyed: dotted keys of ``_Inner``.

    Notes:
        not_a_field: the Attributes section ended above.
    """

    a: int = 0
    b: float | None = None
    inner: _Inner = field(default_factory=_Inner)
    keyed: dict[str, Any] = field(default_factory=dict, metadata={"keys_of": _Inner})
    bare: _NoDoc = field(default_factory=_NoDoc)


def test_checker_reports_fields_and_sections_without_help():
    docs = config_doc.attribute_docs(_Outer)
    assert docs == {
        "a": "shared help, continued on the next line.",
        "b": "shared help, continued on the next line.",
        "keyed": "dotted keys of ``_Inner``.",
    }
    assert config_doc.missing_help(_Outer) == [
        "inner.undocumented",
        "keyed.undocumented",
        "bare (section: no docstring)",
        "bare.x",
    ]
    secs = {s.prefix: s for s in config_doc.sections(_Outer)}
    assert secs["keyed"].intro == "dotted keys of ``_Inner``."  # the parent's entry
    assert secs["inner"].intro == "An inner section."  # else the section's own summary
    assert [(k.key, k.type, k.default) for k in secs[""].keys] == [
        ("a", "int", 0),
        ("b", "float | None", None),
    ]

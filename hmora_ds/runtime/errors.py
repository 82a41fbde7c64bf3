"""The one line of an exception that a one-line error message quotes."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first non-blank line of ``str(err)``, stripped; the exception's type name when the
    message is empty (many errors from torch, transformers and gloo span several lines)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__

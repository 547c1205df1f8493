"""CLI flags made from a request dataclass: the ``#:`` comment above each field is its help text
and the field default is the flag default (STYLE rule 18: one request type, flags from its docs)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Iterable
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """``{field: help}`` from the ``#:`` comment lines directly above each field of ``cls``."""
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
        elif ":" in text and pending and not text.startswith(("def ", "@", '"""', "#")):
            docs[text.split(":", 1)[0].strip()] = " ".join(pending)
            pending = []
        else:
            pending = []
    return docs


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_spec_arguments(parser: Any, cls: type, names: Iterable[str], *, choices: dict[str, Iterable[str]] | None = None) -> None:
    """Add one flag per field in ``names``: bools become ``--flag`` switches, tuples ``nargs='+'``."""
    docs = field_docs(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = by_name[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = docs.get(name, name)
        kwargs: dict[str, Any] = {"dest": name, "default": default}
        if isinstance(default, bool):
            parser.add_argument(flag(name), action="store_true", help=help_text, **kwargs)
            continue
        if isinstance(default, tuple):
            kwargs["nargs"] = "+"
            shown = " ".join(map(str, default)) or "none"
        else:
            kwargs["type"] = type(default)
            shown = str(default)
        if choices and name in choices:
            kwargs["choices"] = tuple(choices[name])
        parser.add_argument(flag(name), help=f"{help_text} (default: {shown})", **kwargs)


def spec_values(args: argparse.Namespace, cls: type, names: Iterable[str]) -> dict[str, Any]:
    """The values of the flags added by :func:`add_spec_arguments` (tuples for nargs lists)."""
    out = {}
    for name in names:
        value = getattr(args, name)
        out[name] = tuple(value) if isinstance(value, list) else value
    return out

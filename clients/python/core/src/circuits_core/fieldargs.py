"""Command-line flags generated from a settings dataclass: its ``#:`` field comments are the help.

A field is documented once, where it is declared::

    #: Node threshold: keep neurons with |RelP| >= tau * |m|.
    tau: float = 0.005

:func:`add_field_arguments` adds ``--tau`` with that help (and the default), :func:`field_values`
returns the values the user gave. Flags default to "not given" (``argparse.SUPPRESS``), so the
dataclass (or a config section) stays the one place a default is written, and two commands that
parse the same argv build the same object.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

_FIELD_LINE = re.compile(r"^\s+([A-Za-z_]\w*)\s*:")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: doc}`` from the ``#:`` comment lines right above each field (base classes included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (frozen app, REPL class): no docs
            continue
        pending: list[str] = []
        for line in lines[1:]:
            stripped = line.strip()
            if stripped.startswith("#:"):
                pending.append(stripped[2:].strip())
                continue
            match = _FIELD_LINE.match(line)
            if match and pending:
                docs[match.group(1)] = " ".join(pending)
            pending = []
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shape(tp: Any) -> tuple[Any, str]:
    """(item type, kind) of a field type: kind is scalar, bool, list (tuple[X, ...]) or pair (tuple[X, X])."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported field type {tp!r}")
        return _shape(args[0])
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0], "list"
        if len(args) == 2 and args[0] is args[1]:
            return args[0], "pair"
        raise TypeError(f"unsupported field type {tp!r}")
    if tp is bool:
        return bool, "bool"
    if tp in (int, float, str):
        return tp, "scalar"
    raise TypeError(f"unsupported field type {tp!r}")


def _shown_default(value: Any) -> str | None:
    if value is None or value == () or value == "" or value is False:
        return None
    return str(value)


def add_field_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    default_help: Callable[[str, str], str] = lambda name, default: f"default: {default}",
) -> list[str]:
    """Add one argument per field of the dataclass ``cls`` (in declaration order); return the field names.

    A field without a default becomes a positional argument, every other field ``--field-name``.
    The help is the field's ``#:`` doc plus ``(default_help(name, default))`` when the default is
    worth showing. A field's ``metadata["metavar"]`` names its value(s), ``metadata["choices"]``
    restricts them. A ``bool | None`` field (unset = "the default decides") gets ``--field`` (True)
    and ``metadata["negative_flag"]`` (default ``--no-field``, False) as a mutually exclusive pair.
    Values not given on the command line are absent from the namespace; :func:`field_values`
    collects the given ones.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    wanted = set(only) if only is not None else None
    skipped = set(exclude)
    names: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skipped or (wanted is not None and f.name not in wanted):
            continue
        item, kind = _shape(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "")
        shown = _shown_default(default) if has_default else None
        if shown is not None:
            help_text = f"{help_text} ({default_help(f.name, shown)})"
        options: dict[str, Any] = {"help": help_text.replace("%", "%%")}
        if "metavar" in f.metadata:
            options["metavar"] = f.metadata["metavar"]
        if "choices" in f.metadata:
            options["choices"] = tuple(f.metadata["choices"])
        if kind == "bool" and default is None:
            # Tri-state (unset = "the default decides"): --field sets True, the negative flag False.
            negative = f.metadata.get("negative_flag", "--no-" + f.name.replace("_", "-"))
            pair = parser.add_mutually_exclusive_group()
            pair.add_argument(_flag(f.name), dest=f.name, action="store_const", const=True,
                              default=argparse.SUPPRESS, help=options["help"])
            pair.add_argument(negative, dest=f.name, action="store_const", const=False,
                              default=argparse.SUPPRESS, help=f"the opposite of {_flag(f.name)}")
            names.append(f.name)
            continue
        if kind == "bool":
            if default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: a flag needs a bool field that defaults to False or None")
            options["action"] = "store_true"
        else:
            options["type"] = item
            if kind == "list":
                options["nargs"] = "+"
            elif kind == "pair":
                options["nargs"] = 2
        if has_default:
            parser.add_argument(_flag(f.name), dest=f.name, default=argparse.SUPPRESS, **options)
        else:
            options.pop("metavar", None)
            parser.add_argument(f.name, **options)
        names.append(f.name)
    return names


def field_values(args: argparse.Namespace, cls: type, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (lists become tuples), for ``cls(**values)``."""
    skipped = set(exclude)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skipped or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return values

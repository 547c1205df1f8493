"""Typed tool arguments: one declaration gives the JSON schema the LLM sees and the validator that
runs before a tool does.

A :class:`Param` is a string, integer, number, boolean, array (of one item Param) or object (of
named Params), with bounds (length, range, items, choices). :func:`validate_arguments` checks a
call's arguments against a tool's params and returns plain Python values (missing optional
params take their defaults) or raises :class:`ArgumentErrors` listing every problem, so a
malformed call is answered with what to fix and nothing runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("string", "integer", "number", "boolean", "array", "object")


class ArgumentErrors(Exception):
    """The arguments of a tool call are not valid; ``problems`` says why (one line each)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True, slots=True, kw_only=True)
class Param:
    """One argument (or, inside arrays and objects, one value) of a tool."""

    name: str
    kind: str
    description: str = ""
    required: bool = True
    default: Any = None
    #: Strings: most characters (0 = no limit) and at least one non-space character when required.
    max_chars: int = 0
    #: Numbers: inclusive range (None = open).
    minimum: float | None = None
    maximum: float | None = None
    #: Strings: allowed values.
    choices: tuple[str, ...] = ()
    #: Arrays: the item, and how many items.
    items: Param | None = None
    min_items: int = 0
    max_items: int = 0
    #: Objects: the fields.
    fields: tuple[Param, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"param {self.name}: kind must be one of {KINDS}")
        if self.kind == "array" and self.items is None:
            raise ValueError(f"param {self.name}: an array needs items")

    def schema(self) -> dict[str, Any]:
        """This value's JSON schema."""
        out: dict[str, Any] = {"type": self.kind}
        if self.description:
            out["description"] = self.description
        if self.kind == "string":
            if self.choices:
                out["enum"] = list(self.choices)
            if self.max_chars:
                out["maxLength"] = self.max_chars
        elif self.kind in ("integer", "number"):
            if self.minimum is not None:
                out["minimum"] = self.minimum
            if self.maximum is not None:
                out["maximum"] = self.maximum
        elif self.kind == "array":
            assert self.items is not None
            out["items"] = self.items.schema()
            if self.min_items:
                out["minItems"] = self.min_items
            if self.max_items:
                out["maxItems"] = self.max_items
        elif self.kind == "object":
            out.update(object_schema(self.fields))
        return out


def object_schema(params: Sequence[Param]) -> dict[str, Any]:
    """The JSON schema of an object with these params (a tool's whole argument object)."""
    return {
        "type": "object",
        "properties": {p.name: p.schema() for p in params},
        "required": [p.name for p in params if p.required],
        "additionalProperties": False,
    }


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check(param: Param, value: Any, where: str, problems: list[str]) -> Any:
    kind = param.kind
    if kind == "string":
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {_describe(value)}")
            return None
        if param.max_chars and len(value) > param.max_chars:
            problems.append(f"{where}: {len(value)} characters, over the limit of {param.max_chars}")
        if "\x00" in value:
            problems.append(f"{where}: must not contain NUL characters")
        if param.choices and value not in param.choices:
            problems.append(f"{where}: must be one of {', '.join(param.choices)}, got {_describe(value)}")
        if param.required and not param.choices and not value.strip():
            problems.append(f"{where}: must not be empty")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if kind in ("integer", "number"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind == "integer" and isinstance(value, float):
            ok = value.is_integer()
            value = int(value) if ok else value
        if not ok or not math.isfinite(value):
            problems.append(f"{where}: expected {'an integer' if kind == 'integer' else 'a finite number'}, got {_describe(value)}")
            return None
        if param.minimum is not None and value < param.minimum:
            problems.append(f"{where}: must be >= {param.minimum:g}, got {value:g}")
        if param.maximum is not None and value > param.maximum:
            problems.append(f"{where}: must be <= {param.maximum:g}, got {value:g}")
        return int(value) if kind == "integer" else float(value)
    if kind == "array":
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {_describe(value)}")
            return None
        if len(value) < param.min_items:
            problems.append(f"{where}: needs at least {param.min_items} item(s), got {len(value)}")
        if param.max_items and len(value) > param.max_items:
            problems.append(f"{where}: {len(value)} items, over the limit of {param.max_items}")
            value = value[: param.max_items]
        assert param.items is not None
        return [_check(param.items, item, f"{where}[{i}]", problems) for i, item in enumerate(value)]
    # object
    if not isinstance(value, Mapping):
        problems.append(f"{where}: expected an object, got {_describe(value)}")
        return None
    return _check_fields(param.fields, value, where, problems)


def _check_fields(params: Sequence[Param], value: Mapping[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    known = {p.name: p for p in params}
    for key in value:
        if key not in known:
            allowed = ", ".join(known) or "none"
            problems.append(f"{where + '.' if where else ''}{key}: unknown argument (allowed: {allowed})")
    out: dict[str, Any] = {}
    for param in params:
        name = f"{where}.{param.name}" if where else param.name
        if param.name not in value or value[param.name] is None:
            if param.required:
                problems.append(f"{name}: missing")
            out[param.name] = param.default
            continue
        out[param.name] = _check(param, value[param.name], name, problems)
    return out


def validate_arguments(params: Sequence[Param], arguments: Any) -> dict[str, Any]:
    """Validated arguments of a call (defaults filled in), or ArgumentErrors with every problem."""
    if not isinstance(arguments, Mapping):
        shown = arguments if isinstance(arguments, str) else type(arguments).__name__
        raise ArgumentErrors([f"arguments must be a JSON object, got {_describe(shown)}"])
    problems: list[str] = []
    out = _check_fields(params, arguments, "", problems)
    if problems:
        raise ArgumentErrors(problems)
    return out

"""Optional parts of the app and the one-line error when one is missing.

The base ``circuits`` install is the core, the SDK and the light commands. Each in-process engine
is an optional part (a pip extra of ``circuits``): ``attribution`` (torch, transformers),
``aggregator`` (duckdb, pyarrow), ``labeler`` (LLM SDKs), ``atlas`` (duckdb, infomap), ``serve``
(the server library), ``gateway`` (the server library and Envoy), ``mcp`` (the MCP SDK for
``circuits mcp``). :func:`require` imports a part's module or raises :class:`MissingPart`, a
:class:`~circuits_core.errors.FailedPrecondition` the CLI prints as one ``error:`` line.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from circuits_core.errors import FailedPrecondition

#: top-level module -> the extra that provides it (service packages and their heavy dependencies).
PART_OF_MODULE: dict[str, str] = {
    "circuits_attribution": "attribution",
    "torch": "attribution",
    "transformers": "attribution",
    "accelerate": "attribution",
    "safetensors": "attribution",
    "gguf": "attribution",
    "kubernetes": "attribution",
    "matplotlib": "attribution",
    "circuits_aggregator": "aggregator",
    "pyarrow": "aggregator",
    "circuits_labeler": "labeler",
    "anthropic": "labeler",
    "openai": "labeler",
    "httpx": "labeler",
    "psycopg": "labeler",
    "circuits_atlas": "atlas",
    "duckdb": "atlas",
    "infomap": "atlas",
    "circuits_server": "serve",
    "prometheus_client": "serve",
    "grpc_reflection": "serve",
    "envoy": "gateway",
    "mcp": "mcp",
}


class MissingPart(FailedPrecondition):
    """An optional part of circuits is not installed; the message names the pip extra."""


def missing_part_error(exc: ModuleNotFoundError, *, what: str = "") -> MissingPart | None:
    """The MissingPart for an import failure of a known optional module, else None."""
    root = (exc.name or "").split(".")[0]
    part = PART_OF_MODULE.get(root)
    if part is None:
        return None
    doing = f"{what} needs" if what else "this needs"
    return MissingPart(
        f"{doing} the {part} part of circuits, which is not installed ({root} is missing): "
        f"pip install 'circuits[{part}]'"
    )


def require(module: str, *, what: str = "") -> ModuleType:
    """Import ``module`` (of an optional part) or raise MissingPart naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        error = missing_part_error(exc, what=what)
        if error is None:
            raise
        raise error from None

"""circuits SDK: gRPC clients of the four services (core types in, core types out).

    from circuits_sdk import AtlasClient          # or, from the app: circuits.client

The SDK imports nothing of the servers or the service packages; it loads no torch or duckdb.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "AttributionClient": "circuits_sdk.attribution",
    "AggregatorClient": "circuits_sdk.aggregator",
    "LabelerClient": "circuits_sdk.labeler",
    "AtlasClient": "circuits_sdk.atlas",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'circuits_sdk' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

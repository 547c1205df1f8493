"""Python clients for the circuits services (imported lazily)."""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "AttributionClient": "circuits.client.attribution",
    "AggregatorClient": "circuits.client.aggregator",
    "LabelerClient": "circuits.client.labeler",
    "AtlasClient": "circuits.client.atlas",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)

"""The SDK's public path in the app: ``from circuits.client import AtlasClient``.

The clients live in :mod:`circuits_sdk`; this module only re-exports them (lazily), so importing it
loads no torch, duckdb, server library or service package.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AttributionClient", "AggregatorClient", "LabelerClient", "AtlasClient"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import circuits_sdk

        return getattr(circuits_sdk, name)
    raise AttributeError(f"module 'circuits.client' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

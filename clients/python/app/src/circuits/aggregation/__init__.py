"""Seed-compatible aggregation API: ``from circuits.aggregation import InMemoryAggregator``."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from circuits.extras import require

    return getattr(require("circuits_aggregator", what="circuits.aggregation"), name)


def __dir__() -> list[str]:
    from circuits.extras import require

    return sorted(getattr(require("circuits_aggregator", what="circuits.aggregation"), "__all__", ()))

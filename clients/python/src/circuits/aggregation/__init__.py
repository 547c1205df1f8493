"""Seed-compatible aggregation API: ``from circuits.aggregation import InMemoryAggregator``."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    import circuits_aggregator

    return getattr(circuits_aggregator, name)

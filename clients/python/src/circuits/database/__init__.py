"""Seed-compatible atlas API: ``from circuits.database import CircuitDatabase``."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    import circuits_atlas

    return getattr(circuits_atlas, name)

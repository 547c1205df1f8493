"""Seed-compatible atlas API: ``from circuits.database import CircuitDatabase``."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from circuits.extras import require

    return getattr(require("circuits_atlas", what="circuits.database"), name)


def __dir__() -> list[str]:
    from circuits.extras import require

    return sorted(getattr(require("circuits_atlas", what="circuits.database"), "__all__", ()))

"""circuits-attribution: the RelP attribution engine (relp-spec §A-§E) and its service.

``RelPAttributor(model, tokenizer, RelPConfig(...)).trace(prompt) -> circuits_core.schemas.Graph``;
``load_model(name_or_path, dtype=..., device=...)`` loads a model for it and ``load_engine(...)``
both. Names are imported on first use, so ``import circuits_attribution`` (e.g. for ``circuits
launch``) loads no torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "RelPAttributor": "circuits_attribution.attributor",
    "RelPConfig": "circuits_attribution.attributor",
    "Linearization": "circuits_attribution.linearize",
    "LoadedModel": "circuits_attribution.models",
    "load_model": "circuits_attribution.models",
    "load_engine": "circuits_attribution.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'circuits_attribution' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

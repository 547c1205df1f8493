"""circuits-attribution: the RelP attribution engine (relp-spec §A-§E) and its service.

``RelPAttributor(model, tokenizer, RelPConfig(...)).trace(prompt) -> circuits.schemas.Graph``;
``load_model(name_or_path, dtype=..., device=...)`` loads a model for it.
"""

from __future__ import annotations

from circuits_attribution.attributor import RelPAttributor, RelPConfig
from circuits_attribution.linearize import Linearization
from circuits_attribution.models import LoadedModel, load_model

__all__ = ["Linearization", "LoadedModel", "RelPAttributor", "RelPConfig", "load_model"]

"""Weight-based connectivity: the request type and the answer types (light: no pyarrow).

``circuits connectivity`` (computation: :mod:`circuits_attribution.connectivity`) writes one folder
(owner: :mod:`circuits_core.connectivity_files`)::

    manifest.json                 model shape, settings, timings (format "circuits.connectivity")
    output_projections.parquet    per neuron: top-k promoted / suppressed tokens of W_U·W_down[:, i]
                                  (the :mod:`circuits_core.projections` file, also read by the labeler)
    input_projections.parquet     per neuron: top-k tokens of silu(W_E W_gate^T) ⊙ (W_E W_up^T)
    weight_edges.parquet          per target neuron: top edges per polarity from all earlier layers
    projection_edges.parquet      (part "similarity") neuron pairs whose output projections agree
    parts/<kind>/layer-NNNN.parquet   finished layers of a run in progress (resume skips them)

Every file is written atomically (temporary name + rename); a layer is done when its part file
exists, so a killed run resumes at the first missing layer. The full schema is in
``docs/connectivity.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from circuits_core.errors import InvalidArgument

FORMAT = "circuits.connectivity"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

#: Parts of a connectivity run and the final file each one writes.
PART_FILES: dict[str, str] = {
    "output": "output_projections.parquet",
    "input": "input_projections.parquet",
    "weights": "weight_edges.parquet",
    "similarity": "projection_edges.parquet",
}
PARTS: tuple[str, ...] = tuple(PART_FILES)
DEFAULT_PARTS: tuple[str, ...] = ("output", "input", "weights")

INPUT_COLUMNS = ("layer", "neuron", "top_ids", "top_tokens", "top_weights")
WEIGHT_EDGE_COLUMNS = ("src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "polarity", "c_up", "c_gate", "strength")
SIMILARITY_COLUMNS = ("src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "similarity")
#: polarity column values
EXCITATORY = 1
INHIBITORY = -1


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenWeight:
    """One vocabulary entry of a projection: its id, printable string and weight."""

    token_id: int
    token: str
    weight: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectivitySpec:
    """What ``circuits connectivity`` computes and how. Field comments are the CLI help."""

    #: Parts to compute: output (output projections), input (input projections), weights
    #: (weight-graph edges), similarity (output-projection similarity edges).
    parts: tuple[str, ...] = DEFAULT_PARTS
    #: Tokens kept per neuron in the output and input projections.
    top_k: int = 50
    #: Weight-graph edges kept per polarity per target neuron (over all earlier layers).
    edges_per_polarity: int = 100
    #: Most similar neurons kept per neuron for the similarity edges.
    similarity_k: int = 20
    #: Fold the final norm weight into the output projection (W_U diag(w_norm) W_down[:, i]).
    final_norm: bool = False
    #: Neurons per block (rows of one batched matmul).
    neuron_block: int = 512
    #: Upper bound (MiB) on the score matrix of one block; source layers are grouped to fit it.
    block_memory_mb: int = 256
    #: Compute dtype: float32 | float64 | bfloat16 | float16 (top-k values are stored as float32).
    dtype: str = "float32"

    def __post_init__(self) -> None:
        parts = (self.parts,) if isinstance(self.parts, str) else tuple(self.parts)
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise InvalidArgument(f"connectivity parts must be among {', '.join(PARTS)}, got {', '.join(parts) or 'none'}")
        object.__setattr__(self, "parts", tuple(p for p in PARTS if p in parts))
        for name in ("top_k", "edges_per_polarity", "similarity_k", "neuron_block", "block_memory_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be an integer >= 1, got {value!r}")
        if self.dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise InvalidArgument(f"dtype must be float32, float64, bfloat16 or float16, got {self.dtype!r}")

    def content_settings(self, part: str) -> dict[str, Any]:
        """The settings that determine the content of one part (compared on resume)."""
        common = {"dtype": self.dtype}
        if part == "output":
            return {**common, "top_k": self.top_k, "final_norm": self.final_norm}
        if part == "input":
            return {**common, "top_k": self.top_k}
        if part == "weights":
            return {**common, "edges_per_polarity": self.edges_per_polarity}
        return {**common, "similarity_k": self.similarity_k, "final_norm": self.final_norm}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShape:
    """What a connectivity folder was computed from."""

    model: str
    num_layers: int
    d_mlp: int
    d_model: int
    vocab_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitProjections:
    """A neuron's weight-only token effects: output projection (promotes / suppresses) and input projection."""

    layer: int
    neuron: int
    output_norm: float = math.nan
    logit_effect: float = math.nan
    promotes: tuple[TokenWeight, ...] = ()
    suppresses: tuple[TokenWeight, ...] = ()
    #: Tokens whose embeddings most activate the neuron (silu(E W_gate^T) ⊙ E W_up^T).
    input_tokens: tuple[TokenWeight, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightEdge:
    """A weight-graph edge from neuron (src_layer, src_neuron) to (tgt_layer, tgt_neuron).

    ``c_up = W_up^t[N]·W_down^l[:, m]``, ``c_gate = W_gate^t[N]·W_down^l[:, m]``; polarity +1
    (both > 0, excitatory) or -1 (both < 0, inhibitory); ``strength = c_up + c_gate`` (= ±(|c_up|+|c_gate|)).
    """

    src_layer: int
    src_neuron: int
    tgt_layer: int
    tgt_neuron: int
    polarity: int
    c_up: float
    c_gate: float
    strength: float


def settings_fields() -> tuple[str, ...]:
    """Names of the :class:`ConnectivitySpec` fields (CLI flags are made from them)."""
    return tuple(f.name for f in fields(ConnectivitySpec))

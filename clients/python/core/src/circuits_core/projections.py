"""The output-projections file: which tokens each MLP neuron promotes and suppresses (owner module).

For neuron ``i`` of layer ``l`` the projection is ``o_i = W_U · W_down^l[:, i]`` over the
vocabulary (optionally through the final norm weight, ``W_U · diag(w_norm) · W_down^l[:, i]``); the
computation lives in :mod:`circuits_attribution.connectivity`. This module owns the Parquet file
both the labeler (``labeling.projections_path``) and ``circuits connectivity``
(``<out>/output_projections.parquet``) write and read:

one row per neuron: ``layer``, ``neuron`` (int32), ``output_norm`` = ‖W_down[:, i]‖,
``logit_effect`` = max_v |o_i[v]| (float32), ``promote_ids`` / ``promote_tokens`` /
``promote_weights`` (the top-k largest entries, descending) and ``suppress_*`` (the k most negative,
most negative first) as lists; schema metadata ``circuits.projections`` holds model, num_layers,
top_k, include_final_norm and schema_version (JSON).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circuits_core.connectivity import TokenWeight
from circuits_core.errors import CorruptInput, NotFound

SCHEMA_VERSION = 1
METADATA_KEY = b"circuits.projections"
PROJECTION_COLUMNS = (
    "layer", "neuron", "output_norm", "logit_effect",
    "promote_ids", "promote_tokens", "promote_weights", "suppress_ids", "suppress_tokens", "suppress_weights",
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class NeuronProjection:
    """Top promoted (largest) and suppressed (most negative) tokens of one neuron."""

    layer: int
    neuron: int
    output_norm: float
    #: max_v |o_i[v]|: the strongest direct logit effect.
    logit_effect: float
    promotes: tuple[TokenWeight, ...] = ()
    suppresses: tuple[TokenWeight, ...] = ()


def token_list_array(ids: Any, vocab: Sequence[str]) -> tuple[Any, Any]:
    """``(ids, tokens)`` as pyarrow list arrays from an ``[N, k]`` integer array and the vocabulary."""
    import numpy as np
    import pyarrow as pa

    ids = np.asarray(ids, dtype=np.int64)
    n, k = ids.shape if ids.ndim == 2 else (0, 0)
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * k, pa.int32())
    vocab_np = np.asarray(vocab, dtype=object)
    flat_ids = ids.reshape(-1)
    id_values = pa.array(flat_ids.astype(np.int32), pa.int32())
    token_values = pa.array(vocab_np[flat_ids] if len(flat_ids) else [], pa.string())
    return pa.ListArray.from_arrays(offsets, id_values), pa.ListArray.from_arrays(offsets, token_values)


def weight_list_array(values: Any) -> Any:
    """An ``[N, k]`` float array as a pyarrow list<float32> array."""
    import numpy as np
    import pyarrow as pa

    values = np.asarray(values, dtype=np.float32)
    n, k = values.shape if values.ndim == 2 else (0, 0)
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * k, pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), pa.float32()))


def projection_table(
    *,
    layer: int,
    output_norm: Any,
    logit_effect: Any,
    top_ids: Any,
    top_values: Any,
    bottom_ids: Any,
    bottom_values: Any,
    vocab: Sequence[str],
) -> Any:
    """One layer's projections as a pyarrow Table in the file's column layout (no per-row objects).

    Arrays are numpy-like: ``output_norm``/``logit_effect`` ``[F]``, ids/values ``[F, k]``.
    """
    import numpy as np
    import pyarrow as pa

    norms = np.asarray(output_norm, dtype=np.float32)
    n = len(norms)
    promote_ids, promote_tokens = token_list_array(top_ids, vocab)
    suppress_ids, suppress_tokens = token_list_array(bottom_ids, vocab)
    return pa.table({
        "layer": pa.array(np.full(n, layer, dtype=np.int32)),
        "neuron": pa.array(np.arange(n, dtype=np.int32)),
        "output_norm": pa.array(norms),
        "logit_effect": pa.array(np.asarray(logit_effect, dtype=np.float32)),
        "promote_ids": promote_ids,
        "promote_tokens": promote_tokens,
        "promote_weights": weight_list_array(top_values),
        "suppress_ids": suppress_ids,
        "suppress_tokens": suppress_tokens,
        "suppress_weights": weight_list_array(bottom_values),
    })


def projection_metadata(*, model: str, num_layers: int, top_k: int, include_final_norm: bool) -> dict[bytes, bytes]:
    """The schema metadata a projections file carries."""
    meta = {
        "model": model, "num_layers": num_layers, "top_k": top_k,
        "include_final_norm": include_final_norm, "schema_version": SCHEMA_VERSION,
    }
    return {METADATA_KEY: json.dumps(meta).encode()}


def write_projection_table(table: Any, path: str | Path, metadata: Mapping[bytes, bytes]) -> Path:
    """Write a projections table atomically (tmp + rename) with its metadata."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata(dict(metadata))
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_projection_table(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """``(table, metadata)`` of a projections file; NotFound / CorruptInput for missing or foreign files."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"output projections not found: {path}")
    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {})[METADATA_KEY])
    except (OSError, KeyError, ValueError) as exc:
        raise CorruptInput(f"{path}: not an output projections file ({exc.__class__.__name__})") from None
    missing = [c for c in PROJECTION_COLUMNS if c not in table.column_names]
    if missing:
        raise CorruptInput(f"{path}: output projections file lacks column(s) {', '.join(missing)}")
    return table, meta


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputProjections:
    """All neurons' projections, keyed by ``(layer, neuron)``."""

    model: str
    num_layers: int
    top_k: int
    include_final_norm: bool
    by_unit: dict[tuple[int, int], NeuronProjection] = field(default_factory=dict)

    def get(self, layer: int, neuron: int) -> NeuronProjection | None:
        return self.by_unit.get((layer, neuron))

    def __len__(self) -> int:
        return len(self.by_unit)

    def neurons_per_layer(self) -> int:
        """MLP neurons per layer (the largest neuron index + 1)."""
        return max((k[1] for k in self.by_unit), default=-1) + 1

    def unit_keys(self) -> list[tuple[int, int]]:
        """Every projected ``(layer, neuron)``, sorted."""
        return sorted(self.by_unit)

    def save(self, path: str | Path) -> Path:
        """Write Parquet atomically (tmp + rename); metadata carries model, layers, top_k."""
        import pyarrow as pa

        rows = sorted(self.by_unit.values(), key=lambda p: (p.layer, p.neuron))

        def col(fn: Callable[[NeuronProjection], Any]) -> list[Any]:
            return [fn(p) for p in rows]

        table = pa.table({
            "layer": pa.array(col(lambda p: p.layer), pa.int32()),
            "neuron": pa.array(col(lambda p: p.neuron), pa.int32()),
            "output_norm": pa.array(col(lambda p: p.output_norm), pa.float32()),
            "logit_effect": pa.array(col(lambda p: p.logit_effect), pa.float32()),
            "promote_ids": pa.array(col(lambda p: [t.token_id for t in p.promotes]), pa.list_(pa.int32())),
            "promote_tokens": pa.array(col(lambda p: [t.token for t in p.promotes]), pa.list_(pa.string())),
            "promote_weights": pa.array(col(lambda p: [t.weight for t in p.promotes]), pa.list_(pa.float32())),
            "suppress_ids": pa.array(col(lambda p: [t.token_id for t in p.suppresses]), pa.list_(pa.int32())),
            "suppress_tokens": pa.array(col(lambda p: [t.token for t in p.suppresses]), pa.list_(pa.string())),
            "suppress_weights": pa.array(col(lambda p: [t.weight for t in p.suppresses]), pa.list_(pa.float32())),
        })
        meta = projection_metadata(
            model=self.model, num_layers=self.num_layers, top_k=self.top_k, include_final_norm=self.include_final_norm
        )
        return write_projection_table(table, path, meta)

    @classmethod
    def from_table(cls, table: Any, meta: Mapping[str, Any]) -> OutputProjections:
        """Per-neuron objects from a projections table and its metadata."""
        data = table.to_pydict()
        by_unit = {}
        for i in range(table.num_rows):
            proj = NeuronProjection(
                layer=data["layer"][i],
                neuron=data["neuron"][i],
                output_norm=data["output_norm"][i],
                logit_effect=data["logit_effect"][i],
                promotes=tuple(
                    TokenWeight(token_id=t, token=s, weight=w)
                    for t, s, w in zip(data["promote_ids"][i], data["promote_tokens"][i], data["promote_weights"][i])
                ),
                suppresses=tuple(
                    TokenWeight(token_id=t, token=s, weight=w)
                    for t, s, w in zip(data["suppress_ids"][i], data["suppress_tokens"][i], data["suppress_weights"][i])
                ),
            )
            by_unit[(proj.layer, proj.neuron)] = proj
        return cls(
            model=str(meta.get("model", "")),
            num_layers=int(meta["num_layers"]),
            top_k=int(meta["top_k"]),
            include_final_norm=bool(meta["include_final_norm"]),
            by_unit=by_unit,
        )

    @classmethod
    def load(cls, path: str | Path) -> OutputProjections:
        """Read a file written by :meth:`save` (or by ``circuits connectivity``); a missing or
        foreign file raises NotFound / CorruptInput."""
        table, meta = read_projection_table(path)
        try:
            return cls.from_table(table, meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptInput(f"{path}: not an output projections file ({exc.__class__.__name__})") from None

"""The atlas's views of its inputs: edge/unit columns for clustering and the labels table.

The inputs' formats have one owner each in core: the aggregator export is checked by
:func:`circuits_core.exports.open_export`, label files are read by
:func:`circuits_core.labels.iter_label_file`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from circuits_core.errors import InvalidArgument
from circuits_core.labels import SCORE_FIELDS, LabelRecord
from circuits_core.schemas import Edge, Unit

#: Text columns of the labels table (and of the atlas's neurons table).
LABEL_TEXT_FIELDS = ("label", "input_label", "output_label", "description", "source")


# ------------------------------------------------------------------------------------------
# Column views used by clustering (numpy, no per-edge Python objects)
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeArrays:
    """Aggregated edges as parallel numpy columns."""

    src_layer: np.ndarray
    src_neuron: np.ndarray
    tgt_layer: np.ndarray
    tgt_neuron: np.ndarray
    count: np.ndarray
    weight_sum: np.ndarray
    weight_abs_sum: np.ndarray

    def __len__(self) -> int:
        return len(self.count)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitArrays:
    """Known units as parallel numpy columns."""

    layer: np.ndarray
    neuron: np.ndarray

    def __len__(self) -> int:
        return len(self.layer)


def _column(table: Any, name: str, dtype: Any) -> np.ndarray:
    if isinstance(table, Mapping):
        values = table[name]
    else:  # pyarrow.Table / RecordBatch
        values = table.column(name)
        values = values.to_numpy() if hasattr(values, "to_numpy") else values
    return np.asarray(values, dtype=dtype)


def edge_arrays(edges: Any) -> EdgeArrays:
    """Accept a pyarrow Table, a mapping of columns, a Parquet path or an iterable of Edge."""
    if isinstance(edges, EdgeArrays):
        return edges
    if isinstance(edges, (str, Path)):
        import pyarrow.parquet as pq

        edges = pq.read_table(edges, columns=["src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "count", "weight_sum", "weight_abs_sum"])
    if isinstance(edges, Mapping) or hasattr(edges, "column"):
        try:
            return EdgeArrays(
                src_layer=_column(edges, "src_layer", np.int64),
                src_neuron=_column(edges, "src_neuron", np.int64),
                tgt_layer=_column(edges, "tgt_layer", np.int64),
                tgt_neuron=_column(edges, "tgt_neuron", np.int64),
                count=_column(edges, "count", np.int64),
                weight_sum=_column(edges, "weight_sum", np.float64),
                weight_abs_sum=_column(edges, "weight_abs_sum", np.float64),
            )
        except KeyError as exc:
            raise InvalidArgument(f"edges: missing column {exc.args[0]!r}") from None
    rows: list[Edge] = list(edges)
    return EdgeArrays(
        src_layer=np.array([e.src_layer for e in rows], dtype=np.int64),
        src_neuron=np.array([e.src_index for e in rows], dtype=np.int64),
        tgt_layer=np.array([e.tgt_layer for e in rows], dtype=np.int64),
        tgt_neuron=np.array([e.tgt_index for e in rows], dtype=np.int64),
        count=np.array([e.count for e in rows], dtype=np.int64),
        weight_sum=np.array([e.weight_sum for e in rows], dtype=np.float64),
        weight_abs_sum=np.array([e.weight_abs_sum for e in rows], dtype=np.float64),
    )


def unit_arrays(units: Any) -> UnitArrays:
    """Accept a pyarrow Table, a mapping of columns, a Parquet path or an iterable of Unit/(layer, neuron)."""
    if isinstance(units, UnitArrays):
        return units
    if isinstance(units, (str, Path)):
        import pyarrow.parquet as pq

        units = pq.read_table(units, columns=["layer", "neuron"])
    if isinstance(units, Mapping) or hasattr(units, "column"):
        try:
            return UnitArrays(layer=_column(units, "layer", np.int64), neuron=_column(units, "neuron", np.int64))
        except KeyError as exc:
            raise InvalidArgument(f"units: missing column {exc.args[0]!r}") from None
    keys = [(u.layer, u.index) if isinstance(u, Unit) else (int(u[0]), int(u[1])) for u in units]
    return UnitArrays(
        layer=np.array([k[0] for k in keys], dtype=np.int64),
        neuron=np.array([k[1] for k in keys], dtype=np.int64),
    )


# ------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------
def labels_table(records: Iterable[LabelRecord]) -> Any:
    """A pyarrow Table of labels, one row per (layer, neuron) (the last record wins)."""
    import pyarrow as pa

    by_key: dict[tuple[int, int], LabelRecord] = {}
    for rec in records:
        by_key[(rec.layer, rec.neuron)] = rec
    rows = list(by_key.values())
    return pa.table(
        {
            "layer": pa.array([r.layer for r in rows], pa.int32()),
            "neuron": pa.array([r.neuron for r in rows], pa.int32()),
            **{name: pa.array([getattr(r, name) for r in rows], pa.string()) for name in LABEL_TEXT_FIELDS},
            "max_activation": pa.array([r.max_activation for r in rows], pa.float64()),
            "num_exemplars": pa.array([r.num_exemplars for r in rows], pa.int32()),
            "feature_id": pa.array([r.feature_id for r in rows], pa.int32()),
            "output_norm": pa.array([r.output_norm for r in rows], pa.float64()),
            **{f"{p}_score_{k}": pa.array([getattr(r, f"{p}_score_{k}") for r in rows],
                                          pa.float64() if kind is float else pa.int32())
               for p in ("output", "input") for k, kind in SCORE_FIELDS},
        }
    )

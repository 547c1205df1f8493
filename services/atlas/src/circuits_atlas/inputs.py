"""Reading the atlas inputs: the aggregator's Parquet export and the labeler's JSONL labels.

Export directory (written by the aggregator, exact columns):

* ``edges.parquet``: src_layer, src_neuron, tgt_layer, tgt_neuron (int32), count (int64),
  weight_sum, weight_abs_sum, weight_sq_sum, weight_min, weight_max (double)
* ``units.parquet``: layer, neuron, graph_count, observation_count, act_sum, act_sq_sum, act_min,
  act_max, attr_sum, attr_abs_sum, attr_sq_sum, attr_min, attr_max
* ``ledger.parquet``: graph_id, source, corpus_index

Missing files or columns raise :class:`~circuits_core.errors.CorruptInput` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from circuits_core.errors import CorruptInput, InvalidArgument
from circuits_core.schemas import Edge, Unit

EDGE_COLUMNS = (
    "src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "count",
    "weight_sum", "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max",
)  # fmt: skip
UNIT_KEY_COLUMNS = ("layer", "neuron", "graph_count")
LEDGER_COLUMNS = ("graph_id",)
LABEL_TEXT_FIELDS = ("label", "input_label", "output_label", "description", "source")
SCORE_FIELDS = (("detection", float), ("simulation", float), ("contexts", int), ("positives", int))


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportFiles:
    """Paths of one aggregator export (``ledger`` may be absent: graph count is then unknown)."""

    edges: Path
    units: Path
    ledger: Path | None
    #: Neuron -> logit links (``logits.parquet``); absent in exports written before they existed.
    logits: Path | None = None


def export_files(export_dir: str | Path) -> ExportFiles:
    """Locate and check the export's Parquet files (schema only, nothing is loaded)."""
    import pyarrow.parquet as pq

    root = Path(export_dir)
    if not root.is_dir():
        raise InvalidArgument(f"{root}: export directory not found")
    required = {"edges.parquet": EDGE_COLUMNS, "units.parquet": UNIT_KEY_COLUMNS}
    for name, columns in (*required.items(), ("ledger.parquet", LEDGER_COLUMNS)):
        path = root / name
        if not path.exists():
            if name in required:
                raise CorruptInput(f"{path}: missing from the aggregator export")
            continue
        try:
            names = set(pq.read_schema(path).names)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise CorruptInput(f"{path}: not a readable Parquet file ({exc})") from None
        missing = [c for c in columns if c not in names]
        if missing:
            raise CorruptInput(f"{path}: missing column(s) {', '.join(missing)}")
    # Absolute paths: a locked-down DuckDB connection may read exactly these files.
    root = root.resolve()
    ledger = root / "ledger.parquet"
    logits = root / "logits.parquet"
    return ExportFiles(edges=root / "edges.parquet", units=root / "units.parquet", ledger=ledger if ledger.exists() else None,
                       logits=logits if logits.exists() else None)


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
# Labels JSONL
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class LabelRecord:
    """One neuron's labels; absent fields are empty strings / None."""

    layer: int
    neuron: int
    label: str = ""
    input_label: str = ""
    output_label: str = ""
    description: str = ""
    source: str = ""
    max_activation: float | None = None
    num_exemplars: int | None = None
    feature_id: int | None = None
    output_norm: float | None = None
    #: Label scores per pass (circuits_labeler.scoring), None when not scored.
    output_score_detection: float | None = None
    output_score_simulation: float | None = None
    output_score_contexts: int | None = None
    output_score_positives: int | None = None
    input_score_detection: float | None = None
    input_score_simulation: float | None = None
    input_score_contexts: int | None = None
    input_score_positives: int | None = None


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise CorruptInput(f"{where}: expected an integer, got {value!r}")
    try:
        return int(value.lstrip("L") if isinstance(value, str) else value)
    except ValueError:
        raise CorruptInput(f"{where}: expected an integer, got {value!r}") from None


def _opt_number(value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return kind(value)


def parse_label_line(obj: Any, where: str) -> LabelRecord:
    """One JSONL object -> LabelRecord. Accepts the labeler's flat form and the seed's
    ``{"feature_metadata": {...}, "labels": [{"label": ..., "metadata": {...}}]}`` form."""
    if not isinstance(obj, Mapping):
        raise CorruptInput(f"{where}: expected a JSON object")
    meta = obj.get("feature_metadata") if isinstance(obj.get("feature_metadata"), Mapping) else {}
    layer = obj.get("layer", meta.get("layer"))
    neuron = obj.get("neuron", obj.get("index", meta.get("neuron")))
    if layer is None or neuron is None:
        raise CorruptInput(f"{where}: needs 'layer' and 'neuron'")
    fields = {k: _text(obj.get(k)) for k in LABEL_TEXT_FIELDS}
    labels = obj.get("labels")
    if isinstance(labels, list) and labels and isinstance(labels[0], Mapping):
        first = labels[0]
        fields["label"] = fields["label"] or _text(first.get("label") or first.get("text"))
        md = first.get("metadata") if isinstance(first.get("metadata"), Mapping) else {}
        parsed = md.get("parsed_response") if isinstance(md.get("parsed_response"), Mapping) else {}
        fields["description"] = fields["description"] or _text(first.get("description") or parsed.get("description"))
        fields["source"] = fields["source"] or _text(first.get("source"))
    if not fields["input_label"]:
        fields["input_label"] = _text(obj.get("input_description"))
    if not fields["label"]:
        fields["label"] = fields["output_label"] or _text(obj.get("function_label"))
    return LabelRecord(
        layer=_int(layer, f"{where}: layer"),
        neuron=_int(neuron, f"{where}: neuron"),
        max_activation=_opt_number(obj.get("max_activation", meta.get("max_activation")), float),
        num_exemplars=_opt_number(obj.get("num_exemplars", meta.get("num_exemplars")), int),
        feature_id=_opt_number(obj.get("feature_id"), int),
        output_norm=_opt_number(obj.get("output_norm"), float),
        **{f"{p}_score_{k}": _opt_number(obj.get(f"{p}_score_{k}"), kind)
           for p in ("output", "input") for k, kind in SCORE_FIELDS},
        **fields,
    )


def read_labels(path: str | Path) -> Iterator[LabelRecord]:
    """Labels from a JSONL file; a later line for the same neuron wins (see :func:`labels_table`).

    Blank lines are skipped; a line that is not JSON raises CorruptInput naming file and line."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: labels file not found") from None
    with handle:
        for lineno, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8", errors="replace"))
            except json.JSONDecodeError as exc:
                raise CorruptInput(f"{where}: not valid JSON ({exc.msg})") from None
            yield parse_label_line(obj, where)


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

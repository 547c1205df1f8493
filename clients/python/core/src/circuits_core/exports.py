"""Aggregator exports: the one owner of the Parquet export format (pyarrow: core's ``parquet`` extra).

An export is a directory with three Parquet files, written by the aggregator (one consistent
snapshot) and read by ``circuits aggregate --merge``, the atlas build and the labeler's evidence:

* ``edges.parquet``: one row per aggregated edge, :data:`EDGE_COLUMNS`
* ``units.parquet``: one row per neuron, :data:`UNIT_COLUMNS`
* ``ledger.parquet``: one row per counted graph, :data:`LEDGER_COLUMNS`
* ``logits.parquet`` (optional: exports written before it existed have none): aggregated
  neuron -> logit links, :data:`LOGIT_COLUMNS`

:func:`open_export` / :func:`open_exports` are the only checks of an export: every reader calls
them, so every reader accepts and rejects the same directories with the same messages. They
check that the files exist and are readable Parquet with the required columns of the right kind
(extra columns are allowed), and that no graph id is listed twice: within one ledger (the export
counted a graph twice) or across the exports read together (shards own disjoint graphs, so a
graph in two of them would be counted twice). Only schemas and the ledger's ``graph_id`` column
are read; the data stay on disk for the reader's engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuits_core.errors import CorruptInput, InvalidArgument

#: Column order of aggregated edge statistics (= edges.parquet).
EDGE_COLUMNS: tuple[str, ...] = (
    "src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "count",
    "weight_sum", "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max",
)  # fmt: skip
#: Column order of per-neuron statistics (= units.parquet).
UNIT_COLUMNS: tuple[str, ...] = (
    "layer", "neuron", "graph_count", "observation_count", "act_sum", "act_sq_sum", "act_min", "act_max",
    "attr_sum", "attr_abs_sum", "attr_sq_sum", "attr_min", "attr_max",
)  # fmt: skip
#: Column order of the ledger (= ledger.parquet).
LEDGER_COLUMNS: tuple[str, ...] = ("graph_id", "source", "corpus_index")
#: Column order of aggregated neuron -> logit links (= logits.parquet, optional).
LOGIT_COLUMNS: tuple[str, ...] = ("src_layer", "src_neuron", "token_id", "token", "count", "weight_sum", "weight_abs_sum")

EDGES_FILE = "edges.parquet"
UNITS_FILE = "units.parquet"
LEDGER_FILE = "ledger.parquet"
LOGITS_FILE = "logits.parquet"
#: The export's files and their columns, in the order they are checked.
EXPORT_FILES: dict[str, tuple[str, ...]] = {EDGES_FILE: EDGE_COLUMNS, UNITS_FILE: UNIT_COLUMNS, LEDGER_FILE: LEDGER_COLUMNS}

_INTEGER = frozenset(
    {"src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "count", "layer", "neuron", "graph_count",
     "observation_count", "corpus_index", "token_id"}
)  # fmt: skip
_TEXT = frozenset({"graph_id", "source", "token"})


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportFiles:
    """The checked files of one export (absolute paths) and how many graphs its ledger counts."""

    root: Path
    edges: Path
    units: Path
    ledger: Path
    #: logits.parquet when the export has one (checked like the others), else None.
    logits: Path | None
    graphs: int


def open_export(directory: str | Path) -> ExportFiles:
    """Check one export directory (see the module docstring) and return its files.

    A missing directory raises InvalidArgument; a missing or malformed file, or a graph id
    listed twice, CorruptInput naming the file.
    """
    return open_exports([directory])[0]


def open_exports(directories: Sequence[str | Path]) -> list[ExportFiles]:
    """Check several exports read together (shards): each as :func:`open_export`, and no graph
    id in more than one of them (InvalidArgument naming up to three ids)."""
    import pyarrow as pa

    if not directories:
        raise InvalidArgument("at least one export directory is needed")
    exports: list[ExportFiles] = []
    ledgers: list[Any] = []
    for directory in directories:
        root = Path(directory)
        if not root.is_dir():
            raise InvalidArgument(f"{root}: export directory not found")
        for name, columns in EXPORT_FILES.items():
            _check_schema(root / name, columns)
        logits = root / LOGITS_FILE
        if logits.exists():
            _check_schema(logits, LOGIT_COLUMNS)
        ids = _read_graph_ids(root / LEDGER_FILE)
        twice = _repeated(ids)
        if twice:
            raise CorruptInput(f"{root / LEDGER_FILE}: graph(s) {', '.join(twice)} listed more than once")
        ledgers.append(ids)
        # Absolute paths: a locked-down DuckDB connection may read exactly these files.
        root = root.resolve()
        exports.append(
            ExportFiles(root=root, edges=root / EDGES_FILE, units=root / UNITS_FILE, ledger=root / LEDGER_FILE,
                        logits=root / LOGITS_FILE if logits.exists() else None, graphs=len(ids))
        )  # fmt: skip
    if len(ledgers) > 1:
        twice = _repeated(pa.chunked_array([c for ids in ledgers for c in ids.chunks], type=pa.string()))
        if twice:
            raise InvalidArgument(
                f"graph(s) {', '.join(twice)} appear in more than one export; reading them together would count them twice"
            )
    return exports


def _check_schema(path: Path, columns: tuple[str, ...]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise CorruptInput(f"{path}: missing from the aggregator export")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise CorruptInput(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())[:160]})") from None
    have = {field.name: field.type for field in schema}
    missing = [c for c in columns if c not in have]
    if missing:
        raise CorruptInput(f"{path}: missing column(s) {', '.join(missing)}")
    for name in columns:
        kind = have[name]
        if name in _INTEGER:
            ok = pa.types.is_integer(kind)
            want = "integers"
        elif name in _TEXT:
            ok = pa.types.is_string(kind) or pa.types.is_large_string(kind)
            want = "strings"
        else:
            ok = pa.types.is_floating(kind) or pa.types.is_integer(kind)
            want = "numbers"
        if not ok:
            raise CorruptInput(f"{path}: column {name} must hold {want}, got {kind}")


def _read_graph_ids(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(path, columns=["graph_id"]).column("graph_id")
    except Exception as exc:  # noqa: BLE001 - a file whose schema reads but whose data do not
        raise CorruptInput(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())[:160]})") from None
    if column.null_count:
        raise CorruptInput(f"{path}: graph_id is empty in {column.null_count} row(s)")
    return column.cast(pa.string())


def _repeated(ids: Any) -> list[str]:
    """Up to three graph ids that occur more than once (sorted), else []."""
    import pyarrow.compute as pc

    if len(ids) < 2 or pc.count_distinct(ids).as_py() == len(ids):
        return []
    counts = pc.value_counts(ids)
    values, freq = counts.field("values"), counts.field("counts")
    repeated = pc.filter(values, pc.greater(freq, 1)).to_pylist()
    return sorted(repeated)[:3]

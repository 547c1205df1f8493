"""Merging Parquet exports of several aggregator shards into one export.

Sums, minima and maxima are associative and shards own disjoint graph sets, so grouping the
union of the partial rows by key gives exactly the statistics of one process that saw every
graph. A graph id present in two inputs would be counted twice, so it is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from circuits_core.aggregator_types import EDGE_COLUMNS, LEDGER_COLUMNS, UNIT_COLUMNS
from circuits_core.errors import CorruptInput, InvalidArgument

from circuits_server.duckdb_files import open_duckdb

from circuits_aggregator.store import _EDGE_MERGE, _UNIT_MERGE, write_parquet_snapshot

_REQUIRED = {"edges.parquet": EDGE_COLUMNS, "units.parquet": UNIT_COLUMNS, "ledger.parquet": LEDGER_COLUMNS}


def merge_exports(inputs: Sequence[str | Path], out: str | Path, *, min_count: int = 1) -> list[Path]:
    """Combine export directories into ``out`` (edges/units/ledger.parquet); return the files.

    Inputs are checked for the three files and their columns (CorruptInput names the file);
    a graph id in more than one input raises InvalidArgument.
    """
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    if not inputs:
        raise InvalidArgument("merge needs at least one export directory")
    if min_count < 0:
        raise InvalidArgument(f"min_count must be >= 0, got {min_count}")
    dirs = [Path(p) for p in inputs]
    files: dict[str, list[str]] = {name: [] for name in _REQUIRED}
    for d in dirs:
        if not d.is_dir():
            raise InvalidArgument(f"{d}: export directory not found")
        for name, columns in _REQUIRED.items():
            path = d / name
            if not path.is_file():
                raise CorruptInput(f"{path}: missing from the export")
            try:
                have = set(pq.read_schema(path).names)
            except Exception as exc:  # noqa: BLE001 - any unreadable Parquet file
                raise CorruptInput(f"{path}: not a readable Parquet file ({exc})") from None
            missing = [c for c in columns if c not in have]
            if missing:
                raise CorruptInput(f"{path}: missing columns {', '.join(missing)}")
            files[name].append(str(path))
    out_dir = Path(out)
    if out_dir.resolve() in {d.resolve() for d in dirs}:
        raise InvalidArgument(f"{out_dir}: the merge output must not be one of its inputs")
    # Inputs reach DuckDB as Arrow datasets (read by pyarrow); SQL itself may touch no file.
    con = open_duckdb(":memory:", read_only=False, what="merge workspace", threads=1)
    con.register("edges_in", ds.dataset(files["edges.parquet"], format="parquet"))
    con.register("units_in", ds.dataset(files["units.parquet"], format="parquet"))
    con.register("ledger_in", ds.dataset(files["ledger.parquet"], format="parquet"))
    twice = con.execute("SELECT graph_id FROM ledger_in GROUP BY graph_id HAVING count(*) > 1 LIMIT 3").fetchall()
    if twice:
        con.close()
        ids = ", ".join(r[0] for r in twice)
        raise InvalidArgument(f"graph(s) {ids} appear in more than one export; merging would count them twice")
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to merge
    queries = {
        "edges.parquet": f"SELECT {', '.join(EDGE_COLUMNS)} FROM ({_EDGE_MERGE.format(source='SELECT * FROM edges_in')}) "
        f"WHERE count >= {max(int(min_count), 1)} ORDER BY src_layer, src_neuron, tgt_layer, tgt_neuron",
        "units.parquet": f"SELECT {', '.join(UNIT_COLUMNS)} FROM ({_UNIT_MERGE.format(source='SELECT * FROM units_in')}) "
        "ORDER BY layer, neuron",
        "ledger.parquet": f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger_in ORDER BY graph_id",
    }
    return write_parquet_snapshot(con, out_dir, queries)

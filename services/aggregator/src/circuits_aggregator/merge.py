"""Merging Parquet exports of several aggregator shards into one export.

Sums, minima and maxima are associative and shards own disjoint graph sets, so grouping the
union of the partial rows by key gives exactly the statistics of one process that saw every
graph. A graph id present in two inputs would be counted twice, so it is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from circuits_core.aggregator_types import EDGE_COLUMNS, LEDGER_COLUMNS, LOGIT_COLUMNS, UNIT_COLUMNS
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
    # Neuron -> logit links: optional (exports written before they existed have none).
    logit_files = []
    for d in dirs:
        path = d / "logits.parquet"
        if path.is_file():
            try:
                have = set(pq.read_schema(path).names)
            except Exception as exc:  # noqa: BLE001 - any unreadable Parquet file
                raise CorruptInput(f"{path}: not a readable Parquet file ({exc})") from None
            missing = [c for c in LOGIT_COLUMNS if c not in have]
            if missing:
                raise CorruptInput(f"{path}: missing columns {', '.join(missing)}")
            logit_files.append(str(path))
    out_dir = Path(out)
    if out_dir.resolve() in {d.resolve() for d in dirs}:
        raise InvalidArgument(f"{out_dir}: the merge output must not be one of its inputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Inputs reach DuckDB as Arrow datasets (read by pyarrow); SQL itself may touch no file.
    con = open_duckdb(":memory:", read_only=False, what="merge workspace", threads=1)
    con.register("edges_in", ds.dataset(files["edges.parquet"], format="parquet"))
    con.register("units_in", ds.dataset(files["units.parquet"], format="parquet"))
    con.register("ledger_in", ds.dataset(files["ledger.parquet"], format="parquet"))
    if logit_files:
        con.register("logits_in", ds.dataset(logit_files, format="parquet"))
    else:
        con.execute("CREATE TEMP TABLE logits_in (src_layer INTEGER, src_neuron INTEGER, token_id BIGINT, token VARCHAR, "
                    "count BIGINT, weight_sum DOUBLE, weight_abs_sum DOUBLE)")
    twice = con.execute("SELECT graph_id FROM ledger_in GROUP BY graph_id HAVING count(*) > 1 LIMIT 3").fetchall()
    if twice:
        con.close()
        ids = ", ".join(r[0] for r in twice)
        raise InvalidArgument(f"graph(s) {ids} appear in more than one export; merging would count them twice")
    queries = {
        "edges.parquet": f"SELECT {', '.join(EDGE_COLUMNS)} FROM ({_EDGE_MERGE.format(source='SELECT * FROM edges_in')}) "
        f"WHERE count >= {max(int(min_count), 1)} ORDER BY src_layer, src_neuron, tgt_layer, tgt_neuron",
        "units.parquet": f"SELECT {', '.join(UNIT_COLUMNS)} FROM ({_UNIT_MERGE.format(source='SELECT * FROM units_in')}) "
        "ORDER BY layer, neuron",
        "ledger.parquet": f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger_in ORDER BY graph_id",
        "logits.parquet": "SELECT src_layer::INTEGER AS src_layer, src_neuron::INTEGER AS src_neuron, token_id::BIGINT AS "
        "token_id, max(token) AS token, sum(count)::BIGINT AS count, sum(weight_sum) AS weight_sum, "
        "sum(weight_abs_sum) AS weight_abs_sum FROM logits_in GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    }
    return write_parquet_snapshot(con, out_dir, queries)

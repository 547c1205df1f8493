"""Merging Parquet exports of several aggregator shards into one export.

Sums, minima and maxima are associative and shards own disjoint graph sets, so grouping the
union of the partial rows by key gives exactly the statistics of one process that saw every
graph. A graph id present in two inputs would be counted twice, so it is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from circuits_core.errors import InvalidArgument
from circuits_core.exports import (
    EDGE_COLUMNS,
    EDGES_FILE,
    LEDGER_COLUMNS,
    LEDGER_FILE,
    LOGIT_COLUMNS,
    LOGITS_FILE,
    UNIT_COLUMNS,
    UNITS_FILE,
    open_exports,
)

from circuits_server.duckdb_files import open_duckdb

from circuits_aggregator.store import _EDGE_MERGE, _UNIT_MERGE, write_parquet_snapshot


def merge_exports(inputs: Sequence[str | Path], out: str | Path, *, min_count: int = 1) -> list[Path]:
    """Combine export directories into ``out`` (edges/units/ledger.parquet); return the files.

    Inputs are checked by :func:`circuits_core.exports.open_exports` (CorruptInput names a bad
    file; a graph id in more than one input raises InvalidArgument).
    """
    import pyarrow.dataset as ds

    if not inputs:
        raise InvalidArgument("merge needs at least one export directory")
    if min_count < 0:
        raise InvalidArgument(f"min_count must be >= 0, got {min_count}")
    exports = open_exports(inputs)
    out_dir = Path(out)
    if out_dir.resolve() in {e.root.resolve() for e in exports}:
        raise InvalidArgument(f"{out_dir}: the merge output must not be one of its inputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Inputs reach DuckDB as Arrow datasets (read by pyarrow); SQL itself may touch no file.
    con = open_duckdb(":memory:", read_only=False, what="merge workspace", threads=1)
    con.register("edges_in", ds.dataset([str(e.edges) for e in exports], format="parquet"))
    con.register("units_in", ds.dataset([str(e.units) for e in exports], format="parquet"))
    con.register("ledger_in", ds.dataset([str(e.ledger) for e in exports], format="parquet"))
    # Neuron -> logit links are optional (exports written before they existed have none).
    logit_files = [str(e.logits) for e in exports if e.logits is not None]
    if logit_files:
        con.register("logits_in", ds.dataset(logit_files, format="parquet"))
    else:
        con.execute("CREATE TEMP TABLE logits_in (src_layer INTEGER, src_neuron INTEGER, token_id BIGINT, token VARCHAR, "
                    "count BIGINT, weight_sum DOUBLE, weight_abs_sum DOUBLE)")
    queries = {
        EDGES_FILE: f"SELECT {', '.join(EDGE_COLUMNS)} FROM ({_EDGE_MERGE.format(source='SELECT * FROM edges_in')}) "
        f"WHERE count >= {max(int(min_count), 1)} ORDER BY src_layer, src_neuron, tgt_layer, tgt_neuron",
        UNITS_FILE: f"SELECT {', '.join(UNIT_COLUMNS)} FROM ({_UNIT_MERGE.format(source='SELECT * FROM units_in')}) "
        "ORDER BY layer, neuron",
        LEDGER_FILE: f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger_in ORDER BY graph_id",
        LOGITS_FILE: f"SELECT {', '.join(LOGIT_COLUMNS)} FROM (SELECT src_layer::INTEGER AS src_layer, "
        "src_neuron::INTEGER AS src_neuron, token_id::BIGINT AS token_id, max(token) AS token, sum(count)::BIGINT AS count, "
        "sum(weight_sum) AS weight_sum, sum(weight_abs_sum) AS weight_abs_sum FROM logits_in GROUP BY 1, 2, 3) "
        "ORDER BY src_layer, src_neuron, token_id",
    }
    return write_parquet_snapshot(con, out_dir, queries)

"""What the labeller knows about each neuron from aggregated attribution graphs.

:class:`NeuronEvidence` is the small read interface the progressive engine needs: the candidate
neurons (with appearance counts and any prior description) and each neuron's strongest
downstream / upstream neighbours by mean edge weight. :class:`DuckDBEvidence` implements it
over either an atlas DuckDB file (``neurons``/``edges`` tables) or aggregator exports: one export
directory, or a directory whose sub-directories are the exports of several shards (merged by
summing: the statistics are associative). Exports are checked by
:func:`circuits_core.exports.open_exports`, like every other export reader. A ``description``
column in ``units.parquet``, when present, is shown to the LLM as a prior description.
:func:`write_evidence_parquet` writes a small evidence export (tests, examples).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from circuits_core.errors import CorruptInput, NotFound
from circuits_core.exports import EDGES_FILE, ExportFiles, open_exports


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitRecord:
    """A candidate neuron: how often it appeared and any label it already had."""

    layer: int
    neuron: int
    appearance_count: int = 0
    #: A prior description (e.g. NeuronDB max-activation label), shown to the LLM as evidence.
    prior_description: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Neighbour:
    """One aggregated edge seen from a neuron: the other end, the mean weight, observations."""

    layer: int
    neuron: int
    mean_weight: float
    count: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.neuron)


@dataclass(frozen=True, slots=True, kw_only=True)
class LogitNeighbour:
    """An aggregated neuron -> logit link seen from the neuron: the token, observations, mean weight."""

    token_id: int
    token: str
    count: int
    mean_weight: float


class NeuronEvidence(Protocol):
    """Read access to aggregated evidence about neurons."""

    def units(self) -> list[UnitRecord]:
        """Every known neuron, sorted by (layer, neuron)."""
        ...

    def max_layer(self) -> int:
        """Largest layer seen in units or edges (-1 when empty)."""
        ...

    def downstream(self, layer: int, *, limit: int) -> dict[int, list[Neighbour]]:
        """For each neuron of ``layer`` with outgoing edges: up to ``limit`` targets by |mean weight|."""
        ...

    def upstream(self, layer: int, *, limit: int) -> dict[int, list[Neighbour]]:
        """For each neuron of ``layer`` with incoming edges: up to ``limit`` sources by |mean weight|."""
        ...

    def logit_links(self, layer: int, *, limit: int) -> dict[int, list[LogitNeighbour]]:
        """For each neuron of ``layer`` with logit links: up to ``limit`` tokens by |mean weight|."""
        ...


class EmptyEvidence:
    """No aggregated evidence: no candidates, no neighbours (projection-only labelling)."""

    def units(self) -> list[UnitRecord]:
        return []

    def max_layer(self) -> int:
        return -1

    def downstream(self, layer: int, *, limit: int) -> dict[int, list[Neighbour]]:
        return {}

    def upstream(self, layer: int, *, limit: int) -> dict[int, list[Neighbour]]:
        return {}

    def logit_links(self, layer: int, *, limit: int) -> dict[int, list[LogitNeighbour]]:
        return {}


def _sql_path(path: Path) -> str:
    # Paths come from the operator's config, never from RPC users; quote for the SQL literal.
    return "'" + str(path).replace("'", "''") + "'"


class DuckDBEvidence:
    """:class:`NeuronEvidence` over an atlas DuckDB file or an aggregator Parquet export.

    The edges are loaded once into an in-memory DuckDB table (``src/tgt`` keys, ``count``,
    ``mean_weight``), keeping only edges with ``count >= min_edge_count``.
    """

    def __init__(self, path: str | Path, *, min_edge_count: int = 1) -> None:
        import duckdb

        from circuits_server.duckdb_files import open_duckdb

        self.path = Path(path)
        if not self.path.exists():
            raise NotFound(f"evidence not found: {self.path}")
        self._lock = threading.Lock()
        is_atlas = self.path.is_file()
        if is_atlas:
            resolved = self.path.resolve()
            readable = [resolved, resolved.with_name(resolved.name + ".wal")]
        else:
            exports = self._exports()
            edge_files, unit_files = [e.edges for e in exports], [e.units for e in exports]
            logit_files = [e.logits for e in exports if e.logits is not None]
            readable = [*edge_files, *unit_files, *logit_files]
        # External access off: SQL reads exactly these files and nothing else.
        self._con = open_duckdb(":memory:", read_only=False, what="evidence", allowed_paths=readable)
        try:
            if is_atlas:
                self._load_atlas(min_edge_count)
            else:
                self._load_parquet(min_edge_count, edge_files, unit_files, logit_files)
        except duckdb.Error as exc:
            raise CorruptInput(f"{self.path}: cannot read evidence ({str(exc).splitlines()[0]})") from None

    def _exports(self) -> list[ExportFiles]:
        """The export at ``path``, or the shard exports in its sub-directories (checked together)."""
        shards = sorted(p for p in self.path.iterdir() if p.is_dir() and (p / EDGES_FILE).exists())
        return open_exports(shards if shards and not (self.path / EDGES_FILE).exists() else [self.path])

    def _load_atlas(self, min_edge_count: int) -> None:
        con = self._con
        con.execute(f"ATTACH {_sql_path(self.path.resolve())} AS atlas (READ_ONLY)")
        kinds = dict(con.execute(
            "SELECT table_name, table_type FROM information_schema.tables "
            "WHERE table_catalog = 'atlas' AND table_schema = 'main' AND table_name IN ('neurons', 'edges')"
        ).fetchall())  # fmt: skip
        not_tables = sorted(name for name, kind in kinds.items() if kind != "BASE TABLE")
        if not_tables:
            raise CorruptInput(f"{self.path}: {', '.join(not_tables)} must be tables, not views (is this an atlas file?)")
        cols = {r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_catalog='atlas' AND table_name='neurons'"
        ).fetchall()}
        if not cols:
            raise CorruptInput(f"{self.path}: no neurons table (is this an atlas file?)")
        desc = "coalesce(description, '')" if "description" in cols else "''"
        appear = "coalesce(appearance_count, 0)" if "appearance_count" in cols else "0"
        con.execute(
            f"CREATE TABLE units AS SELECT layer::INT AS layer, neuron::INT AS neuron, {appear}::BIGINT AS "
            f"appearance_count, {desc} AS prior_description FROM atlas.neurons"
        )
        con.execute(
            "CREATE TABLE edges AS SELECT src_layer::INT AS src_layer, src_neuron::INT AS src_neuron, "
            "tgt_layer::INT AS tgt_layer, tgt_neuron::INT AS tgt_neuron, count::BIGINT AS count, "
            "(weight_sum / greatest(count, 1))::DOUBLE AS mean_weight FROM atlas.edges WHERE count >= ?",
            [min_edge_count],
        )
        tables = {r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_catalog='atlas'").fetchall()}
        if "logit_edges" in tables:
            con.execute(
                "CREATE TABLE logits AS SELECT src_layer::INT AS src_layer, src_neuron::INT AS src_neuron, token_id::BIGINT "
                "AS token_id, token, count::BIGINT AS count, mean_weight::DOUBLE AS mean_weight FROM atlas.logit_edges "
                "WHERE count >= ?", [min_edge_count])
        else:
            self._empty_logits()
        con.execute("DETACH atlas")

    def _load_parquet(self, min_edge_count: int, edge_files: list[Path], unit_files: list[Path],
                      logit_files: list[Path]) -> None:
        con = self._con
        files = "[" + ", ".join(_sql_path(f) for f in edge_files) + "]"
        con.execute(
            "CREATE TABLE edges AS SELECT src_layer::INT AS src_layer, src_neuron::INT AS src_neuron, "
            "tgt_layer::INT AS tgt_layer, tgt_neuron::INT AS tgt_neuron, sum(count)::BIGINT AS count, "
            f"(sum(weight_sum) / greatest(sum(count), 1))::DOUBLE AS mean_weight FROM read_parquet({files}) "
            "GROUP BY ALL HAVING sum(count) >= ?",
            [min_edge_count],
        )
        if logit_files:
            lfiles = "[" + ", ".join(_sql_path(f) for f in logit_files) + "]"
            con.execute(
                "CREATE TABLE logits AS SELECT src_layer::INT AS src_layer, src_neuron::INT AS src_neuron, token_id::BIGINT "
                "AS token_id, max(token) AS token, sum(count)::BIGINT AS count, (sum(weight_sum) / greatest(sum(count), 1))"
                f"::DOUBLE AS mean_weight FROM read_parquet({lfiles}) GROUP BY 1, 2, 3 HAVING sum(count) >= ?",
                [min_edge_count],
            )
        else:
            self._empty_logits()
        ufiles = "[" + ", ".join(_sql_path(f) for f in unit_files) + "]"
        source = f"read_parquet({ufiles}, union_by_name = true)"
        cols = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
        desc = "max(coalesce(description, ''))" if "description" in cols else "''"
        con.execute(
            "CREATE TABLE units AS SELECT layer::INT AS layer, neuron::INT AS neuron, sum(graph_count)::BIGINT AS "
            f"appearance_count, {desc} AS prior_description FROM {source} GROUP BY layer, neuron"
        )

    def _empty_logits(self) -> None:
        self._con.execute("CREATE TABLE logits (src_layer INT, src_neuron INT, token_id BIGINT, token VARCHAR, "
                          "count BIGINT, mean_weight DOUBLE)")

    def logit_links(self, layer: int, *, limit: int) -> dict[int, list[LogitNeighbour]]:
        sql = (
            "SELECT src_neuron, token_id, token, count, mean_weight FROM logits WHERE src_layer = ? "
            "QUALIFY row_number() OVER (PARTITION BY src_neuron ORDER BY abs(mean_weight) DESC, token_id) <= ? "
            "ORDER BY src_neuron, abs(mean_weight) DESC, token_id"
        )
        with self._lock:
            rows = self._con.execute(sql, [layer, limit]).fetchall()
        out: dict[int, list[LogitNeighbour]] = {}
        for neuron, token_id, token, count, weight in rows:
            out.setdefault(int(neuron), []).append(
                LogitNeighbour(token_id=int(token_id), token=token or f"<{token_id}>", count=int(count),
                               mean_weight=float(weight))
            )
        return out

    def units(self) -> list[UnitRecord]:
        with self._lock:
            rows = self._con.execute(
                "SELECT layer, neuron, appearance_count, prior_description FROM units ORDER BY layer, neuron"
            ).fetchall()
        return [UnitRecord(layer=l, neuron=n, appearance_count=int(c), prior_description=d or "") for l, n, c, d in rows]

    def max_layer(self) -> int:
        with self._lock:
            (value,) = self._con.execute(
                "SELECT max(l) FROM (SELECT max(layer) AS l FROM units UNION ALL SELECT max(tgt_layer) FROM edges)"
            ).fetchone()
        return -1 if value is None else int(value)

    def _neighbours(self, layer: int, limit: int, *, own: str, other: str) -> dict[int, list[Neighbour]]:
        sql = (
            f"SELECT {own}_neuron, {other}_layer, {other}_neuron, mean_weight, count FROM edges "
            f"WHERE {own}_layer = ? QUALIFY row_number() OVER (PARTITION BY {own}_neuron "
            f"ORDER BY abs(mean_weight) DESC, {other}_layer, {other}_neuron) <= ? "
            f"ORDER BY {own}_neuron, abs(mean_weight) DESC, {other}_layer, {other}_neuron"
        )
        with self._lock:
            rows = self._con.execute(sql, [layer, limit]).fetchall()
        out: dict[int, list[Neighbour]] = {}
        for neuron, olayer, oneuron, weight, count in rows:
            out.setdefault(int(neuron), []).append(
                Neighbour(layer=int(olayer), neuron=int(oneuron), mean_weight=float(weight), count=int(count))
            )
        return out

    def downstream(self, layer: int, *, limit: int) -> dict[int, list[Neighbour]]:
        return self._neighbours(layer, limit, own="src", other="tgt")

    def upstream(self, layer: int, *, limit: int) -> dict[int, list[Neighbour]]:
        return self._neighbours(layer, limit, own="tgt", other="src")

    def close(self) -> None:
        with self._lock:
            self._con.close()


def write_evidence_parquet(
    directory: str | Path,
    *,
    edges: Iterable[tuple[int, int, int, int, int, float]],
    units: Iterable[tuple[int, int, int]] = (),
    descriptions: Mapping[tuple[int, int], str] | None = None,
) -> Path:
    """Write a complete aggregator export (edges, units, ledger Parquet) into ``directory``.

    ``edges``: ``(src_layer, src_neuron, tgt_layer, tgt_neuron, count, mean_weight)``; the running
    sums are derived as if every observation had the mean weight. ``units``: ``(layer, neuron,
    graph_count)`` (default: every edge endpoint, graph_count 0), with zero activation
    statistics and a ``description`` column when ``descriptions`` is given. The ledger lists
    ``<directory name>-<i>`` for as many graphs as the largest count needs. Returns the directory.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from circuits_core.exports import EDGES_FILE, LEDGER_FILE, UNIT_COLUMNS, UNITS_FILE

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows: Sequence[tuple[int, int, int, int, int, float]] = list(edges)
    cols = list(zip(*rows)) if rows else [[] for _ in range(6)]
    counts = [int(c) for c in cols[4]]
    means = [float(w) for w in cols[5]]
    table = pa.table({
        "src_layer": pa.array(cols[0], pa.int32()),
        "src_neuron": pa.array(cols[1], pa.int32()),
        "tgt_layer": pa.array(cols[2], pa.int32()),
        "tgt_neuron": pa.array(cols[3], pa.int32()),
        "count": pa.array(counts, pa.int64()),
        "weight_sum": pa.array([c * w for c, w in zip(counts, means)], pa.float64()),
        "weight_abs_sum": pa.array([c * abs(w) for c, w in zip(counts, means)], pa.float64()),
        "weight_sq_sum": pa.array([c * w * w for c, w in zip(counts, means)], pa.float64()),
        "weight_min": pa.array(means, pa.float64()),
        "weight_max": pa.array(means, pa.float64()),
    })  # fmt: skip
    pq.write_table(table, directory / EDGES_FILE)
    unit_rows = list(units) or [
        (layer, neuron, 0) for layer, neuron in sorted({(r[0], r[1]) for r in rows} | {(r[2], r[3]) for r in rows})
    ]
    ucols = list(zip(*unit_rows)) if unit_rows else [[] for _ in range(3)]
    graph_counts = [int(g) for g in ucols[2]]
    data = {
        "layer": pa.array(ucols[0], pa.int32()),
        "neuron": pa.array(ucols[1], pa.int32()),
        "graph_count": pa.array(graph_counts, pa.int64()),
        "observation_count": pa.array(graph_counts, pa.int64()),
        **{name: pa.array([0.0] * len(unit_rows), pa.float64()) for name in UNIT_COLUMNS[4:]},
    }
    if descriptions:
        data["description"] = pa.array([descriptions.get((l, n), "") for l, n, _ in unit_rows], pa.string())
    pq.write_table(pa.table(data), directory / UNITS_FILE)
    n_graphs = max([0, *counts, *graph_counts])
    pq.write_table(
        pa.table({
            "graph_id": pa.array([f"{directory.name}-{i}" for i in range(n_graphs)], pa.string()),
            "source": pa.array(["evidence"] * n_graphs, pa.string()),
            "corpus_index": pa.array(list(range(n_graphs)), pa.int64()),
        }),  # fmt: skip
        directory / LEDGER_FILE,
    )
    return directory

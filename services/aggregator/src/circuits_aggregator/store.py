"""The aggregation engine: exactly-once edge and neuron statistics in one DuckDB file.

Tables (relp-spec §F, positions collapsed, neuron -> neuron links only):

* ``ledger(graph_id PRIMARY KEY, source, corpus_index, ingested_at, edge_observations,
  unit_observations)`` - every graph counted, once.
* ``edge_stats`` / ``edge_delta`` (same, keyed by the packed 64-bit key ``k``) - per
  ``(src_layer, src_neuron, tgt_layer, tgt_neuron)``:
  ``count`` (link observations), ``weight_sum``, ``weight_abs_sum``, ``weight_sq_sum``,
  ``weight_min``, ``weight_max``. ``edge_single(k, w)``: partials of edges seen once in their
  batch (count 1; the other statistics are ``w, |w|, w*w, w, w``), read as such.
* ``unit_stats`` / ``unit_delta`` - per ``(layer, neuron)``: ``graph_count`` (graphs it appears
  in, positions deduplicated), ``observation_count`` (nodes), activation and attribution sums,
  sums of squares, min and max (over nodes that carry the value).

Write path (:meth:`AggregateStore.ingest`): a batch of graphs is filtered against the ledger (and
deduplicated within itself), its edges and units are grouped by packed 64-bit keys in numpy
(:func:`group_edges`: a compiled hash group-by; :func:`group_units`: one sort, then segment
reductions), and the partial
sums are appended to ``*_delta`` / ``edge_single`` in the SAME transaction as the ledger rows. A graph is therefore either fully counted and in the ledger, or
neither - a crash at any point followed by a re-send counts it exactly once.

What a graph may hold (every reader checks it before a graph gets here): finite edge weights;
finite activations / attributions / probabilities or none (NaN and +-Inf are refused, never
counted); distinct unit keys (layer, neuron, position) - a duplicate unit is refused. Defined
cases: a neuron at several positions of one graph is one ``graph_count`` and one
``observation_count`` per node; every link is one observation (``count``), so links between the
same two neurons at different positions, and a link listed twice, count once each; a link whose
endpoints are the same neuron (a self-loop, after positions collapse) is the edge
``(L, N) -> (L, N)`` and counted like any other.

Identity and content: the ledger keeps a content fingerprint of every graph
(:func:`~circuits_core.aggregator_types.graph_fingerprint`; sha1 ones of older states are still
compared). A re-sent graph_id with the same content
is a duplicate; with different content it is a *conflict*: not counted, listed in the ack's
``conflict_graph_ids`` and logged. The state records its model (``Graph.model``) and shape
(``num_layers`` / ``d_mlp`` when graphs state them) at first ingest (``meta`` table) and refuses
graphs of another model, another shape, or with neurons outside the shape (InvalidArgument).

Appending partials instead of upserting keeps writes at memory speed (DuckDB's ART upsert runs at
~60k rows/s); :meth:`AggregateStore.compact` folds the deltas into ``*_stats`` (edges: a compiled
hash merge over hash partitions spilled beside the state; units and logits: a ``GROUP BY``; one
transaction) whenever the delta outgrows the compacted table.
Sums, minima and maxima are associative, so every read (``GROUP BY`` over stats UNION ALL delta)
sees exact statistics whatever was compacted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from circuits_core.aggregator_types import (
    AggregatorStats,
    EdgeColumns,
    GraphArrays,
    IngestAck,
    graph_fingerprint,
    same_content,
    shard_of,
)
from circuits_core.errors import FailedPrecondition, InvalidArgument, echo
from circuits_core.exports import (
    EDGE_COLUMNS,
    EDGES_FILE,
    LEDGER_COLUMNS,
    LEDGER_FILE,
    LOGIT_COLUMNS,
    LOGITS_FILE,
    UNIT_COLUMNS,
    UNITS_FILE,
)
from circuits_server.duckdb_files import open_duckdb, refuse_code_objects

from circuits_aggregator._kernels import group_by_key, group_starts, merge_partials, pack_edge_keys_into, split_once

_log = logging.getLogger("circuits.aggregator")
#: meta keys of the model identity recorded at first ingest.
_IDENTITY_KEYS = ("model", "num_layers", "d_mlp")


# Deltas keep the packed key (fewer bytes written per commit); see _EDGE_BATCH_SQL. They are
# stored uncompressed: they live until the next compaction, and choosing a compression for
# columns of random doubles and hashed keys cost ~0.1 ms of CPU per 10k-link graph at each
# commit (~10 % of the store's time) to save ~20 % of their bytes. States created before keep
# their compressed delta tables (CREATE TABLE IF NOT EXISTS); both read the same.
_RAW = "USING COMPRESSION uncompressed"
_EDGE_DELTA_DDL = f"""(
    k BIGINT NOT NULL {_RAW}, count BIGINT NOT NULL {_RAW}, weight_sum DOUBLE NOT NULL {_RAW},
    weight_abs_sum DOUBLE NOT NULL {_RAW}, weight_sq_sum DOUBLE NOT NULL {_RAW}, weight_min DOUBLE NOT NULL {_RAW},
    weight_max DOUBLE NOT NULL {_RAW})"""
# Edges seen once in their batch (most of them): their six statistics follow from the one weight,
# so they are appended as (k, w) - two columns instead of seven - and expanded when read.
_EDGE_SINGLE_DDL = f"(k BIGINT NOT NULL {_RAW}, w DOUBLE NOT NULL {_RAW})"
# The compacted edges. Their statistics are stored uncompressed too: each compaction rewrites the
# table, and compressing five columns of doubles took a quarter of that write (2.8M rows: 1.00 s
# against 0.75 s, for a file 16 % larger); the key columns compress well and cheaply.
_EDGE_DDL = f"""(
    src_layer INTEGER NOT NULL, src_neuron INTEGER NOT NULL, tgt_layer INTEGER NOT NULL, tgt_neuron INTEGER NOT NULL,
    count BIGINT NOT NULL, weight_sum DOUBLE NOT NULL {_RAW}, weight_abs_sum DOUBLE NOT NULL {_RAW},
    weight_sq_sum DOUBLE NOT NULL {_RAW}, weight_min DOUBLE NOT NULL {_RAW}, weight_max DOUBLE NOT NULL {_RAW})"""
_UNIT_DDL = """(
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL, graph_count BIGINT NOT NULL, observation_count BIGINT NOT NULL,
    act_sum DOUBLE NOT NULL, act_sq_sum DOUBLE NOT NULL, act_min DOUBLE, act_max DOUBLE,
    attr_sum DOUBLE NOT NULL, attr_abs_sum DOUBLE NOT NULL, attr_sq_sum DOUBLE NOT NULL, attr_min DOUBLE, attr_max DOUBLE)"""
# Neuron -> logit links, keyed by the packed k = src_layer<<52 | src_neuron<<31 | token_id.
_LOGIT_DDL = """(
    k BIGINT NOT NULL, count BIGINT NOT NULL, weight_sum DOUBLE NOT NULL, weight_abs_sum DOUBLE NOT NULL)"""
#: The tables of appended partials (emptied by each compaction).
_DELTA_TABLES = (("edge_delta", _EDGE_DELTA_DDL), ("edge_single", _EDGE_SINGLE_DDL), ("unit_delta", _UNIT_DDL),
                 ("logit_delta", _LOGIT_DDL))  # fmt: skip
_LEDGER_DDL = """(
    graph_id VARCHAR PRIMARY KEY, source VARCHAR NOT NULL, corpus_index BIGINT NOT NULL,
    ingested_at TIMESTAMP NOT NULL, edge_observations BIGINT NOT NULL, unit_observations BIGINT NOT NULL,
    content_sha VARCHAR)"""

# Packed keys: edge = src_layer<<52 | src_neuron<<31 | tgt_layer<<21 | tgt_neuron (62 bits),
# unit = layer<<21 | neuron. Grouping one BIGINT is ~2x faster than four INTEGER columns.
_N = 2097151  # 2**21 - 1
_L = 1023  # 2**10 - 1
# Batches arrive grouped by key already (see group_edges / group_units): one append each.
_EDGE_BATCH_SQL = "INSERT INTO edge_delta SELECT * FROM batch_edges"
_EDGE_SINGLE_SQL = "INSERT INTO edge_single SELECT * FROM batch_single"
_UNIT_BATCH_SQL = "INSERT INTO unit_delta SELECT * FROM batch_units"

# Grouped by key already (group_by_key).
_LOGIT_BATCH_SQL = "INSERT INTO logit_delta SELECT * FROM batch_logits"
LOGITS_SQL = f"""SELECT (k >> 52)::INTEGER AS src_layer, ((k >> 31) & {_N})::INTEGER AS src_neuron,
       (k & 2147483647)::BIGINT AS token_id, sum(count)::BIGINT AS count, sum(weight_sum) AS weight_sum,
       sum(weight_abs_sum) AS weight_abs_sum
FROM (SELECT * FROM logit_stats UNION ALL SELECT * FROM logit_delta) GROUP BY k"""
LOGIT_EXPORT_SQL = f"""SELECT l.src_layer, l.src_neuron, l.token_id, coalesce(t.token, '') AS token, l.count,
       l.weight_sum, l.weight_abs_sum
FROM ({LOGITS_SQL}) l LEFT JOIN logit_tokens t ON t.token_id = l.token_id"""
_EDGE_MERGE = """SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, sum(count)::BIGINT AS count,
       sum(weight_sum) AS weight_sum, sum(weight_abs_sum) AS weight_abs_sum, sum(weight_sq_sum) AS weight_sq_sum,
       min(weight_min) AS weight_min, max(weight_max) AS weight_max
FROM ({source}) GROUP BY src_layer, src_neuron, tgt_layer, tgt_neuron"""
_UNIT_MERGE = """SELECT layer, neuron, sum(graph_count)::BIGINT AS graph_count,
       sum(observation_count)::BIGINT AS observation_count,
       sum(act_sum) AS act_sum, sum(act_sq_sum) AS act_sq_sum, min(act_min) AS act_min, max(act_max) AS act_max,
       sum(attr_sum) AS attr_sum, sum(attr_abs_sum) AS attr_abs_sum, sum(attr_sq_sum) AS attr_sq_sum,
       min(attr_min) AS attr_min, max(attr_max) AS attr_max
FROM ({source}) GROUP BY layer, neuron"""
# The compacted edges with packed keys, as the deltas hold them.
_EDGE_STATS_PACKED = """SELECT (src_layer::BIGINT << 52) | (src_neuron::BIGINT << 31) | (tgt_layer::BIGINT << 21)
       | tgt_neuron::BIGINT AS k, count, weight_sum, weight_abs_sum, weight_sq_sum, weight_min, weight_max FROM edge_stats"""
EDGES_SQL = f"""SELECT (k >> 52)::INTEGER AS src_layer, ((k >> 31) & {_N})::INTEGER AS src_neuron,
       ((k >> 21) & {_L})::INTEGER AS tgt_layer, (k & {_N})::INTEGER AS tgt_neuron, sum(count)::BIGINT AS count,
       sum(weight_sum) AS weight_sum, sum(weight_abs_sum) AS weight_abs_sum, sum(weight_sq_sum) AS weight_sq_sum,
       min(weight_min) AS weight_min, max(weight_max) AS weight_max
FROM ({_EDGE_STATS_PACKED}
      UNION ALL SELECT * FROM edge_delta
      UNION ALL SELECT k, 1::BIGINT, w, abs(w), w * w, w, w FROM edge_single) GROUP BY k"""
UNITS_SQL = _UNIT_MERGE.format(source="SELECT * FROM unit_stats UNION ALL SELECT * FROM unit_delta")


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestOutcome:
    """An acknowledgement plus what was newly counted."""

    ack: IngestAck
    new_graphs: int = 0
    new_edge_observations: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSettings:
    """How an aggregate store runs."""

    #: This replica's shard (graphs with shard_of(graph_id, shard_count) != shard_index are rejected).
    shard_index: int = 0
    #: Number of aggregator shards.
    shard_count: int = 1
    #: DuckDB threads (1 = one core).
    threads: int = 1
    #: DuckDB memory limit (bounds the process's working set; DuckDB spills beyond it).
    memory_limit: str = "1GB"
    #: Compact deltas when they hold at least this many rows ...
    compact_min_rows: int = 4_000_000
    #: ... and at least this multiple of the compacted table's rows (amortises the rewrite: each
    #: compaction rewrites the compacted rows, so a larger multiple rewrites them less often; reads
    #: group the deltas with them either way). Measured over 4,096 graphs whose edges repeat:
    #: 1.0 -> 3.7 ms CPU per graph (compactions 65 % of it), 4.0 -> 1.9 ms.
    compact_growth: float = 4.0
    #: Most partial edge rows one compaction pass merges in memory (~300 bytes each while merging,
    #: so ~300 MB a pass); larger states are compacted in several passes over hash partitions of the
    #: edge keys (each pass scans the tables once, which costs little next to merging).
    compact_pass_rows: int = 1_000_000

    def __post_init__(self) -> None:
        if self.shard_count < 1:
            raise InvalidArgument(f"shard count must be >= 1, got {self.shard_count}")
        if not 0 <= self.shard_index < self.shard_count:
            raise InvalidArgument(f"shard index must be in 0..{self.shard_count - 1}, got {self.shard_index}")
        if self.threads < 1:
            raise InvalidArgument(f"threads must be >= 1, got {self.threads}")
        if self.compact_pass_rows < 1:
            raise InvalidArgument(f"compact_pass_rows must be >= 1, got {self.compact_pass_rows}")


class AggregateStore:
    """Exactly-once aggregation state in one DuckDB file (``":memory:"`` for a throwaway store).

    Thread-safe: writes are serialised by a lock; reads run on their own cursors against committed
    snapshots.
    """

    def __init__(self, path: str | Path = ":memory:", settings: StoreSettings | None = None) -> None:
        self.settings = settings or StoreSettings()
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = open_duckdb(self.path, read_only=False, what="aggregator state", threads=self.settings.threads,
                                    memory_limit=self.settings.memory_limit)  # fmt: skip
        except InvalidArgument as exc:
            raise FailedPrecondition(str(exc)) from None
        refuse_code_objects(self._con, self.path, what="aggregator state")
        if self.path != ":memory:":  # spill folders of a compaction killed midway (this process holds the file now)
            import shutil

            prefix = _spill_prefix(self.path)
            for leftover in prefix.parent.glob(prefix.name + "*"):
                shutil.rmtree(leftover, ignore_errors=True)
        self._lock = threading.RLock()
        con = self._con
        con.execute(f"CREATE TABLE IF NOT EXISTS ledger {_LEDGER_DDL}")
        con.execute(f"CREATE TABLE IF NOT EXISTS edge_stats {_EDGE_DDL}")
        con.execute(f"CREATE TABLE IF NOT EXISTS unit_stats {_UNIT_DDL}")
        con.execute(f"CREATE TABLE IF NOT EXISTS logit_stats {_LOGIT_DDL}")
        for name, ddl in _DELTA_TABLES:
            con.execute(f"CREATE TABLE IF NOT EXISTS {name} {ddl}")
        con.execute("CREATE TABLE IF NOT EXISTS logit_tokens (token_id BIGINT PRIMARY KEY, token VARCHAR NOT NULL)")
        con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")
        # States written before content fingerprints: their graphs have none (NULL = unknown).
        con.execute("ALTER TABLE ledger ADD COLUMN IF NOT EXISTS content_sha VARCHAR")
        self._check_shard_meta()
        #: Guards _identity, _identity_unsaved and _identity_version, apart from the write lock: the
        #: Ingest reader checks graphs while a batch commits (waiting for it stalled decoding).
        self._identity_lock = threading.Lock()
        self._identity = self._load_identity()
        self._identity_unsaved = False
        self._identity_version = 0  # bumped at each change, so a commit knows what it saved
        self._graphs = con.execute("SELECT count(*) FROM ledger").fetchone()[0]
        #: Token ids logit_tokens names (new names are inserted only for the others).
        self._token_ids: set[int] = {row[0] for row in con.execute("SELECT token_id FROM logit_tokens").fetchall()}
        self._delta_rows = con.execute(
            "SELECT (SELECT count(*) FROM edge_delta) + (SELECT count(*) FROM edge_single) + (SELECT count(*) FROM unit_delta)"
        ).fetchone()[0]
        self._stats_rows = con.execute("SELECT (SELECT count(*) FROM edge_stats) + (SELECT count(*) FROM unit_stats)").fetchone()[0]
        self._compact_retry_at = 0  # after a failed compaction: the partial rows to wait for
        self._closed = False

    def _check_shard_meta(self) -> None:
        want = {"shard_index": str(self.settings.shard_index), "shard_count": str(self.settings.shard_count)}
        have = dict(self._con.execute("SELECT key, value FROM meta").fetchall())
        if not have:
            self._con.executemany("INSERT INTO meta VALUES (?, ?)", list(want.items()))
            return
        if any(have.get(k) != v for k, v in want.items()):
            raise FailedPrecondition(
                f"{self.path}: state belongs to shard {have.get('shard_index')} of {have.get('shard_count')}, "
                f"not shard {want['shard_index']} of {want['shard_count']}"
            )

    def _load_identity(self) -> dict[str, str] | None:
        have = dict(self._con.execute("SELECT key, value FROM meta").fetchall())
        if "model" not in have:
            return None
        return {k: have.get(k, "0") for k in _IDENTITY_KEYS}

    @property
    def identity(self) -> dict[str, str] | None:
        """The model and shape this state counts (None before the first graph)."""
        with self._identity_lock:
            return None if self._identity is None else dict(self._identity)

    def check_graph(self, g: GraphArrays) -> None:
        """Refuse (InvalidArgument) a graph of another model or shape than this state's, or with
        neurons outside the recorded shape; the first graph ever checked sets the identity
        (saved with the next commit)."""
        where = g.source if g.source and g.source != "grpc" else (g.graph_id or "graph")
        with self._identity_lock:
            ident = self._identity
            if ident is None:
                self._identity = {"model": g.model, "num_layers": str(g.num_layers), "d_mlp": str(g.d_mlp)}
                self._identity_unsaved = True
                self._identity_version += 1
                return
            if g.model != ident["model"]:
                raise InvalidArgument(
                    f"{echo(where, quote=False)}: graph of model {echo(g.model)}, but this aggregator state counts "
                    f"model {echo(ident['model'])} (one state per model; use another state file)"
                )
            for key, stated in (("num_layers", g.num_layers), ("d_mlp", g.d_mlp)):
                known = int(ident[key])
                if stated and known and stated != known:
                    raise InvalidArgument(
                        f"{echo(where, quote=False)}: graph states {key}={stated}, but this aggregator state "
                        f"recorded {key}={known} for model {echo(ident['model'])}"
                    )
                if stated and not known:
                    ident[key] = str(stated)
                    self._identity_unsaved = True
                    self._identity_version += 1
            layers, width = int(ident["num_layers"]), int(ident["d_mlp"])
            if g.n_units:
                if layers and int(g.unit_layer.max()) >= layers:
                    raise InvalidArgument(f"{echo(where, quote=False)}: neuron layer {int(g.unit_layer.max())} is beyond "
                                          f"the model's {layers} layers")  # fmt: skip
                if width and int(g.unit_neuron.max()) >= width:
                    raise InvalidArgument(f"{echo(where, quote=False)}: neuron index {int(g.unit_neuron.max())} is beyond "
                                          f"the model's MLP width {width}")  # fmt: skip

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._con.close()

    def __enter__(self) -> AggregateStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writes
    @property
    def graphs_total(self) -> int:
        return self._graphs

    def owns(self, graph_id: str) -> bool:
        """Whether this shard counts ``graph_id``."""
        return self.settings.shard_count == 1 or shard_of(graph_id, self.settings.shard_count) == self.settings.shard_index

    def ingest(self, graphs: Sequence[GraphArrays]) -> IngestAck:
        """See :meth:`ingest_batch`; returns only the acknowledgement."""
        return self.ingest_batch(graphs).ack

    def ingest_batch(self, graphs: Sequence[GraphArrays]) -> IngestOutcome:
        """Count the graphs this shard owns and has not counted yet, in one transaction.

        Returns once the transaction is committed (durable in the DuckDB WAL). Graphs another
        shard owns are returned in ``rejected_graph_ids``; a graph already in the ledger (or
        repeated within the batch) is acknowledged and counted in ``duplicates``.
        """
        for g in graphs:
            if not g.graph_id:
                raise InvalidArgument(f"{g.source or 'graph'}: graph_id is empty (it is the exactly-once identity)")
        owned: dict[str, GraphArrays] = {}
        prints: dict[str, str] = {}
        rejected: list[str] = []
        conflicts: list[str] = []
        repeats = 0
        for g in graphs:
            if not self.owns(g.graph_id):
                rejected.append(g.graph_id)
                continue
            self.check_graph(g)
            fingerprint = graph_fingerprint(g)
            if g.graph_id in owned:
                if prints[g.graph_id] == fingerprint:
                    repeats += 1
                else:
                    conflicts.append(g.graph_id)
            else:
                owned[g.graph_id] = g
                prints[g.graph_id] = fingerprint
        if not owned:
            return IngestOutcome(
                ack=IngestAck(duplicates=repeats, graphs_total=self._graphs, rejected_graph_ids=tuple(rejected),
                              conflict_graph_ids=tuple(conflicts))  # fmt: skip
            )
        with self._lock:
            if self._closed:
                raise FailedPrecondition("aggregator store is closed")
            con = self._con
            ids = pa.table({"graph_id": pa.array(list(owned), type=pa.string())})
            con.register("batch_ids", ids)
            try:
                known = dict(con.execute(
                    "SELECT graph_id, content_sha FROM ledger WHERE graph_id IN (SELECT graph_id FROM batch_ids)"
                ).fetchall())  # fmt: skip
            finally:
                con.unregister("batch_ids")
            new = [g for gid, g in owned.items() if gid not in known]
            duplicates = repeats
            for gid, sha in known.items():
                if same_content(sha, owned[gid], prints[gid]):  # NULL: counted before fingerprints were kept
                    duplicates += 1
                else:
                    conflicts.append(gid)
            if new or self._identity_unsaved:
                self._commit(new, [prints[g.graph_id] for g in new])
                self._graphs += len(new)
                if self._should_compact():
                    self._compact_after_commit()
            for gid in conflicts:
                _log.warning("graph_id %s re-sent with different content (conflict): not counted again; "
                             "the first content stays counted", echo(gid))  # fmt: skip
            ack = IngestAck(
                graph_ids=tuple(owned),
                duplicates=duplicates,
                graphs_total=self._graphs,
                rejected_graph_ids=tuple(rejected),
                conflict_graph_ids=tuple(dict.fromkeys(conflicts)),
            )
            return IngestOutcome(
                ack=ack, new_graphs=len(new), new_edge_observations=sum(g.n_edges for g in new)
            )

    def _commit(self, new: list[GraphArrays], fingerprints: list[str]) -> None:
        n_edges = np.array([g.n_edges for g in new], dtype=np.int64)
        n_units = np.array([g.n_units for g in new], dtype=np.int64)
        ledger = pa.table({
            "graph_id": pa.array([g.graph_id for g in new], type=pa.string()),
            "source": pa.array([g.source for g in new], type=pa.string()),
            "corpus_index": pa.array([g.corpus_index for g in new], type=pa.int64()),
            "edge_observations": pa.array(n_edges),
            "unit_observations": pa.array(n_units),
            "content_sha": pa.array(fingerprints, type=pa.string()),
        })  # fmt: skip
        if not new:
            self._save_identity()
            return
        keys = np.empty(int(n_edges.sum()), dtype=np.int64)
        at = 0
        for g in new:  # packed straight into one column (no per-field concatenation)
            pack_edge_keys_into(g.edge_src_layer, g.edge_src_neuron, g.edge_tgt_layer, g.edge_tgt_neuron, keys, at)
            at += g.n_edges
        edges, single = group_edge_keys(keys, np.concatenate([g.edge_weight for g in new]))
        unit_key = (np.concatenate([g.unit_layer for g in new]).astype(np.int64) << 21) | np.concatenate(
            [g.unit_neuron for g in new]
        ).astype(np.int64)
        units = group_units(
            unit_key,
            np.repeat(np.arange(len(new), dtype=np.int64), n_units),
            np.concatenate([g.unit_activation for g in new]),
            np.concatenate([g.unit_attribution for g in new]),
        )
        logit_parts = [g for g in new if g.n_logit_links]
        logits = None
        if logit_parts:
            groups, k, count, total, absolute, *_ = group_by_key(
                (np.concatenate([g.logit_src_layer for g in logit_parts]).astype(np.int64) << 52)
                | (np.concatenate([g.logit_src_neuron for g in logit_parts]).astype(np.int64) << 31)
                | np.concatenate([g.logit_token_id for g in logit_parts]).astype(np.int64),
                np.ascontiguousarray(np.concatenate([g.logit_weight for g in logit_parts]), dtype=np.float64),
            )
            logits = pa.table({"k": k[:groups], "count": count[:groups], "weight_sum": total[:groups],
                               "weight_abs_sum": absolute[:groups]})  # fmt: skip
        # Token strings of token ids this state has not named yet (the first name stays).
        names = {tid: token for g in new for tid, token in g.logit_tokens if tid not in self._token_ids}
        token_names = pa.table({"token_id": pa.array(list(names), pa.int64()), "token": pa.array(list(names.values()), pa.string())})
        con = self._con
        con.register("batch_ledger", ledger)
        con.register("batch_edges", edges)
        con.register("batch_single", single)
        con.register("batch_units", units)
        con.register("batch_tokens", token_names)
        if logits is not None:
            con.register("batch_logits", logits)
        with self._identity_lock:
            identity = dict(self._identity) if self._identity_unsaved and self._identity is not None else None
            version = self._identity_version
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                # The PRIMARY KEY makes a double count impossible even if the filter above raced.
                con.execute(
                    "INSERT INTO ledger SELECT graph_id, source, corpus_index, now()::TIMESTAMP, "
                    "edge_observations, unit_observations, content_sha FROM batch_ledger"
                )
                if identity is not None:
                    self._write_identity(identity)
                if edges.num_rows:
                    con.execute(_EDGE_BATCH_SQL)
                if single.num_rows:
                    con.execute(_EDGE_SINGLE_SQL)
                if units.num_rows:
                    con.execute(_UNIT_BATCH_SQL)
                if logits is not None:
                    con.execute(_LOGIT_BATCH_SQL)
                if names:
                    con.execute("INSERT INTO logit_tokens SELECT * FROM batch_tokens ON CONFLICT DO NOTHING")
                con.execute("COMMIT")
                self._identity_saved(version)
                self._token_ids.update(names)
            except BaseException:
                con.execute("ROLLBACK")
                with self._identity_lock:
                    if self._identity_version == version:  # else graphs checked since hold newer knowledge
                        self._identity = self._load_identity()
                        self._identity_unsaved = False
                raise
        finally:
            for name in ("batch_ledger", "batch_edges", "batch_single", "batch_units", "batch_tokens", "batch_logits"):
                try:
                    con.unregister(name)
                except Exception:  # noqa: BLE001 - batch_logits is registered only when present
                    pass
        self._delta_rows += edges.num_rows + single.num_rows + units.num_rows

    def _identity_saved(self, version: int) -> None:
        """The identity as of ``version`` is committed: unsaved only if it changed since."""
        with self._identity_lock:
            if self._identity_version == version:
                self._identity_unsaved = False

    def _write_identity(self, identity: dict[str, str]) -> None:
        self._con.executemany(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(k, identity[k]) for k in _IDENTITY_KEYS],
        )

    def _save_identity(self) -> None:
        """Persist an identity learned from graphs that were all duplicates (nothing else to commit)."""
        with self._identity_lock:
            if not self._identity_unsaved or self._identity is None:
                return
            identity, version = dict(self._identity), self._identity_version
        self._write_identity(identity)
        self._identity_saved(version)

    def _should_compact(self) -> bool:
        s = self.settings
        return (self._delta_rows >= s.compact_min_rows and self._delta_rows >= s.compact_growth * self._stats_rows
                and self._delta_rows >= self._compact_retry_at)  # fmt: skip

    def _compact_after_commit(self) -> None:
        """Compact after a batch committed. A failure (no disk left for the spill, DuckDB out of
        memory) is logged, not raised: the batch is counted and its ack must say so, reads stay
        exact over the uncompacted rows, and the next attempt waits until another
        ``compact_min_rows`` partial rows arrived."""
        try:
            self.compact()
        except (duckdb.Error, OSError, MemoryError) as exc:
            self._compact_retry_at = self._delta_rows + self.settings.compact_min_rows
            _log.error(
                "compaction failed, rolled back (the graphs are counted; reads stay exact; next attempt after "
                "%d more partial rows): %s", self.settings.compact_min_rows, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )  # fmt: skip

    def compact(self) -> None:
        """Fold ``*_delta`` into ``*_stats`` atomically (statistics unchanged, fewer rows)."""
        with self._lock:
            con = self._con
            con.execute("BEGIN TRANSACTION")
            try:
                self._compact_edges(con)
                con.execute("CREATE TABLE unit_stats_new AS " + UNITS_SQL)
                con.execute("CREATE TABLE logit_stats_new AS SELECT k, sum(count)::BIGINT AS count, sum(weight_sum) AS "
                            "weight_sum, sum(weight_abs_sum) AS weight_abs_sum FROM (SELECT * FROM logit_stats UNION ALL "
                            "SELECT * FROM logit_delta) GROUP BY k")
                for kind in ("edge", "unit", "logit"):
                    con.execute(f"DROP TABLE {kind}_stats")
                    con.execute(f"ALTER TABLE {kind}_stats_new RENAME TO {kind}_stats")
                # Emptied by replacing them: deleting millions of rows one by one cost ~0.15 s.
                for name, ddl in _DELTA_TABLES:
                    con.execute(f"DROP TABLE {name}")
                    con.execute(f"CREATE TABLE {name} {ddl}")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            self._stats_rows = con.execute(
                "SELECT (SELECT count(*) FROM edge_stats) + (SELECT count(*) FROM unit_stats)"
            ).fetchone()[0]
            self._delta_rows = 0
            self._compact_retry_at = 0
            con.execute("CHECKPOINT")

    def _compact_edges(self, con: duckdb.DuckDBPyConnection) -> None:
        """``edge_stats_new``: the edge partials of every table merged per edge by the compiled
        :func:`~circuits_aggregator._kernels.merge_partials` (a DuckDB ``GROUP BY`` of the same rows
        took ~2x longer on one thread).

        The tables are read once, as a stream. When they hold more than ``compact_pass_rows``
        rows (StoreSettings), the stream is split by a hash of the edge key into partitions of
        about that many rows, spilled to files beside the state, and each partition is merged on
        its own, so the memory a compaction takes does not grow with the state. (Filtering the
        tables once per partition instead cost a full scan per pass: quadratic in the state.)
        Each edge's rows are merged in table order (compacted, then partials in commit order)
        however many partitions there are, so the statistics do not depend on the partitioning.
        """
        con.execute(f"CREATE TABLE edge_stats_new {_EDGE_DDL}")
        rows = con.execute(
            "SELECT (SELECT count(*) FROM edge_stats) + (SELECT count(*) FROM edge_delta) + (SELECT count(*) FROM edge_single)"
        ).fetchone()[0]
        if not rows:
            return
        parts = _partitions(rows, self.settings.compact_pass_rows)
        spill = _Spill(parts, None if self.path == ":memory:" else _spill_prefix(self.path))
        try:
            for sql in (f"SELECT * FROM ({_EDGE_STATS_PACKED})", "SELECT * FROM edge_delta", "SELECT * FROM edge_single"):
                reader = con.execute(sql).fetch_record_batch(_COMPACT_READ_ROWS)
                for batch in reader:
                    spill.add(_partial_columns(batch))
            for part in range(parts):
                columns = spill.take(part)
                if columns is None:
                    continue
                groups, k, count, total, absolute, square, low, high = merge_partials(*columns)
                if not groups:
                    continue
                k = k[:groups]
                table = pa.table({
                    "src_layer": (k >> 52).astype(np.int32), "src_neuron": ((k >> 31) & _N).astype(np.int32),
                    "tgt_layer": ((k >> 21) & _L).astype(np.int32), "tgt_neuron": (k & _N).astype(np.int32),
                    "count": count[:groups], "weight_sum": total[:groups], "weight_abs_sum": absolute[:groups],
                    "weight_sq_sum": square[:groups], "weight_min": low[:groups], "weight_max": high[:groups],
                })  # fmt: skip
                con.register("compacted_edges", table)
                try:
                    con.execute("INSERT INTO edge_stats_new SELECT * FROM compacted_edges")
                finally:
                    con.unregister("compacted_edges")
        finally:
            spill.close()

    # ------------------------------------------------------------------ reads
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            if self._closed:
                raise FailedPrecondition("aggregator store is closed")
            return self._con.cursor()

    def stats(self) -> AggregatorStats:
        """Counters from one consistent snapshot."""
        cur = self._cursor()
        try:
            cur.execute("BEGIN TRANSACTION")  # one snapshot: a batch committed meanwhile is in all counts or none
            graphs, observations = cur.execute(
                "SELECT count(*), coalesce(sum(edge_observations), 0)::BIGINT FROM ledger"
            ).fetchone()
            distinct_edges = cur.execute(f"SELECT count(*) FROM ({EDGES_SQL})").fetchone()[0]
            distinct_units = cur.execute(f"SELECT count(*) FROM ({UNITS_SQL})").fetchone()[0]
            cur.execute("COMMIT")
        finally:
            cur.close()
        return AggregatorStats(
            graphs_processed=int(graphs),
            total_edge_observations=int(observations),
            distinct_edges=int(distinct_edges),
            distinct_units=int(distinct_units),
            shard_index=self.settings.shard_index,
            shard_count=self.settings.shard_count,
        )

    def iter_edge_columns(self, *, min_count: int = 1, limit: int = 0, batch_size: int = 65536) -> Iterator[EdgeColumns]:
        """Aggregated edges with ``count >= min_count``, most observed first (ties by key), in batches."""
        if min_count < 0 or limit < 0 or batch_size < 0:
            raise InvalidArgument("min_count, limit and batch_size must be >= 0")
        batch_size = batch_size or 65536
        sql = (
            f"SELECT * FROM ({EDGES_SQL}) WHERE count >= ? "
            "ORDER BY count DESC, src_layer, src_neuron, tgt_layer, tgt_neuron"
            + (f" LIMIT {int(limit)}" if limit else "")
        )
        cur = self._cursor()
        try:
            reader = cur.execute(sql, [max(min_count, 1)]).fetch_record_batch(batch_size)
            for batch in reader:
                if batch.num_rows:
                    yield EdgeColumns(**{name: batch.column(name).to_numpy(zero_copy_only=False) for name in EDGE_COLUMNS})
        finally:
            cur.close()

    def edge_columns(self, *, min_count: int = 1, limit: int = 0) -> EdgeColumns:
        """All matching edges as one EdgeColumns (see iter_edge_columns)."""
        parts = list(self.iter_edge_columns(min_count=min_count, limit=limit, batch_size=1 << 20))
        if not parts:
            empty = {n: np.zeros(0, dtype=np.int32 if i < 4 else (np.int64 if i == 4 else np.float64))
                     for i, n in enumerate(EDGE_COLUMNS)}  # fmt: skip
            return EdgeColumns(**empty)
        return EdgeColumns(**{n: np.concatenate([getattr(p, n) for p in parts]) for n in EDGE_COLUMNS})

    def unit_table(self) -> pa.Table:
        """Per-neuron statistics (columns UNIT_COLUMNS), ordered by layer, neuron."""
        cur = self._cursor()
        try:
            return cur.execute(f"SELECT * FROM ({UNITS_SQL}) ORDER BY layer, neuron").fetch_arrow_table()
        finally:
            cur.close()

    def known_sources(self, sources: Sequence[str]) -> set[str]:
        """Which of ``sources`` are already in the ledger (resume by file name)."""
        if not sources:
            return set()
        cur = self._cursor()
        try:
            cur.register("probe", pa.table({"source": pa.array(list(sources), type=pa.string())}))
            return {r[0] for r in cur.execute("SELECT DISTINCT source FROM ledger WHERE source IN (SELECT source FROM probe)").fetchall()}
        finally:
            cur.close()

    def export(self, directory: str | Path, *, min_count: int = 1) -> list[Path]:
        """Write edges.parquet, units.parquet and ledger.parquet from one consistent snapshot.

        Files are written under temporary names and renamed into place, so a reader never sees a
        half-written file. ``min_count`` filters edges (keep 1 for partials that will be merged).
        """
        if not str(directory):
            raise InvalidArgument("export directory must not be empty")
        if min_count < 0:
            raise InvalidArgument(f"min_count must be >= 0, got {min_count}")
        out = Path(directory)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidArgument(f"{echo(str(out), quote=False)}: cannot create export directory ({exc.strerror or exc})") from None
        queries = {
            EDGES_FILE: f"SELECT {', '.join(EDGE_COLUMNS)} FROM ({EDGES_SQL}) WHERE count >= {max(int(min_count), 1)} "
            "ORDER BY src_layer, src_neuron, tgt_layer, tgt_neuron",
            UNITS_FILE: f"SELECT {', '.join(UNIT_COLUMNS)} FROM ({UNITS_SQL}) ORDER BY layer, neuron",
            LEDGER_FILE: f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger ORDER BY graph_id",
            LOGITS_FILE: f"SELECT {', '.join(LOGIT_COLUMNS)} FROM ({LOGIT_EXPORT_SQL}) "
            "ORDER BY src_layer, src_neuron, token_id",
        }
        return write_parquet_snapshot(self._cursor(), out, queries)

    def logit_table(self) -> pa.Table:
        """Aggregated neuron -> logit links (columns LOGIT_COLUMNS), ordered by source, token."""
        cur = self._cursor()
        try:
            return cur.execute(
                f"SELECT {', '.join(LOGIT_COLUMNS)} FROM ({LOGIT_EXPORT_SQL}) ORDER BY src_layer, src_neuron, token_id"
            ).fetch_arrow_table()
        finally:
            cur.close()


#: The columns of edge partials (edge_delta's), as a compaction merges and spills them.
_PARTIAL_COLUMNS = ("k", "count", "weight_sum", "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max")
#: Rows a compaction reads from DuckDB at a time.
_COMPACT_READ_ROWS = 1 << 20
#: Most hash partitions of one compaction (each then holds more than compact_pass_rows rows).
_MAX_PARTITIONS = 1024


def _partitions(rows: int, pass_rows: int) -> int:
    """Hash partitions (a power of two) for ``rows`` partial rows merged ``pass_rows`` at a time."""
    parts = 1
    while parts * pass_rows < rows and parts < _MAX_PARTITIONS:
        parts *= 2
    return parts


def _partial_columns(batch: pa.RecordBatch) -> list[np.ndarray]:
    """A record batch of edge_stats (packed), edge_delta or edge_single rows as the seven partial
    columns (an edge_single row ``(k, w)`` is one observation of weight ``w``)."""
    columns = dict(zip(batch.schema.names, batch.columns))
    k = columns["k"].to_numpy()
    if "w" in columns:
        w = columns["w"].to_numpy()
        return [k, np.ones(w.shape[0], dtype=np.int64), w, np.abs(w), w * w, w, w]
    return [k, *(columns[name].to_numpy() for name in _PARTIAL_COLUMNS[1:])]


def _spill_prefix(state: str) -> Path:
    """Where compactions of the state file ``state`` spill: folders ``.<state name>.compaction-*``
    beside it (a store removes those left by a killed process when it opens the state)."""
    path = Path(state)
    return path.parent / f".{path.name}.compaction-"


class _Spill:
    """Partial rows split by a hash of their key into ``parts`` partitions, in arrival order
    within each: kept in memory when there is one partition, else appended column by column to
    one file per partition in a new folder named ``prefix`` + a random suffix (None: in the
    system's temp folder, for an in-memory state), removed by :meth:`close`."""

    def __init__(self, parts: int, prefix: Path | None) -> None:
        import tempfile

        self.parts = parts
        self._held: list[list[np.ndarray]] = []
        self._dir = None
        if parts > 1:
            folder, name = (None, ".compaction-") if prefix is None else (prefix.parent, prefix.name)
            self._dir = Path(tempfile.mkdtemp(prefix=name, dir=folder))
        self._shift = np.uint64(64 - (parts.bit_length() - 1))

    def _path(self, part: int) -> Path:
        assert self._dir is not None
        return self._dir / f"part-{part:05d}.bin"

    def add(self, columns: list[np.ndarray]) -> None:
        if self.parts == 1:
            self._held.append(columns)
            return
        part = ((columns[0].view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> self._shift).astype(np.uint16)
        order = np.argsort(part, kind="stable")  # a radix sort; rows keep their order within a partition
        bounds = np.searchsorted(part[order], np.arange(self.parts + 1, dtype=np.uint16))
        ordered = [np.ascontiguousarray(column[order]) for column in columns]
        for p in np.flatnonzero(np.diff(bounds)).tolist():
            lo, hi = int(bounds[p]), int(bounds[p + 1])
            with open(self._path(p), "ab") as fh:  # a block: its row count, then each column
                fh.write((hi - lo).to_bytes(8, "little"))
                for column in ordered:
                    fh.write(memoryview(column[lo:hi]).cast("B"))

    def take(self, part: int) -> list[np.ndarray] | None:
        """Partition ``part``'s columns (None when it has no rows); its file is removed."""
        if self.parts == 1:
            held, self._held = self._held, []
            return [np.concatenate(cols) for cols in zip(*held)] if held else None
        path = self._path(part)
        if not path.exists():
            return None
        data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.empty(0, np.uint8)
        blocks: list[list[np.ndarray]] = []
        at = 0
        while at < len(data):
            n = int(data[at:at + 8].view("<i8")[0])
            at += 8
            blocks.append([np.frombuffer(data, dtype=np.int64 if i < 2 else np.float64, count=n, offset=at + i * 8 * n)
                           for i in range(len(_PARTIAL_COLUMNS))])  # fmt: skip
            at += 8 * n * len(_PARTIAL_COLUMNS)
        columns = [np.concatenate(cols) for cols in zip(*blocks)]  # copies out of the mapped file
        del blocks, data
        path.unlink()
        return columns

    def close(self) -> None:
        self._held = []
        if self._dir is not None:
            import shutil

            shutil.rmtree(self._dir, ignore_errors=True)


def group_edges(src_layer: np.ndarray, src_neuron: np.ndarray, tgt_layer: np.ndarray, tgt_neuron: np.ndarray,
                weight: np.ndarray) -> tuple[pa.Table, pa.Table]:  # fmt: skip
    """Per edge ``(src_layer, src_neuron) -> (tgt_layer, tgt_neuron)``: the edge_delta columns
    ``k, count, weight_sum, weight_abs_sum, weight_sq_sum, weight_min, weight_max`` of the link
    observations (row i = one link of weight ``weight[i]``) for the edges seen more than once, and
    ``k, w`` (the edge_single columns) for those seen once; edges in order of first appearance."""
    keys = np.empty(weight.shape[0], dtype=np.int64)
    pack_edge_keys_into(src_layer, src_neuron, tgt_layer, tgt_neuron, keys, 0)
    return group_edge_keys(keys, weight)


def group_edge_keys(keys: np.ndarray, weight: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """:func:`group_edges` of packed edge keys.

    A compiled hash group-by (:func:`circuits_aggregator._kernels.group_by_key`), so DuckDB
    receives each batch already grouped and only appends it (a DuckDB ``GROUP BY`` on one thread
    was ~3x slower than even the numpy sort this replaced).
    """
    if not weight.shape[0]:
        return (pa.table({name: pa.array([], type=t) for name, t in _EDGE_DELTA_TYPES}),
                pa.table({"k": pa.array([], pa.int64()), "w": pa.array([], pa.float64())}))  # fmt: skip
    single_k, single_w, *many = split_once(*group_by_key(keys, np.ascontiguousarray(weight, dtype=np.float64)))
    return (pa.table(dict(zip(_PARTIAL_COLUMNS, many))), pa.table({"k": single_k, "w": single_w}))


_EDGE_DELTA_TYPES = (("k", pa.int64()), ("count", pa.int64()), ("weight_sum", pa.float64()),
                     ("weight_abs_sum", pa.float64()), ("weight_sq_sum", pa.float64()),
                     ("weight_min", pa.float64()), ("weight_max", pa.float64()))  # fmt: skip


def group_units(key: np.ndarray, graph: np.ndarray, act: np.ndarray, attr: np.ndarray) -> pa.Table:
    """Per packed unit key (``layer << 21 | neuron``): the unit_delta columns of the node rows
    ``(key[i], graph[i], act[i], attr[i])``; ``graph`` is non-decreasing (rows in graph order),
    NaN = a missing value (not counted in sums; min/max NULL when every value is missing)."""
    if not key.shape[0]:
        return pa.table({
            "layer": pa.array([], pa.int32()), "neuron": pa.array([], pa.int32()),
            **{n: pa.array([], pa.int64()) for n in ("graph_count", "observation_count")},
            **{n: pa.array([], pa.float64()) for n in ("act_sum", "act_sq_sum", "act_min", "act_max", "attr_sum",
                                                      "attr_abs_sum", "attr_sq_sum", "attr_min", "attr_max")},
        })  # fmt: skip
    order = np.argsort(key, kind="stable")  # stable: graph stays sorted within each key
    k = key[order]
    g = graph[order]
    starts = group_starts(k)
    new_graph = np.empty(k.shape[0], dtype=np.int64)
    new_graph[0] = 1
    new_graph[1:] = (k[1:] != k[:-1]) | (g[1:] != g[:-1])
    columns: dict[str, np.ndarray | pa.Array] = {
        "layer": (k[starts] >> 21).astype(np.int32),
        "neuron": (k[starts] & _N).astype(np.int32),
        "graph_count": np.add.reduceat(new_graph, starts),
        "observation_count": np.diff(np.append(starts, k.shape[0])).astype(np.int64, copy=False),
    }
    for prefix, values, with_abs in (("act", act[order], False), ("attr", attr[order], True)):
        missing = np.isnan(values)
        zeroed = np.where(missing, 0.0, values)
        columns[f"{prefix}_sum"] = np.add.reduceat(zeroed, starts)
        if with_abs:
            columns[f"{prefix}_abs_sum"] = np.add.reduceat(np.abs(zeroed), starts)
        columns[f"{prefix}_sq_sum"] = np.add.reduceat(zeroed * zeroed, starts)
        none = np.logical_and.reduceat(missing, starts)
        for name, ufunc in (("min", np.fmin), ("max", np.fmax)):  # fmin/fmax skip NaN
            columns[f"{prefix}_{name}"] = pa.array(ufunc.reduceat(values, starts), mask=none)
    return pa.table({name: columns[name] for name in _UNIT_DELTA_COLUMNS})


_UNIT_DELTA_COLUMNS = ("layer", "neuron", "graph_count", "observation_count", "act_sum", "act_sq_sum", "act_min",
                       "act_max", "attr_sum", "attr_abs_sum", "attr_sq_sum", "attr_min", "attr_max")  # fmt: skip


def write_parquet_snapshot(cur: duckdb.DuckDBPyConnection, out: Path, queries: dict[str, str]) -> list[Path]:
    """Run each query in one read transaction; stream its rows to ``out/<name>`` (Parquet, zstd).

    Each file is written under a temporary name and renamed into place afterwards, so readers
    never see a half-written file. Paths never enter SQL.
    """
    import pyarrow.parquet as pq

    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    written: list[tuple[Path, Path]] = []
    try:
        cur.execute("BEGIN TRANSACTION")
        for name, sql in queries.items():
            tmp = out / f".{name}.{stamp}.tmp"
            written.append((tmp, out / name))
            reader = cur.execute(sql).fetch_record_batch(1 << 18)
            with pq.ParquetWriter(tmp, reader.schema, compression="zstd") as writer:
                for batch in reader:
                    writer.write_batch(batch)
        cur.execute("COMMIT")
    except (duckdb.Error, OSError) as exc:
        for tmp, _final in written:
            tmp.unlink(missing_ok=True)
        raise InvalidArgument(f"{echo(str(out), quote=False)}: export failed ({echo(str(exc), 300, quote=False)})") from None
    finally:
        cur.close()
    for tmp, final in written:
        os.replace(tmp, final)
    return [final for _tmp, final in written]

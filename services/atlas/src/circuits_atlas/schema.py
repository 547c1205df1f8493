"""The atlas schema: what ``circuits build-db`` creates, and the check that a file holds exactly that.

Every atlas object (tables, the full-text index's tables and macros, indexes) is created by
:func:`create_schema` / :func:`build_fts_index`, which the build uses. :func:`verify_atlas`
compares a file's whole catalog (``circuits_server.duckdb_files.catalog_entries``: schemas,
tables, views, macros, indexes, sequences, types and their definitions) with the catalog of an
empty atlas made by the same functions in memory, and refuses any difference with one error.
A file cannot bring its own macro (a replaced ``fts_main_neurons.tokenize`` reading local
files, say) or view into the queries the atlas runs. The build also records the catalog's
sha256 in ``metadata.schema_sha256``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from circuits_core.errors import FailedPrecondition, echo
from circuits_server.duckdb_files import (
    FTS_SCHEMA,
    catalog_difference,
    catalog_entries,
    catalog_fingerprint,
    fts_loaded,
    open_duckdb,
)

SCHEMA_VERSION = "1"

NEURONS_DDL = """
CREATE TABLE neurons (
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL, unit_id VARCHAR NOT NULL,
    feature_id INTEGER, unit_type VARCHAR DEFAULT 'neuron',
    label VARCHAR, input_label VARCHAR, output_label VARCHAR, description VARCHAR, label_source VARCHAR,
    max_activation DOUBLE, num_exemplars INTEGER, appearance_count BIGINT DEFAULT 0,
    observation_count BIGINT DEFAULT 0, mean_activation DOUBLE, mean_attribution DOUBLE, output_norm DOUBLE,
    cluster_path VARCHAR, top_cluster INTEGER, sub_module INTEGER, subsub_module INTEGER,
    hierarchy_depth INTEGER, infomap_flow DOUBLE, score_detection DOUBLE, score_simulation DOUBLE,
    PRIMARY KEY (layer, neuron)
)"""
#: One row per label of a neuron (pass output = what it does, input = what triggers it), with the
#: label's scores (circuits_labeler.scoring); neurons.score_* hold the best of a neuron's labels.
LABELS_DDL = """
CREATE TABLE labels (
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL, label_pass VARCHAR NOT NULL, text VARCHAR NOT NULL,
    description VARCHAR, source VARCHAR, score_detection DOUBLE, score_simulation DOUBLE,
    score_contexts INTEGER, score_positives INTEGER,
    PRIMARY KEY (layer, neuron, label_pass)
)"""
#: Aggregated neuron -> logit links (the aggregator's logits.parquet), most observed first per neuron.
LOGIT_EDGES_DDL = """
CREATE TABLE logit_edges (
    src_layer INTEGER NOT NULL, src_neuron INTEGER NOT NULL, token_id BIGINT NOT NULL, token VARCHAR,
    count BIGINT, weight_sum DOUBLE, weight_abs_sum DOUBLE, mean_weight DOUBLE
)"""
EDGES_DDL = """
CREATE TABLE edges (
    src_layer INTEGER NOT NULL, src_neuron INTEGER NOT NULL, tgt_layer INTEGER NOT NULL, tgt_neuron INTEGER NOT NULL,
    count BIGINT DEFAULT 1, weight_sum DOUBLE, weight_abs_sum DOUBLE, weight_sq_sum DOUBLE,
    weight_min DOUBLE, weight_max DOUBLE, mean_weight DOUBLE, mean_abs_weight DOUBLE
)"""
CLUSTERS_DDL = """
CREATE TABLE clusters (
    cluster_path VARCHAR PRIMARY KEY, level INTEGER, top_cluster INTEGER, sub_module INTEGER, subsub_module INTEGER,
    size BIGINT, layer_min INTEGER, layer_max INTEGER, median_layer DOUBLE
)"""
METADATA_DDL = "CREATE TABLE metadata (key VARCHAR PRIMARY KEY, value VARCHAR)"
#: Weight-based connectivity (``circuits build-db --connectivity DIR``; empty without one):
#: docs/connectivity.md.
PROJECTIONS_DDL = """
CREATE TABLE projections (
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL, output_norm DOUBLE, logit_effect DOUBLE,
    promote_ids INTEGER[], promote_tokens VARCHAR[], promote_weights FLOAT[],
    suppress_ids INTEGER[], suppress_tokens VARCHAR[], suppress_weights FLOAT[],
    input_ids INTEGER[], input_tokens VARCHAR[], input_weights FLOAT[],
    PRIMARY KEY (layer, neuron)
)"""
WEIGHT_EDGES_DDL = """
CREATE TABLE weight_edges (
    src_layer INTEGER NOT NULL, src_neuron INTEGER NOT NULL, tgt_layer INTEGER NOT NULL, tgt_neuron INTEGER NOT NULL,
    polarity TINYINT NOT NULL, c_up DOUBLE, c_gate DOUBLE, strength DOUBLE
)"""
TABLES_DDL = (NEURONS_DDL, EDGES_DDL, CLUSTERS_DDL, METADATA_DDL, LABELS_DDL, LOGIT_EDGES_DDL, PROJECTIONS_DDL,
              WEIGHT_EDGES_DDL)
#: The edges again, sorted by target: an upstream lookup reads one row group.
EDGES_BY_TARGET_SQL = "CREATE TABLE edges_by_target AS SELECT * FROM edges ORDER BY tgt_layer, tgt_neuron, src_layer, src_neuron"
#: The weight edges again, sorted by source: a downstream lookup reads one row group.
WEIGHT_EDGES_BY_SOURCE_SQL = (
    "CREATE TABLE weight_edges_by_source AS SELECT * FROM weight_edges "
    "ORDER BY src_layer, src_neuron, polarity DESC, abs(strength) DESC"
)

INDEXES = (
    "CREATE INDEX idx_neurons_top_cluster ON neurons(top_cluster)",
    "CREATE INDEX idx_neurons_cluster_path ON neurons(cluster_path)",
    "CREATE INDEX idx_neurons_label ON neurons(label)",
    "CREATE INDEX idx_neurons_unit_id ON neurons(unit_id)",
    "CREATE INDEX idx_clusters_top ON clusters(top_cluster)",
    "CREATE INDEX idx_clusters_level ON clusters(level)",
)
FTS_FIELDS = ("label", "input_label", "output_label", "description")
#: Per (term, document) BM25 contributions, precomputed and sorted by term: a query sums the rows
#: of its few terms (zone maps skip the rest) instead of recounting term frequencies. k1 = 1.2,
#: b = 0.75 as in the extension's match_bm25, so scores are identical to it.
SEARCH_POSTINGS_SQL = f"""
CREATE OR REPLACE TABLE search_postings AS
WITH tf AS (
    SELECT termid, docid, count(*) AS tf FROM {FTS_SCHEMA}.terms GROUP BY termid, docid
), stats AS (SELECT num_docs, avgdl FROM {FTS_SCHEMA}.stats)
SELECT tf.termid, tf.docid,
       log((stats.num_docs - d.df + 0.5) / (d.df + 0.5) + 1)
       * tf.tf * 2.2 / (tf.tf + 1.2 * (0.25 + 0.75 * docs.len / stats.avgdl)) AS score
FROM tf JOIN {FTS_SCHEMA}.dict d ON d.termid = tf.termid
JOIN {FTS_SCHEMA}.docs docs ON docs.docid = tf.docid, stats
ORDER BY tf.termid, score DESC, tf.docid
"""


def create_tables(con: Any) -> None:
    """The base tables of an atlas (empty)."""
    for ddl in TABLES_DDL:
        con.execute(ddl)


def create_edges_by_target(con: Any) -> None:
    con.execute(EDGES_BY_TARGET_SQL)


def create_weight_edges_by_source(con: Any) -> None:
    con.execute(WEIGHT_EDGES_BY_SOURCE_SQL)


def create_indexes(con: Any) -> None:
    for sql in INDEXES:
        con.execute(sql)


def build_fts_index(con: Any) -> None:
    """(Re)create the BM25 full-text index over the label columns of ``neurons`` and the
    ``search_postings`` table; the connection must have the shipped fts extension loaded
    (``open_duckdb(..., fts=True)``)."""
    if not fts_loaded(con):
        raise FailedPrecondition("the full-text index needs a connection opened with fts=True")
    fields = ", ".join(f"'{f}'" for f in FTS_FIELDS)
    con.execute(f"PRAGMA create_fts_index('neurons', 'unit_id', {fields}, overwrite=1)")
    con.execute(SEARCH_POSTINGS_SQL)


def create_schema(con: Any) -> None:
    """Every object of an (empty) atlas, in the order the build creates them."""
    create_tables(con)
    create_edges_by_target(con)
    create_weight_edges_by_source(con)
    create_indexes(con)
    build_fts_index(con)


_reference: list[tuple[str, str, str, str]] | None = None
_reference_lock = threading.Lock()


def reference_catalog() -> list[tuple[str, str, str, str]]:
    """The catalog entries of an empty atlas built by :func:`create_schema` (computed once)."""
    global _reference
    with _reference_lock:
        if _reference is None:
            con = open_duckdb(":memory:", read_only=False, what="reference atlas", fts=True, lock_configuration=False)
            try:
                create_schema(con)
                _reference = catalog_entries(con)
            finally:
                con.close()
        return list(_reference)


def schema_fingerprint() -> str:
    """sha256 of :func:`reference_catalog` (recorded by the build as ``metadata.schema_sha256``)."""
    return catalog_fingerprint(reference_catalog())


def verify_atlas(con: Any, path: str | Path) -> None:
    """Raise FailedPrecondition (one line) unless the open atlas holds exactly the schema
    ``circuits build-db`` writes: the same tables, views, macros, indexes and definitions."""
    have = catalog_entries(con)
    want = reference_catalog()
    difference = catalog_difference(have, want)
    if difference:
        raise FailedPrecondition(
            f"{echo(str(path), quote=False)}: refusing to open: not an atlas written by this version of "
            f"`circuits build-db` ({echo(difference, 160, quote=False)}); rebuild it with `circuits build-db`"
        )

"""Build the DuckDB atlas (relp-spec §I.1) from an aggregator export, labels and clusters.

The atlas is written to a temporary file beside the output and renamed over it only after every
table, index and the full-text index exist and the database is checkpointed: a failed or killed
build never leaves a half atlas under the final name (and never touches an existing one).

Neighbour lookups: ``edges`` is stored sorted by (src_layer, src_neuron) and ``edges_by_target``
holds the same rows sorted by (tgt_layer, tgt_neuron), so either lookup reads one row group via
DuckDB's zone maps. (DuckDB 1.5 does not use composite ART indexes for these two-column equality
filters -- EXPLAIN shows a sequential scan -- so the seed's two edge indexes would cost build time
and memory for nothing; the neurons/clusters indexes are kept.) The server answers neighbour
lookups from the memory-mapped neighbour index (:mod:`circuits_atlas.neighbours`) the build writes
beside the file (``atlas.duckdb.neighbours``, tied to the atlas by ``metadata.build_id``); the
sorted tables are the fallback when it is missing or stale.

Deviations from the seed schema, on purpose: edge statistics are DOUBLE and ``count`` BIGINT
(exact sums), neurons carry ``unit_id`` (``"L{l}/N{i}"``, the full-text document key),
``label_source``, ``observation_count``, ``mean_activation`` and ``mean_attribution``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from circuits_core.errors import InvalidArgument
from circuits_core.exports import open_export
from circuits_core.labels import iter_label_file

from circuits_atlas.clustering import FullModelClustering, cluster_full_model
from circuits_atlas.connectivity import EDGE_METHODS, weight_export, write_connectivity_tables
from circuits_atlas.duck import connect
from circuits_atlas.inputs import labels_table
from circuits_atlas.neighbours import index_path, write_index
from circuits_atlas.schema import (
    SCHEMA_VERSION,
    build_fts_index,
    create_edges_by_target,
    create_indexes,
    create_tables,
    create_weight_edges_by_source,
    schema_fingerprint,
    verify_atlas,
)

log = logging.getLogger("circuits_atlas.build")

#: Rows per storage row group (DuckDB default 122,880). Zone maps prune whole row groups, so a
#: neighbour lookup scans one group: 16,384 rows cost ~7x less than the default.
ROW_GROUP_SIZE = 16_384


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSettings:
    """Full-model clustering options (config section ``clustering``)."""

    enabled: bool = True
    min_edge_count: int = 5
    weight_transform: str = "abs_weight_sq"
    num_trials: int = 20
    multi_level: bool = True
    seed: int = 42


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildReport:
    """What a build wrote and how long each step took (seconds)."""

    path: Path
    neurons: int
    edges: int
    clusters: int
    labeled: int
    timings: Mapping[str, float] = field(default_factory=dict, hash=False)


def _remove_database_files(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def build_atlas(
    *,
    export_dir: str | Path | None,
    output_path: str | Path,
    labels_path: str | Path | None = None,
    clustering: ClusterSettings | FullModelClustering | None = ClusterSettings(),
    min_edge_count: int = 3,
    model: str = "",
    memory_limit: str | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    connectivity_dir: str | Path | None = None,
    edge_source: str = "relp",
) -> BuildReport:
    """Build ``output_path`` from an aggregator export directory (checked by :func:`circuits_core.exports.open_export`).

    ``labels_path``: optional labeler JSONL. ``clustering``: settings to run Infomap on the export
    (edges with ``count >= clustering.min_edge_count``), a ready clustering, or None. Edges with
    ``count >= min_edge_count`` enter the atlas, sorted by (src_layer, src_neuron) so downstream
    lookups read one row group. Promises: on success the file holds complete tables, indexes,
    the full-text index and metadata; on failure no file is left at ``output_path`` (an existing
    one is left as it was) and the temporary file is removed.

    ``connectivity_dir``: a ``circuits connectivity`` folder whose projections and weight edges
    fill the ``projections`` / ``weight_edges`` tables (:mod:`circuits_atlas.connectivity`; empty
    without one). ``edge_source``: ``relp`` (the export's edges) or ``weight_graph`` /
    ``output_projection`` (edges from the connectivity folder, every edge counted once, so both
    edge-count minimums become 1; ``export_dir`` is not needed).
    """
    if min_edge_count < 1:
        raise InvalidArgument(f"min_edge_count must be >= 1, got {min_edge_count}")
    if edge_source not in EDGE_METHODS:
        raise InvalidArgument(f"edge source (aggregation.method) must be one of {', '.join(EDGE_METHODS)}, got {edge_source!r}")
    output = Path(output_path)
    if output.is_dir():
        raise InvalidArgument(f"{output}: is a directory, expected an atlas file path")
    weights_tmp: Path | None = None
    if edge_source != "relp":
        if connectivity_dir is None:
            raise InvalidArgument(f"aggregation.method {edge_source} builds edges from weights: give the connectivity folder")
        output.parent.mkdir(parents=True, exist_ok=True)
        weights_tmp = output.with_name(f".{output.name}.weights-{os.getpid()}")
        export_dir = weight_export(connectivity_dir, edge_source, weights_tmp)
        min_edge_count = 1
        if isinstance(clustering, ClusterSettings):
            clustering = replace(clustering, min_edge_count=1)
    elif export_dir is None:
        raise InvalidArgument("give the aggregator export directory (or a weight-based aggregation.method)")
    try:
        return _build_atlas(
            export_dir=export_dir, output=output, labels_path=labels_path, clustering=clustering,
            min_edge_count=min_edge_count, model=model, memory_limit=memory_limit, threads=threads,
            progress=progress, connectivity_dir=connectivity_dir, edge_source=edge_source,
        )
    finally:
        if weights_tmp is not None:
            shutil.rmtree(weights_tmp, ignore_errors=True)


def _build_atlas(
    *,
    export_dir: str | Path,
    output: Path,
    labels_path: str | Path | None,
    clustering: ClusterSettings | FullModelClustering | None,
    min_edge_count: int,
    model: str,
    memory_limit: str | None,
    threads: int | None,
    progress: Callable[[str], None] | None,
    connectivity_dir: str | Path | None,
    edge_source: str,
) -> BuildReport:
    files = open_export(export_dir)
    labels = labels_table(iter_label_file(labels_path, default_source="")) if labels_path else None
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.building-{os.getpid()}")
    final_index = index_path(output)
    tmp_index = final_index.with_name(f".{final_index.name}.building-{os.getpid()}")
    _remove_database_files(tmp)
    say = progress or (lambda msg: log.info("%s", msg))
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def step(name: str) -> Callable[[], None]:
        t0 = time.perf_counter()
        say(name)
        return lambda: timings.__setitem__(name, time.perf_counter() - t0)

    con = None
    try:
        inputs = [p for p in (files.edges, files.units, files.ledger, files.logits) if p is not None]
        con = connect(tmp, read_only=False, memory_limit=memory_limit, threads=threads, row_group_size=ROW_GROUP_SIZE,
                      fts=True, allowed_paths=inputs, lock_configuration=False)  # fmt: skip
        create_tables(con)

        done = step("neurons")
        _insert_neurons(con, files.units, labels)
        done()

        done = step("edges")
        con.execute(
            """
            INSERT INTO edges
            SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, count,
                   weight_sum, weight_abs_sum, weight_sq_sum, weight_min, weight_max,
                   weight_sum / count, weight_abs_sum / count
            FROM read_parquet(?)
            WHERE count >= ?
            ORDER BY src_layer, src_neuron, tgt_layer, tgt_neuron
            """,
            [str(files.edges), min_edge_count],
        )
        create_edges_by_target(con)
        if files.logits is not None:
            con.execute(
                """
                INSERT INTO logit_edges
                SELECT src_layer, src_neuron, token_id, token, count, weight_sum, weight_abs_sum, weight_sum / count
                FROM read_parquet(?) WHERE count >= ? ORDER BY src_layer, src_neuron, count DESC, token_id
                """,
                [str(files.logits), min_edge_count],
            )
        done()

        cluster_meta: dict[str, str] = {}
        if isinstance(clustering, ClusterSettings) and clustering.enabled:
            done = step("clustering (Infomap)")
            clustering = run_clustering(con, clustering, edges_from="read_parquet(?)", params=[str(files.edges)])
            done()
        if isinstance(clustering, FullModelClustering):
            done = step("clusters table")
            cluster_meta = store_clustering(con, clustering)
            done()

        connectivity_meta: dict[str, Any] = {}
        if connectivity_dir is not None:
            done = step("connectivity tables")
            connectivity_meta = write_connectivity_tables(con, connectivity_dir)
            done()
        create_weight_edges_by_source(con)

        done = step("indexes")
        create_indexes(con)
        done()

        done = step("full-text index")
        build_fts_index(con)
        done()

        graph_count = files.graphs
        counts = {
            name: con.execute(f"SELECT count(*) FROM {name}").fetchone()[0] for name in ("neurons", "edges", "clusters")
        }
        labeled = con.execute("SELECT count(*) FROM neurons WHERE coalesce(label, '') <> ''").fetchone()[0]
        scored = con.execute("SELECT count(*) FROM labels WHERE score_contexts > 0").fetchone()[0]
        build_id = uuid.uuid4().hex
        metadata = {
            "schema_version": SCHEMA_VERSION,
            "build_id": build_id,
            "schema_sha256": schema_fingerprint(),
            "model": model,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "total_neurons": counts["neurons"],
            "total_edges": counts["edges"],
            "total_clusters": counts["clusters"],
            "labeled_neurons": labeled,
            "scored_labels": scored,
            "logit_links": con.execute("SELECT count(*) FROM logit_edges").fetchone()[0],
            "min_edge_count": min_edge_count,
            "source_graph_count": graph_count,
            "export_dir": str(Path(export_dir).resolve()) if edge_source == "relp" else "",
            "labels_path": str(Path(labels_path).resolve()) if labels_path else "",
            "edge_source": edge_source,
            **cluster_meta,
            **connectivity_meta,
        }
        timings["total_before_metadata"] = time.perf_counter() - started
        metadata["build_seconds"] = round(timings["total_before_metadata"], 3)
        con.executemany("INSERT OR REPLACE INTO metadata VALUES (?, ?)", [[k, str(v)] for k, v in metadata.items()])
        con.execute("CHECKPOINT")
        done = step("neighbour index")
        write_index(con, tmp_index, build_id=build_id, progress=say)
        done()
        con.close()
        con = None
        # The atlas first, then its index: in between, the old index beside the new atlas is
        # stale (another build_id) and queries fall back to DuckDB; never a wrong answer.
        os.replace(tmp, output)
        os.replace(tmp_index, final_index)
        _fsync_dir(output.parent)
    except BaseException:
        if con is not None:
            try:
                con.close()
            except Exception:  # noqa: BLE001 - the original error matters
                pass
        _remove_database_files(tmp)
        try:
            tmp_index.unlink()
        except FileNotFoundError:
            pass
        raise
    timings["total"] = time.perf_counter() - started
    return BuildReport(
        path=output, neurons=counts["neurons"], edges=counts["edges"], clusters=counts["clusters"],
        labeled=labeled, timings=timings,
    )  # fmt: skip


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _insert_neurons(con: Any, units_path: Path, labels: Any) -> None:
    # units.parquet has every exports.UNIT_COLUMNS column (open_export checked it).
    units_select = """
        SELECT layer::INTEGER AS layer, neuron::INTEGER AS neuron, graph_count::BIGINT AS appearance_count,
               observation_count::BIGINT AS observation_count,
               act_sum / nullif(observation_count, 0) AS mean_activation,
               attr_sum / nullif(observation_count, 0) AS mean_attribution,
               act_max::DOUBLE AS act_max
        FROM read_parquet(?)
    """
    if labels is None:
        con.execute(
            f"""
            INSERT INTO neurons (layer, neuron, unit_id, appearance_count, observation_count,
                                 mean_activation, mean_attribution, max_activation)
            SELECT layer, neuron, 'L' || layer || '/N' || neuron, appearance_count, coalesce(observation_count, 0),
                   mean_activation, mean_attribution, act_max
            FROM ({units_select})
            """,
            [str(units_path)],
        )
        return
    con.register("labels_input", labels)
    try:
        con.execute(
            f"""
            INSERT INTO neurons (layer, neuron, unit_id, feature_id, label, input_label, output_label, description,
                                 label_source, max_activation, num_exemplars, appearance_count, observation_count,
                                 mean_activation, mean_attribution, output_norm)
            SELECT coalesce(u.layer, l.layer), coalesce(u.neuron, l.neuron),
                   'L' || coalesce(u.layer, l.layer) || '/N' || coalesce(u.neuron, l.neuron),
                   l.feature_id, nullif(l.label, ''), nullif(l.input_label, ''), nullif(l.output_label, ''),
                   nullif(l.description, ''), nullif(l.source, ''), coalesce(l.max_activation, u.act_max),
                   l.num_exemplars, coalesce(u.appearance_count, 0), coalesce(u.observation_count, 0),
                   u.mean_activation, u.mean_attribution, l.output_norm
            FROM ({units_select}) u
            FULL OUTER JOIN labels_input l ON u.layer = l.layer AND u.neuron = l.neuron
            """,
            [str(units_path)],
        )
        con.execute(
            """
            INSERT INTO labels
            SELECT layer, neuron, 'output', coalesce(nullif(output_label, ''), label), nullif(description, ''),
                   coalesce(nullif(source, ''), 'progressive_output'), output_score_detection, output_score_simulation,
                   output_score_contexts, output_score_positives
            FROM labels_input WHERE coalesce(nullif(output_label, ''), nullif(label, '')) IS NOT NULL
            UNION ALL
            SELECT layer, neuron, 'input', input_label, NULL, 'progressive_input', input_score_detection,
                   input_score_simulation, input_score_contexts, input_score_positives
            FROM labels_input WHERE nullif(input_label, '') IS NOT NULL
            """
        )
        con.execute(
            """
            UPDATE neurons SET score_detection = s.d, score_simulation = s.s
            FROM (SELECT layer, neuron, max(score_detection) AS d, max(score_simulation) AS s FROM labels
                  GROUP BY layer, neuron) s
            WHERE neurons.layer = s.layer AND neurons.neuron = s.neuron
            """
        )
    finally:
        con.unregister("labels_input")


def run_clustering(
    con: Any, settings: ClusterSettings, *, edges_from: str = "edges", params: Sequence[Any] = ()
) -> FullModelClustering:
    """Full-model Infomap over the edges with ``count >= settings.min_edge_count`` and the units of
    the ``neurons`` table.

    ``edges_from`` is code, never user text: the atlas's ``edges`` table (reclustering a built
    atlas), or ``read_parquet(?)`` of an export with its path in ``params`` (building one).
    """
    edges = con.execute(
        "SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, count, weight_sum, weight_abs_sum "
        f"FROM {edges_from} WHERE count >= ?",
        [*params, settings.min_edge_count],
    ).fetch_arrow_table()
    units = con.execute("SELECT layer, neuron FROM neurons").fetch_arrow_table()
    return cluster_full_model(
        edges,
        units,
        min_edge_count=settings.min_edge_count,
        weight_transform=settings.weight_transform,  # type: ignore[arg-type]
        num_trials=settings.num_trials,
        multi_level=settings.multi_level,
        seed=settings.seed,
    )


def store_clustering(con: Any, clustering: FullModelClustering) -> dict[str, str]:
    """Write a clustering into an open atlas: cluster columns, the ``clusters`` table and its
    ``metadata`` rows (settings, codelength, total_clusters). Returns those metadata rows."""
    rows = write_clusters(con, clustering)
    meta = {f"clustering_{k}": str(v) for k, v in clustering.settings.items()}
    meta["clustering_codelength"] = str(clustering.codelength)
    meta["total_clusters"] = str(rows)
    con.executemany("INSERT OR REPLACE INTO metadata VALUES (?, ?)", [[k, v] for k, v in meta.items()])
    return meta


def recluster_atlas(
    path: str | Path, settings: ClusterSettings, *, write: bool = True, progress: Callable[[str], None] | None = None
) -> FullModelClustering:
    """Cluster a built atlas's ``edges`` again and, with ``write``, replace its clustering in one
    transaction (a failure leaves the old clustering in place)."""
    path = Path(path)
    if not path.exists():
        raise InvalidArgument(f"{path}: atlas file not found")
    say = progress or (lambda msg: log.info("%s", msg))
    con = connect(path, read_only=not write)
    try:
        verify_atlas(con, path)
        say(f"clustering {path} (edges with count >= {settings.min_edge_count}) with Infomap ...")
        clustering = run_clustering(con, settings)
        if write:
            con.execute("BEGIN TRANSACTION")
            try:
                store_clustering(con, clustering)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("CHECKPOINT")
    finally:
        con.close()
    return clustering


def write_clusters(con: Any, clustering: FullModelClustering) -> int:
    """Write cluster columns of ``neurons`` and rebuild ``clusters`` (one row per path prefix).

    Units not in ``clustering`` get NULL cluster columns. Returns the number of clusters rows."""
    import pyarrow as pa

    paths = clustering.paths
    assignment = pa.table(
        {
            "layer": pa.array(clustering.layers, pa.int32()),
            "neuron": pa.array(clustering.neurons, pa.int32()),
            "cluster_path": pa.array(clustering.path_strings, pa.string()),
            "top_cluster": pa.array([p[0] for p in paths], pa.int32()),
            "sub_module": pa.array([p[1] if len(p) > 1 else None for p in paths], pa.int32()),
            "subsub_module": pa.array([p[2] if len(p) > 2 else None for p in paths], pa.int32()),
            "hierarchy_depth": pa.array([len(p) for p in paths], pa.int32()),
            "infomap_flow": pa.array(clustering.flows, pa.float64()),
        }
    )
    con.register("cluster_assignment", assignment)
    try:
        con.execute(
            "UPDATE neurons SET cluster_path = NULL, top_cluster = NULL, sub_module = NULL, subsub_module = NULL, "
            "hierarchy_depth = NULL, infomap_flow = NULL WHERE cluster_path IS NOT NULL"
        )
        con.execute(
            """
            UPDATE neurons SET cluster_path = a.cluster_path, top_cluster = a.top_cluster, sub_module = a.sub_module,
                   subsub_module = a.subsub_module, hierarchy_depth = a.hierarchy_depth, infomap_flow = a.infomap_flow
            FROM cluster_assignment a WHERE neurons.layer = a.layer AND neurons.neuron = a.neuron
            """
        )
    finally:
        con.unregister("cluster_assignment")
    con.execute("DELETE FROM clusters")
    con.execute(
        """
        INSERT INTO clusters
        WITH parts AS (
            SELECT layer, string_split(cluster_path, '.') AS p, hierarchy_depth FROM neurons WHERE cluster_path IS NOT NULL
        ), prefixes AS (
            SELECT layer, k AS level, array_to_string(list_slice(p, 1, k), '.') AS cluster_path,
                   p[1]::INTEGER AS top_cluster,
                   CASE WHEN k >= 2 THEN p[2]::INTEGER END AS sub_module,
                   CASE WHEN k >= 3 THEN p[3]::INTEGER END AS subsub_module
            FROM parts, range(1, hierarchy_depth + 1) AS r(k)
        )
        SELECT cluster_path, level, top_cluster, sub_module, subsub_module, count(*) AS size,
               min(layer), max(layer), median(layer)
        FROM prefixes
        GROUP BY cluster_path, level, top_cluster, sub_module, subsub_module
        ORDER BY top_cluster, level, cluster_path
        """
    )
    return con.execute("SELECT count(*) FROM clusters").fetchone()[0]

"""Weight-based connectivity in the atlas: tables from a ``circuits connectivity`` folder, and the
edge tables of ``aggregation.method: weight_graph | output_projection``.

Tables (schema in ``docs/connectivity.md``):

* ``projections``: one row per neuron: ``output_norm``, ``logit_effect`` and the promoted,
  suppressed and input tokens as parallel lists (``*_ids INTEGER[]``, ``*_tokens VARCHAR[]``,
  ``*_weights FLOAT[]``); sorted by (layer, neuron).
* ``weight_edges`` (sorted by target) and ``weight_edges_by_source`` (the same rows sorted by
  source): ``src_layer, src_neuron, tgt_layer, tgt_neuron, polarity (TINYINT +1/-1), c_up, c_gate,
  strength``.

For a weight-based ``aggregation.method`` the folder is turned into an aggregator-shaped export
(``edges.parquet`` with ``count = 1`` and the weight as every statistic, ``units.parquet`` with
every neuron and zero activation statistics, an empty ``ledger.parquet``) so the atlas build and Infomap run on it unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from circuits_core.connectivity_files import ConnectivityFolder
from circuits_core.errors import FailedPrecondition, InvalidArgument

#: aggregation.method values that build the atlas edges from weights.
WEIGHT_METHODS: tuple[str, ...] = ("weight_graph", "output_projection")
EDGE_METHODS: tuple[str, ...] = ("relp", *WEIGHT_METHODS)

CONNECTIVITY_TABLES: tuple[str, ...] = ("projections", "weight_edges", "weight_edges_by_source")


def weight_export(folder: str | Path, method: str, out_dir: str | Path) -> Path:
    """Write a complete aggregator export (``circuits_core.exports`` layout) built from weights.

    ``weight_graph``: one edge per weight-graph edge, weight = strength (signed).
    ``output_projection``: one edge per similarity pair, weight = cosine of the output projections.
    Every edge has ``count = 1``; every neuron of the model is a unit (``graph_count = 0``).
    """
    import numpy as np
    import pyarrow as pa

    from circuits_core.connectivity_files import write_parquet
    from circuits_core.exports import EDGES_FILE, LEDGER_FILE, UNIT_COLUMNS, UNITS_FILE

    if method not in WEIGHT_METHODS:
        raise InvalidArgument(f"aggregation method must be one of {', '.join(WEIGHT_METHODS)} here, got {method!r}")
    conn = ConnectivityFolder.open(folder)
    part = "weights" if method == "weight_graph" else "similarity"
    if not conn.final_path(part).is_file():
        raise FailedPrecondition(
            f"aggregation.method {method} needs {conn.final_path(part).name} in {conn.path}; "
            f"run `circuits connectivity --parts {part}`"
        )
    # Read the columns through the folder's owner (it checks them).
    edges = conn.weight_edges() if part == "weights" else conn.projection_edges()
    keys = ("src_layer", "src_neuron", "tgt_layer", "tgt_neuron")
    columns = {k: np.asarray(edges.column(k).to_numpy(), dtype=np.int32) for k in keys}
    weight = np.asarray(edges.column("strength" if part == "weights" else "similarity").to_numpy(), dtype=np.float64)
    order = np.lexsort(tuple(columns[k] for k in reversed(keys)))
    out = Path(out_dir)
    write_parquet(pa.table({
        **{k: pa.array(columns[k][order]) for k in keys},
        "count": pa.array(np.ones(len(order), dtype=np.int64)),
        "weight_sum": pa.array(weight[order]),
        "weight_abs_sum": pa.array(np.abs(weight[order])),
        "weight_sq_sum": pa.array(weight[order] ** 2),
        "weight_min": pa.array(weight[order]),
        "weight_max": pa.array(weight[order]),
    }), out / EDGES_FILE)
    layers, neurons = np.meshgrid(np.arange(conn.num_layers, dtype=np.int32), np.arange(conn.d_mlp, dtype=np.int32), indexing="ij")
    zeros = np.zeros(layers.size, dtype=np.int64)
    write_parquet(pa.table({
        "layer": pa.array(layers.ravel()), "neuron": pa.array(neurons.ravel()),
        "graph_count": pa.array(zeros), "observation_count": pa.array(zeros),
        # No activations were observed: the statistics are zero sums (the atlas's means divide by nullif(count, 0)).
        **{name: pa.array(np.zeros(layers.size, dtype=np.float64)) for name in UNIT_COLUMNS[4:]},
    }), out / UNITS_FILE)
    # No graph was counted: an empty ledger, so the export is complete for open_export.
    write_parquet(pa.table({
        "graph_id": pa.array([], pa.string()), "source": pa.array([], pa.string()),
        "corpus_index": pa.array([], pa.int64()),
    }), out / LEDGER_FILE)
    return out


def write_connectivity_tables(con: Any, folder: str | Path) -> dict[str, Any]:
    """Fill the (empty) ``projections`` and ``weight_edges`` tables of an atlas being built from
    whatever parts the folder holds (the build then sorts ``weight_edges_by_source`` from them);
    fill ``neurons.output_norm`` where it is empty.

    Returns metadata entries (``connectivity_*``) for the atlas ``metadata`` table.
    """
    conn = ConnectivityFolder.open(folder)
    has_output, has_input, has_weights = conn.has("output"), conn.has("input"), conn.has("weights")
    if not (has_output or has_input or has_weights):
        raise FailedPrecondition(f"{conn.path}: holds no finished projections or weight edges yet")
    if has_output or has_input:
        registered = []
        try:
            if has_output:
                con.register("conn_output", conn.output_projections())
                registered.append("conn_output")
            if has_input:
                con.register("conn_input", conn.input_projections())
                registered.append("conn_input")
            if has_output and has_input:
                source = "conn_output o FULL OUTER JOIN conn_input i ON o.layer = i.layer AND o.neuron = i.neuron"
                key = "coalesce(o.layer, i.layer), coalesce(o.neuron, i.neuron)"
            elif has_output:
                source, key = "conn_output o", "o.layer, o.neuron"
            else:
                source, key = "conn_input i", "i.layer, i.neuron"
            out_cols = (
                "o.output_norm, o.logit_effect, o.promote_ids, o.promote_tokens, o.promote_weights, "
                "o.suppress_ids, o.suppress_tokens, o.suppress_weights"
                if has_output else "NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL"
            )
            in_cols = "i.top_ids, i.top_tokens, i.top_weights" if has_input else "NULL, NULL, NULL"
            con.execute(f"INSERT INTO projections SELECT {key}, {out_cols}, {in_cols} FROM {source} ORDER BY 1, 2")
        finally:
            for name in registered:
                con.unregister(name)
        if has_output:
            con.execute(
                """
                UPDATE neurons SET output_norm = p.output_norm FROM projections p
                WHERE neurons.layer = p.layer AND neurons.neuron = p.neuron AND neurons.output_norm IS NULL
                """
            )
    if has_weights:
        con.register("conn_weights", conn.weight_edges())
        try:
            con.execute(
                """
                INSERT INTO weight_edges
                SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, polarity, c_up, c_gate, strength
                FROM conn_weights ORDER BY tgt_layer, tgt_neuron, polarity DESC, abs(strength) DESC
                """
            )
        finally:
            con.unregister("conn_weights")
    return {
        "connectivity_dir": str(conn.path.resolve()),
        "connectivity_model": conn.model,
        "connectivity_settings": json.dumps(conn.manifest.get("settings", {}), sort_keys=True),
        "connectivity_parts": ",".join(p for p, ok in (("output", has_output), ("input", has_input), ("weights", has_weights)) if ok),
    }


# ------------------------------------------------------------------------------------------
# Queries (parameterised; used by CircuitDatabase)
# ------------------------------------------------------------------------------------------
_WEIGHT_COLUMNS = "src_layer, src_neuron, tgt_layer, tgt_neuron, polarity, c_up, c_gate, strength"


def projections_query() -> str:
    """One neuron's ``projections`` row; parameters: layer, neuron."""
    return (
        "SELECT layer, neuron, output_norm, logit_effect, promote_ids, promote_tokens, promote_weights, "
        "suppress_ids, suppress_tokens, suppress_weights, input_ids, input_tokens, input_weights "
        "FROM projections WHERE layer = ? AND neuron = ?"
    )


def _tokens(ids: Any, tokens: Any, weights: Any) -> tuple[Any, ...]:
    from circuits_core.connectivity import TokenWeight

    if ids is None:
        return ()
    return tuple(
        TokenWeight(token_id=int(i), token=str(t), weight=float(w)) for i, t, w in zip(ids, tokens or (), weights or ())
    )


def unit_projections_from_row(row: Any) -> Any:
    """A :class:`~circuits_core.connectivity.UnitProjections` from a :func:`projections_query` row."""
    import math

    from circuits_core.connectivity import UnitProjections

    layer, neuron, norm, effect, pi, pt, pw, si, st, sw, ii, it, iw = row
    return UnitProjections(
        layer=int(layer), neuron=int(neuron),
        output_norm=math.nan if norm is None else float(norm), logit_effect=math.nan if effect is None else float(effect),
        promotes=_tokens(pi, pt, pw), suppresses=_tokens(si, st, sw), input_tokens=_tokens(ii, it, iw),
    )  # fmt: skip


def weight_edges_query(layer: int, neuron: int, direction: str, limit: int, polarity: int) -> tuple[str, list[Any]]:
    """SQL and parameters for a unit's weight edges (see ``CircuitDatabase.get_weight_edges``)."""
    sides = {"upstream": ("upstream",), "downstream": ("downstream",), "both": ("upstream", "downstream")}[direction]
    polarities = (1, -1) if polarity == 0 else (polarity,)
    parts, params = [], []
    for side_rank, side in enumerate(sides):
        table, key = ("weight_edges", "tgt") if side == "upstream" else ("weight_edges_by_source", "src")
        for pol in polarities:
            parts.append(
                f"(SELECT {_WEIGHT_COLUMNS}, {side_rank} AS side FROM {table} "
                f"WHERE {key}_layer = ? AND {key}_neuron = ? AND polarity = ? "
                "ORDER BY abs(strength) DESC, src_layer, src_neuron, tgt_layer, tgt_neuron LIMIT ?)"
            )
            params += [layer, neuron, pol, limit]
    sql = " UNION ALL ".join(parts)
    sql = f"SELECT {_WEIGHT_COLUMNS} FROM ({sql}) ORDER BY side, polarity DESC, abs(strength) DESC, src_layer, src_neuron, tgt_layer, tgt_neuron"
    return sql, params


def weight_edge_from_row(row: Any) -> Any:
    from circuits_core.connectivity import WeightEdge

    sl, sn, tl, tn, pol, c_up, c_gate, strength = row
    return WeightEdge(
        src_layer=int(sl), src_neuron=int(sn), tgt_layer=int(tl), tgt_neuron=int(tn), polarity=int(pol),
        c_up=float(c_up), c_gate=float(c_gate), strength=float(strength),
    )

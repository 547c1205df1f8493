"""Planted-structure inputs for the atlas tests: graphs -> aggregator-style Parquet export + labels.

The export is computed here by a direct reference aggregation of the graphs (relp-spec §F: one
count per link observation, positions collapsed), written with the aggregator's exact columns.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from circuits_core.schemas import Edge, Graph, Unit

#: Planted groups: label text -> units (layer, neuron) spread over layers 0..3.
PLANTED = {
    "enzyme catalysis in biochemistry": [(layer, 10 + j) for layer in range(4) for j in range(4)],
    "capital cities of European countries": [(layer, 50 + j) for layer in range(4) for j in range(4)],
    "rhyming words in poetry": [(layer, 90 + j) for layer in range(4) for j in range(4)],
}


def planted_graphs(n_graphs: int = 24, seed: int = 0) -> list[Graph]:
    """Graphs that each activate one planted group (dense layer-to-layer links inside it) plus
    one weak cross-group link whose count stays below the atlas and clustering thresholds."""
    rng = random.Random(seed)
    groups = list(PLANTED.values())
    graphs = []
    for g in range(n_graphs):
        members = groups[g % len(groups)]
        units = [Unit(layer=l, index=n, position=2, activation=1.0, attribution=0.1) for l, n in members]
        edges = []
        for sl, sn in members:
            for tl, tn in members:
                if tl == sl + 1:
                    w = rng.uniform(0.5, 1.5) * (1 if (sn + tn) % 5 else -1)
                    edges.append(Edge(src_layer=sl, src_index=sn, src_position=2, tgt_layer=tl, tgt_index=tn, tgt_position=2, weight=w))
        other = groups[(g + 1) % len(groups)]
        target = other[(g * 7) % len(other)]  # varies per graph: each cross link is seen once or twice
        extra = Unit(layer=target[0], index=target[1], position=3, activation=1.0)
        units.append(extra)
        edges.append(Edge(src_layer=members[0][0], src_index=members[0][1], src_position=2,
                          tgt_layer=extra.layer, tgt_index=extra.index, tgt_position=3, weight=0.01))
        graphs.append(Graph(units=tuple(units), edges=tuple(edges), prompt=f"prompt {g}", graph_id=f"g{g:03d}"))
    return graphs


def write_export(graphs: list[Graph], out: Path) -> Path:
    """Reference aggregation of graphs into edges/units/ledger Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    stats: dict[tuple[int, int, int, int], list[float]] = {}
    units: dict[tuple[int, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for graph in graphs:
        seen = set()
        for u in graph.neurons:
            rec = units[u.key]
            rec["observation_count"] += 1
            rec["act_sum"] += u.activation or 0.0
            rec["attr_sum"] += u.attribution or 0.0
            seen.add(u.key)
        for key in seen:
            units[key]["graph_count"] += 1
        for e in graph.edges:
            key = (e.src_layer, e.src_index, e.tgt_layer, e.tgt_index)
            s = stats.setdefault(key, [0, 0.0, 0.0, 0.0, float("inf"), float("-inf")])
            s[0] += 1
            s[1] += e.weight
            s[2] += abs(e.weight)
            s[3] += e.weight**2
            s[4] = min(s[4], e.weight)
            s[5] = max(s[5], e.weight)
    keys = sorted(stats)
    pq.write_table(
        pa.table({
            "src_layer": pa.array([k[0] for k in keys], pa.int32()),
            "src_neuron": pa.array([k[1] for k in keys], pa.int32()),
            "tgt_layer": pa.array([k[2] for k in keys], pa.int32()),
            "tgt_neuron": pa.array([k[3] for k in keys], pa.int32()),
            "count": pa.array([int(stats[k][0]) for k in keys], pa.int64()),
            **{name: pa.array([float(stats[k][i]) for k in keys], pa.float64())
               for i, name in enumerate(("weight_sum", "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max"), 1)},
        }),
        out / "edges.parquet",
    )
    ukeys = sorted(units)
    cols = {"layer": pa.array([k[0] for k in ukeys], pa.int32()), "neuron": pa.array([k[1] for k in ukeys], pa.int32())}
    cols["graph_count"] = pa.array([int(units[k]["graph_count"]) for k in ukeys], pa.int64())
    cols["observation_count"] = pa.array([int(units[k]["observation_count"]) for k in ukeys], pa.int64())
    for name in ("act_sum", "act_sq_sum", "act_min", "act_max", "attr_sum", "attr_abs_sum", "attr_sq_sum", "attr_min", "attr_max"):
        cols[name] = pa.array([float(units[k].get(name, 0.0)) for k in ukeys], pa.float64())
    pq.write_table(pa.table(cols), out / "units.parquet")
    pq.write_table(
        pa.table({
            "graph_id": [g.graph_id for g in graphs],
            "source": [f"graph_{i}.json" for i in range(len(graphs))],
            "corpus_index": pa.array(list(range(len(graphs))), pa.int64()),
        }),
        out / "ledger.parquet",
    )
    return out


def write_labels(path: Path) -> Path:
    """Labels for every planted unit; some lines miss optional fields, one unit has none at all."""
    lines = []
    for text, members in PLANTED.items():
        for i, (layer, neuron) in enumerate(members):
            if (layer, neuron) == (3, 93):
                continue  # unlabeled unit
            obj = {"layer": layer, "neuron": neuron, "label": f"{text} (L{layer})"}
            if i % 2 == 0:
                obj.update(input_label=f"tokens about {text.split()[0]}", description=f"Fires on {text}.",
                           output_label=text, source="progressive_output", extra_field=[1, 2])
            lines.append(json.dumps(obj))
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def planted_groups() -> dict[str, list[tuple[int, int]]]:
    return PLANTED


@pytest.fixture(scope="session")
def planted_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_export(planted_graphs(), tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="session")
def planted_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_labels(tmp_path_factory.mktemp("labels") / "labels.jsonl")


@pytest.fixture(scope="session")
def planted_atlas(planted_export: Path, planted_labels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from circuits_atlas import ClusterSettings, build_atlas

    out = tmp_path_factory.mktemp("atlas") / "atlas.duckdb"
    build_atlas(export_dir=planted_export, output_path=out, labels_path=planted_labels,
                clustering=ClusterSettings(min_edge_count=5, num_trials=4), min_edge_count=3, model="planted-test")
    return out


def write_random_export(root: Path, *, layers: int, neurons: int, edges: int, seed: int) -> Path:
    """Aggregator-style export with unique unit pairs, few distinct counts and quantised weights, so
    many edges of a unit tie on count and on mean |w| (the tie-breaks are exercised)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    src_layer = rng.integers(0, layers - 1, edges * 2)
    tgt_layer = np.minimum(src_layer + rng.integers(1, 3, edges * 2), layers - 1)
    src_neuron = rng.integers(0, neurons, edges * 2)
    tgt_neuron = rng.integers(0, neurons, edges * 2)
    # A few hub units with many edges (long runs for min_count / limit).
    hub = rng.random(edges * 2) < 0.15
    src_neuron[hub] = rng.integers(0, 3, hub.sum())
    key = ((src_layer * neurons + src_neuron) * layers + tgt_layer) * neurons + tgt_neuron
    _, first = np.unique(key, return_index=True)
    keep = np.sort(first)[:edges]
    rng.shuffle(keep)  # the export is in no particular order
    n = len(keep)
    count = rng.integers(1, 7, n).astype(np.int64)
    mean = rng.integers(-4, 5, n) / 8.0  # quantised: equal mean |w| across edges
    spread = rng.integers(0, 3, n) / 16.0
    pq.write_table(
        pa.table({
            "src_layer": src_layer[keep].astype(np.int32), "src_neuron": src_neuron[keep].astype(np.int32),
            "tgt_layer": tgt_layer[keep].astype(np.int32), "tgt_neuron": tgt_neuron[keep].astype(np.int32),
            "count": count, "weight_sum": mean * count, "weight_abs_sum": np.abs(mean) * count,
            "weight_sq_sum": (mean**2 + spread**2) * count, "weight_min": mean - spread, "weight_max": mean + spread,
        }),  # fmt: skip
        root / "edges.parquet",
    )
    layer = np.repeat(np.arange(layers, dtype=np.int32), neurons)
    neuron = np.tile(np.arange(neurons, dtype=np.int32), layers)
    cols = {"layer": layer, "neuron": neuron, "graph_count": np.ones(len(layer), np.int64),
            "observation_count": np.ones(len(layer), np.int64)}  # fmt: skip
    for name in ("act_sum", "act_sq_sum", "act_min", "act_max", "attr_sum", "attr_abs_sum", "attr_sq_sum", "attr_min", "attr_max"):
        cols[name] = rng.random(len(layer))
    pq.write_table(pa.table(cols), root / "units.parquet")
    pq.write_table(pa.table({"graph_id": ["g0"], "source": ["test"], "corpus_index": pa.array([0], pa.int64())}),
                   root / "ledger.parquet")  # fmt: skip
    return root


@pytest.fixture(scope="session")
def random_export():
    """write_random_export(root, layers=, neurons=, edges=, seed=) -> root."""
    return write_random_export

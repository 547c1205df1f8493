"""Shared fixtures of the aggregator tests: a brute-force reference and a real server on port 0."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator

import pytest

from circuits_core.schemas import Graph


def brute_force(graphs: Iterable[Graph]) -> tuple[dict, dict]:
    """Edge and unit statistics recomputed the obvious way, one Python object at a time.

    Each distinct graph_id counts once. Edge stats: [count, sum, abs_sum, sq_sum, min, max] per
    (src_layer, src_index, tgt_layer, tgt_index) over neuron->neuron links. Unit stats per
    (layer, index): graph set, observations, activation/attribution values.
    """
    edges: dict = {}
    units: dict = defaultdict(lambda: {"graphs": set(), "obs": 0, "act": [], "attr": []})
    seen = set()
    for graph in graphs:
        if graph.graph_id in seen:
            continue
        seen.add(graph.graph_id)
        kind = {u.node_key: u.kind for u in graph.units}
        for u in graph.units:
            if u.kind != "neuron":
                continue
            rec = units[u.key]
            rec["graphs"].add(graph.graph_id)
            rec["obs"] += 1
            if u.activation is not None:
                rec["act"].append(u.activation)
            if u.attribution is not None:
                rec["attr"].append(u.attribution)
        for e in graph.edges:
            if kind[e.src_key] != "neuron" or kind[e.tgt_key] != "neuron":
                continue
            observe(edges, (e.src_layer, e.src_index, e.tgt_layer, e.tgt_index), e.weight)
    return edges, dict(units)


def observe(edges: dict, key: tuple, w: float) -> None:
    """Add one link observation of weight ``w`` to ``edges[key]`` = [count, sum, |sum|, sum sq, min, max]."""
    s = edges.setdefault(key, [0, 0.0, 0.0, 0.0, math.inf, -math.inf])
    s[0] += 1
    s[1] += w
    s[2] += abs(w)
    s[3] += w * w
    s[4] = min(s[4], w)
    s[5] = max(s[5], w)


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def assert_matches_brute_force(edge_rows: Iterable[dict], unit_rows: Iterable[dict], graphs: Iterable[Graph]) -> None:
    """Rows (dicts with the export column names) equal the brute-force statistics."""
    ref_edges, ref_units = brute_force(graphs)
    got_edges = {(r["src_layer"], r["src_neuron"], r["tgt_layer"], r["tgt_neuron"]): r for r in edge_rows}
    assert set(got_edges) == set(ref_edges)
    for key, (count, s, sa, sq, mn, mx) in ref_edges.items():
        r = got_edges[key]
        assert r["count"] == count, key
        for name, want in (("weight_sum", s), ("weight_abs_sum", sa), ("weight_sq_sum", sq)):
            assert close(r[name], want), (key, name, r[name], want)
        assert r["weight_min"] == mn and r["weight_max"] == mx, key
    got_units = {(r["layer"], r["neuron"]): r for r in unit_rows}
    assert set(got_units) == set(ref_units)
    for key, rec in ref_units.items():
        r = got_units[key]
        assert r["graph_count"] == len(rec["graphs"]), key
        assert r["observation_count"] == rec["obs"], key
        act, attr = rec["act"], rec["attr"]
        assert close(r["act_sum"], math.fsum(act)) and close(r["act_sq_sum"], math.fsum(a * a for a in act))
        assert r["act_min"] == (min(act) if act else None) and r["act_max"] == (max(act) if act else None)
        assert close(r["attr_sum"], math.fsum(attr)) and close(r["attr_abs_sum"], math.fsum(abs(a) for a in attr))
        assert close(r["attr_sq_sum"], math.fsum(a * a for a in attr))
        assert r["attr_min"] == (min(attr) if attr else None) and r["attr_max"] == (max(attr) if attr else None)


def export_rows(directory) -> tuple[list[dict], list[dict], list[dict]]:
    """(edges, units, ledger) rows of an export directory."""
    import pyarrow.parquet as pq

    return tuple(pq.read_table(f"{directory}/{name}.parquet").to_pylist() for name in ("edges", "units", "ledger"))


@pytest.fixture(scope="session")
def brute() -> object:
    """The reference helpers as a namespace (tests must not import conftest)."""

    class Reference:
        brute_force = staticmethod(brute_force)
        observe = staticmethod(observe)
        assert_matches = staticmethod(assert_matches_brute_force)
        export_rows = staticmethod(export_rows)

    return Reference()


@pytest.fixture
def served_store(tmp_path) -> Iterator[tuple]:
    """A real aggregator gRPC server on port 0 over a fresh store, with a connected client."""
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_aggregator.server import AggregatorServerSettings, build_server
    from circuits_aggregator.store import AggregateStore
    from circuits_aggregator.stream import BatchPolicy

    store = AggregateStore(tmp_path / "state.duckdb")
    server = build_server(AggregatorServerSettings(batch=BatchPolicy(max_graphs=32, max_delay_s=0.02)), store=store).start()
    server.set_serving(True)
    client = AggregatorClient(server.address, timeout=30, max_in_flight=64, reconnect_timeout=5)
    try:
        yield store, server, client
    finally:
        client.close()
        server.stop(0)

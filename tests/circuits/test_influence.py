"""The viewers' node influence (circuit-tracer's definition) and cumulative shares: a hand-computed
example, a brute-force matrix series on random DAGs, the edge cases, and the graph JSON fields."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from circuits_core.influence import (
    BASIS_ATTRIBUTION,
    BASIS_GRAPH,
    cumulative_shares,
    influence_shares,
    logit_weights_from_probabilities,
    propagate_influence,
)
from circuits_core.schemas import Edge, Graph, Unit

# The hand-worked example. Nodes: E0 E1 (embeddings), A (layer 0), B C (layer 1), P Q (logits,
# p = 0.8, 0.2). Edges (source -> target: weight):
EXAMPLE_NODES = ("E0", "E1", "A", "B", "C", "P", "Q")
EXAMPLE_EDGES = (
    ("E0", "A", 2.0), ("E1", "A", -2.0),   # row A: |2|, |-2| -> 1/2, 1/2
    ("A", "B", 1.0), ("E1", "B", 3.0),     # row B: 1/4, 3/4
    ("A", "C", -1.0),                      # row C: 1
    ("B", "P", 2.0), ("C", "P", -2.0),     # row P: 1/2, 1/2
    ("C", "Q", 1.0), ("A", "Q", 3.0),      # row Q: 1/4, 3/4
)
# I_s = sum_t Â[t,s] (I_t + w_t), logits first:
#   I_P = I_Q = 0
#   I_B = 1/2 * 0.8                          = 0.40
#   I_C = 1/2 * 0.8 + 1/4 * 0.2              = 0.45
#   I_A = 1/4 * 0.40 + 1 * 0.45 + 3/4 * 0.2  = 0.70
#   I_E0 = 1/2 * 0.70                        = 0.35
#   I_E1 = 1/2 * 0.70 + 3/4 * 0.40           = 0.65      total 2.55
# ranked A, E1, C, B, E0: cumulative 0.70, 1.35, 1.80, 2.20, 2.55 over 2.55
EXPECTED_INFLUENCE = {"E0": 0.35, "E1": 0.65, "A": 0.70, "B": 0.40, "C": 0.45, "P": 0.0, "Q": 0.0}
EXPECTED_SHARES = {"A": 0.70 / 2.55, "E1": 1.35 / 2.55, "C": 1.80 / 2.55, "B": 2.20 / 2.55, "E0": 1.0, "P": None, "Q": None}


def _columns(nodes, edges):
    row = {name: n for n, name in enumerate(nodes)}
    return [row[s] for s, _, _ in edges], [row[t] for _, t, _ in edges], [w for _, _, w in edges]


def test_influence_of_the_hand_computed_example() -> None:
    src, tgt, w = _columns(EXAMPLE_NODES, EXAMPLE_EDGES)
    logit_w = [0, 0, 0, 0, 0, 0.8, 0.2]
    influence = propagate_influence(len(EXAMPLE_NODES), src, tgt, w, logit_w)
    assert influence == pytest.approx([EXPECTED_INFLUENCE[n] for n in EXAMPLE_NODES], abs=1e-12)
    result = influence_shares(n_nodes=len(EXAMPLE_NODES), sources=src, targets=tgt, weights=w, logit_weights=logit_w,
                              attributions=[None] * 7, is_logit=[n in "PQ" for n in EXAMPLE_NODES])
    assert result.basis == BASIS_GRAPH
    for name, share in zip(EXAMPLE_NODES, result.shares):
        expected = EXPECTED_SHARES[name]
        assert share == (None if expected is None else pytest.approx(expected, abs=1e-12)), name
    # the viewers keep influence <= threshold: at 0.8 B (0.863) goes, at 0.9 it stays
    kept = {n for n, s in zip(EXAMPLE_NODES, result.shares) if s is not None and s <= 0.8}
    assert kept == {"A", "E1", "C"}
    assert {n for n, s in zip(EXAMPLE_NODES, result.shares) if s is not None and s <= 0.9} == {"A", "E1", "C", "B"}


def test_example_through_the_graph_json() -> None:
    layer = {"E0": -1, "E1": -1, "A": 0, "B": 1, "C": 1, "P": 2, "Q": 2}
    kind = {"E0": "embedding", "E1": "embedding", "P": "logit", "Q": "logit"}
    units = {
        name: Unit(layer=layer[name], index=i, position=0, kind=kind.get(name, "neuron"), token=name,
                   probability={"P": 0.8, "Q": 0.2}.get(name), attribution=float(i))
        for i, name in enumerate(EXAMPLE_NODES)
    }
    edges = [Edge(src_layer=units[s].layer, src_index=units[s].index, src_position=0,
                  tgt_layer=units[t].layer, tgt_index=units[t].index, tgt_position=0, weight=w)
             for s, t, w in EXAMPLE_EDGES]
    legacy = Graph(units=tuple(units.values()), edges=tuple(edges), prompt="x", prompt_tokens=("x",)).to_legacy()
    by_token = {n["clerp"].split('"')[1] if n["isLogit"] else n["node_id"]: n for n in legacy["nodes"]}
    assert by_token["0_2_0"]["influence"] == pytest.approx(EXPECTED_SHARES["A"])
    assert by_token["0_2_0"]["attribution"] == 2.0  # the signed score keeps its own key
    assert by_token["1_3_0"]["influence"] == pytest.approx(EXPECTED_SHARES["B"])
    assert by_token["P"]["influence"] is None and by_token["P"]["clerp"] == 'Output "P" (p=0.800)'
    assert legacy["metadata"]["node_threshold"] == 0.8
    assert legacy["metadata"]["pruning_settings"] == {"node_threshold": 0.8, "influence_basis": "graph"}


def _brute_force(n, src, tgt, w, logit_w):
    """wᵀ(Â + Â² + ...) with dense matrices, summed until the powers vanish (a DAG's Â is nilpotent)."""
    adjacency = np.zeros((n, n))
    np.add.at(adjacency, (tgt, src), w)
    a = np.abs(adjacency)
    a_hat = a / np.clip(a.sum(axis=1, keepdims=True), 1e-300, None)
    total = np.zeros(n)
    power = np.asarray(logit_w, dtype=float) @ a_hat
    for _ in range(n + 1):
        total += power
        power = power @ a_hat
    assert not power.any()
    # and the closed form wᵀ((I - Â)^-1 - I)
    closed = np.asarray(logit_w) @ (np.linalg.inv(np.eye(n) - a_hat) - np.eye(n))
    np.testing.assert_allclose(total, closed, rtol=1e-9, atol=1e-12)
    return total


@pytest.mark.parametrize("seed", range(20))
def test_propagation_equals_the_matrix_series_on_random_dags(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 40)
    layer = sorted(rng.randint(0, 6) for _ in range(n))
    pairs = [(s, t) for s in range(n) for t in range(n) if layer[s] < layer[t] and rng.random() < 0.3]
    pairs += [rng.choice(pairs)] * 3 if pairs else []  # parallel edges are summed like matrix entries
    src = [s for s, _ in pairs]
    tgt = [t for _, t in pairs]
    w = [rng.choice([-1, 1]) * rng.lognormvariate(0, 2) for _ in pairs]
    logit_w = [rng.random() if layer[i] == layer[-1] else 0.0 for i in range(n)]
    ours = propagate_influence(n, src, tgt, w, logit_w)
    np.testing.assert_allclose(ours, _brute_force(n, src, tgt, w, logit_w), rtol=1e-9, atol=1e-12)


def test_cumulative_shares_rank_largest_first_and_keep_input_order_for_ties() -> None:
    assert cumulative_shares([1.0, 3.0, 0.0, 1.0]) == pytest.approx([0.8, 0.6, 1.0, 1.0])
    assert cumulative_shares([0.0, 0.0]) is None
    assert cumulative_shares([float("nan"), 2.0, -1.0]) == [1.0, 1.0, 1.0]


def test_cycles_fall_back_to_attribution_and_nothing_gives_none() -> None:
    # 0 -> 1 -> 0 is a cycle: the series has no circuit-tracer meaning; rank |attribution| instead
    assert propagate_influence(3, [0, 1, 1], [1, 0, 2], [1.0, 1.0, 1.0], [0, 0, 1]) is None
    result = influence_shares(n_nodes=3, sources=[0, 1, 1], targets=[1, 0, 2], weights=[1.0, 1.0, 1.0],
                              logit_weights=[0, 0, 1], attributions=[-3.0, 1.0, 5.0], is_logit=[False, False, True])
    # ranked by |attribution| of the non-logits: 3 then 1, of 4
    assert result.basis == BASIS_ATTRIBUTION and result.shares == (pytest.approx(0.75), pytest.approx(1.0), None)
    empty = influence_shares(n_nodes=2, sources=[], targets=[], weights=[], logit_weights=[0, 1],
                             attributions=[None, None], is_logit=[False, True])
    assert empty.shares == (None, None)


def test_huge_weights_do_not_overflow_and_zero_rows_carry_nothing() -> None:
    influence = propagate_influence(3, [0, 1, 0], [2, 2, 1], [1e308, 1e308, 0.0], [0, 0, 1])
    assert influence == pytest.approx([0.5, 0.5, 0.0])
    assert all(math.isfinite(x) for x in influence)


def test_logit_weights_are_probabilities_or_equal_when_missing() -> None:
    assert logit_weights_from_probabilities([0.5, 0.7, None], [False, True, True]) == [0.0, 0.7, 0.0]
    assert logit_weights_from_probabilities([None, float("nan")], [True, True]) == [1.0, 1.0]


def test_viewer_bench_smoke() -> None:
    """benchmarks/viewer_bench.py --smoke runs and checks itself against the dense matrix series."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "viewer_bench.py"
    done = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ratio baseline / ours" in done.stdout and "influence share" in done.stdout


def test_a_logit_with_out_edges_takes_no_share() -> None:
    """A hand-made graph may have a logit feeding another node (found by the legacy round-trip
    property test): the logit has influence, but logits are not ranked, so the ranked nodes'
    shares still rise to 1."""
    # 0 (embedding) -> 2 (logit, w=1); 1 (logit) -> 0; the logit 1 reaches logit 2 through node 0
    result = influence_shares(n_nodes=3, sources=[0, 1], targets=[2, 0], weights=[1.0, 1.0], logit_weights=[0, 1, 1],
                              attributions=[None, None, None], is_logit=[False, True, True])
    assert result.basis == BASIS_GRAPH
    assert result.shares == (pytest.approx(1.0), None, None)
    only_logits = influence_shares(n_nodes=2, sources=[0], targets=[1], weights=[1.0], logit_weights=[1, 1],
                                   attributions=[None, None], is_logit=[True, True])
    assert only_logits.shares == (None, None)

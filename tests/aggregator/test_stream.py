"""Ingest micro-batching (circuits_aggregator.stream): when a batch is committed.

A batch closes at max_graphs, once no graph arrived for max_delay_s, or max_wait_s after its
first graph. Timings are generous (the machine is shared): each case is built so the other
closing rules are far away.
"""

from __future__ import annotations

import time

import numpy as np

from circuits_aggregator.store import AggregateStore
from circuits_aggregator.stream import BatchPolicy, ingest_stream
from circuits_aggregator.testing import random_graph
from circuits_core.aggregator_types import graph_arrays_from_graph


def _graphs(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [graph_arrays_from_graph(random_graph(rng, graph_id=f"s{seed}-{i}")) for i in range(n)]


def _paced(graphs: list, gaps: dict[int, float], every: float = 0.0):
    """The graphs, sleeping ``every`` seconds before each and ``gaps[i]`` before graph i."""
    for i, g in enumerate(graphs):
        time.sleep(every + gaps.get(i, 0.0))
        yield g


def _batch_sizes(graphs, policy: BatchPolicy) -> list[int]:
    store = AggregateStore()
    try:
        sizes = [len(ack.graph_ids) for ack in ingest_stream(store, graphs, policy=policy)]
        assert store.graphs_total == sum(sizes)
        return sizes
    finally:
        store.close()


def test_a_steady_stream_fills_whole_batches():
    # graphs every 20 ms: a fixed 50 ms window would close batches of ~3; the idle gap does not fire
    policy = BatchPolicy(max_graphs=5, max_delay_s=0.5, max_wait_s=30.0)
    assert _batch_sizes(_paced(_graphs(12), {}, every=0.02), policy) == [5, 5, 2]


def test_a_pause_closes_the_batch():
    policy = BatchPolicy(max_graphs=100, max_delay_s=0.1, max_wait_s=30.0)
    assert _batch_sizes(_paced(_graphs(7, 1), {3: 1.0}), policy) == [3, 4]


def test_the_wait_from_the_first_graph_is_capped():
    # a graph every 50 ms never leaves a 1 s gap, but a batch closes 0.3 s after its first graph
    policy = BatchPolicy(max_graphs=100, max_delay_s=1.0, max_wait_s=0.3)
    sizes = _batch_sizes(_paced(_graphs(16, 2), {}, every=0.05), policy)
    assert sum(sizes) == 16 and len(sizes) >= 2 and max(sizes) <= 12

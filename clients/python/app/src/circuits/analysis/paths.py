"""The strongest input-token -> predicted-token paths through a graph (exact k-best)."""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from circuits_core.errors import InvalidArgument
from circuits_core.schemas import Graph, Unit

PathMode = Literal["product", "sum"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitPath:
    """An input-token -> predicted-token path. ``score``: product of edge input fractions
    (mode ``product``) or sum of |weights| (mode ``sum``); ``sign`` = product of edge signs."""

    node_ids: tuple[str, ...]
    weights: tuple[float, ...]
    score: float
    sign: int


def predicted_logit(graph: Graph) -> Unit | None:
    """The logit node with the highest probability (the first logit when none has one)."""
    logits = list(graph.logits)
    if not logits:
        return None
    return max(logits, key=lambda u: (u.probability if u.probability is not None and math.isfinite(u.probability) else -1.0))


def top_paths(
    graph: Graph,
    *,
    k: int = 5,
    mode: PathMode = "product",
    target: str | None = None,
) -> list[CircuitPath]:
    """The ``k`` best paths from an embedding node to ``target`` (default: the predicted logit).

    ``product``: an edge's score is its share of the target node's input, ``|w| / Σ|w_in|``, and
    a path's score the product of its edges' shares (exact k-best by dynamic programming over a
    topological order, in log space). ``sum``: a path's score is the sum of its ``|w|``.
    Edges that would close a cycle are ignored. Paths come back best first.
    """
    if k < 1:
        raise InvalidArgument(f"k must be >= 1, got {k}")
    if mode not in ("product", "sum"):
        raise InvalidArgument(f"path mode must be product or sum, got {mode!r}")
    units = graph.units
    pos = {u.node_key: i for i, u in enumerate(units)}
    if target is None:
        logit = predicted_logit(graph)
        if logit is None:
            return []
        target_i = pos[logit.node_key]
    else:
        ids = {u.node_id: i for i, u in enumerate(units)}
        if target not in ids:
            raise InvalidArgument(f"path target {target!r} is not a node of the graph")
        target_i = ids[target]

    out_edges: dict[int, list[tuple[int, float]]] = defaultdict(list)
    in_abs = [0.0] * len(units)
    indegree = [0] * len(units)
    for e in graph.edges:
        s, t = pos.get(e.src_key), pos.get(e.tgt_key)
        if s is None or t is None or s == t or not e.weight or not math.isfinite(e.weight):
            continue
        out_edges[s].append((t, e.weight))
        in_abs[t] += abs(e.weight)
        indegree[t] += 1
    # Kahn's algorithm; ties broken by (layer, position) so the order is deterministic.
    order_key = [(u.layer, -1 if u.position is None else u.position, i) for i, u in enumerate(units)]
    ready = [order_key[i] for i in range(len(units)) if indegree[i] == 0]
    heapq.heapify(ready)
    topo: list[int] = []
    remaining = list(indegree)
    while ready:
        _, _, i = heapq.heappop(ready)
        topo.append(i)
        for t, _ in out_edges[i]:
            remaining[t] -= 1
            if remaining[t] == 0:
                heapq.heappush(ready, order_key[t])
    rank = {i: r for r, i in enumerate(topo)}  # nodes on cycles are left out

    starts = [i for i, u in enumerate(units) if u.kind == "embedding"] or [i for i in topo if indegree[i] == 0]
    # best[i]: up to k (score, path, weights) partial paths ending at i, best first.
    best: dict[int, list[tuple[float, tuple[int, ...], tuple[float, ...]]]] = {i: [(0.0, (i,), ())] for i in starts}
    for i in topo:
        partial = best.get(i)
        if not partial or i == target_i:
            continue
        for t, w in out_edges[i]:
            if rank.get(t, -1) <= rank[i]:
                continue
            if mode == "product":
                share = abs(w) / in_abs[t]
                step = math.log(share) if share > 0 else -math.inf
            else:
                step = abs(w)
            bucket = best.setdefault(t, [])
            for score, path, weights in partial:
                cand = (score + step, path + (t,), weights + (w,))
                if len(bucket) < k:
                    bucket.append(cand)
                    bucket.sort(key=lambda c: -c[0])
                elif cand[0] > bucket[-1][0]:
                    bucket[-1] = cand
                    bucket.sort(key=lambda c: -c[0])
    paths = []
    for score, path, weights in best.get(target_i, []):
        if len(path) < 2:
            continue
        sign = 1
        for w in weights:
            sign *= 1 if w > 0 else -1
        paths.append(CircuitPath(
            node_ids=tuple(units[i].node_id for i in path),
            weights=weights,
            score=math.exp(score) if mode == "product" else score,
            sign=sign,
        ))
    return paths

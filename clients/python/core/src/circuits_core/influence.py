"""Node influence as circuit-tracer and Neuronpedia's graph viewers read it (relp-spec §D.2, §E).

The viewers prune with one number per node, ``influence``: the node's *cumulative share of total
influence*. Nodes are sorted by influence on the logits, most influential first, and each gets
the running sum of influence up to and including itself divided by the total, so the strongest
node has the smallest value and the viewers keep ``influence <= node_threshold`` (default 0.8:
the nodes that carry 80% of the influence).

Influence on the logits, as circuit-tracer's ``compute_node_influence`` defines it: with the
adjacency ``A[t, s]`` (rows = targets, columns = sources) row-normalised to
``Â = |A| / rowsum(|A|)`` and the logit weight vector ``w`` (each logit's probability, 0 for
other nodes), ``I = wᵀ(Â + Â² + Â³ + …)``. Our graphs are DAGs (edges go from lower to higher
layers), so one pass over the nodes in reverse topological order computes the series exactly:
``I_s = Σ_t Â[t, s] · (I_t + w_t)``, on the edge list (no dense N×N matrix). Row normalisation makes the result the same for the RelP
flow weights and the raw direct-effect weights (flow = raw · RelP_t / h_t, a per-row factor).

Everything here works on plain columns (node count, edge source/target indices, weights) so it
does not care how a Graph stores its edges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_NODE_THRESHOLD = 0.8
"""The viewers' default pruning fraction (circuit-tracer's ``node_threshold``)."""

BASIS_GRAPH = "graph"
BASIS_ATTRIBUTION = "attribution"


@dataclass(frozen=True, slots=True, kw_only=True)
class InfluenceShares:
    """Per-node cumulative influence shares (None where a node gets none, e.g. logits).

    ``basis`` says what was ranked: ``"graph"`` (circuit-tracer influence through the edges) or
    ``"attribution"`` (|RelP| scores, used when no influence reaches the logits through the
    edges, e.g. a graph written without edges).
    """

    shares: tuple[float | None, ...]
    basis: str


def propagate_influence(
    n_nodes: int,
    sources: Sequence[int],
    targets: Sequence[int],
    weights: Sequence[float],
    logit_weights: Sequence[float],
) -> list[float] | None:
    """``wᵀ(Â + Â² + …)`` per node for the DAG given by edges ``sources[e] -> targets[e]``.

    ``logit_weights[n]`` is ``w_n`` (non-zero only for logits). Parallel edges between the same
    pair are summed first, as an adjacency matrix would hold them. Returns None when the edges
    contain a cycle (the series need not converge; circuit-tracer raises there).

    Nodes are finished in waves from the sinks (Kahn's algorithm): a node's influence is final
    once every node it feeds is, and it then passes ``Â[t, s] · (I_t + w_t)`` to each source s.
    Edges are grouped by target, so each wave touches only the edges into its nodes: O(E) in all.
    """
    import numpy as np  # deferred: `import circuits` stays light

    src = np.asarray(sources, dtype=np.int64)
    tgt = np.asarray(targets, dtype=np.int64)
    weight = np.asarray(weights, dtype=np.float64)
    if not (src.shape == tgt.shape == weight.shape):
        raise ValueError("sources, targets and weights differ in length")
    w_logit = np.asarray(logit_weights, dtype=np.float64)
    if w_logit.shape != (n_nodes,):
        raise ValueError("logit_weights must have one entry per node")
    if src.size and (min(src.min(), tgt.min()) < 0 or max(src.max(), tgt.max()) >= n_nodes):
        raise ValueError(f"an edge refers to a node outside 0..{n_nodes - 1}")
    # one entry per (target, source) pair, as in the adjacency matrix; zero entries carry nothing
    pair, inverse = np.unique(tgt * n_nodes + src, return_inverse=True)
    summed = np.abs(np.bincount(inverse, weights=weight, minlength=pair.size))
    keep = (summed > 0) & np.isfinite(summed)
    pair, summed = pair[keep], summed[keep]
    tgt, src = pair // n_nodes, pair % n_nodes  # sorted by target
    # |A[t, s]| / Σ_s |A[t, s]|, scaled by the row maximum first so huge weights cannot overflow
    row_max = np.zeros(n_nodes)
    np.maximum.at(row_max, tgt, summed)
    scaled = summed / row_max[tgt]
    a_hat = scaled / np.bincount(tgt, weights=scaled, minlength=n_nodes)[tgt]
    starts = np.searchsorted(tgt, np.arange(n_nodes + 1))
    remaining = np.bincount(src, minlength=n_nodes)  # targets each node feeds that are not done
    influence = np.zeros(n_nodes)
    wave = np.flatnonzero(remaining == 0)
    done = 0
    while wave.size:
        done += wave.size
        counts = starts[wave + 1] - starts[wave]
        if not counts.any():
            break
        # the edge indices into this wave's nodes: concatenated ranges starts[t]..starts[t+1]
        offsets = np.repeat(starts[wave] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        e_src = src[offsets]
        np.add.at(influence, e_src, a_hat[offsets] * (influence + w_logit)[tgt[offsets]])
        fed, n_fed = np.unique(e_src, return_counts=True)
        remaining[fed] -= n_fed
        wave = fed[remaining[fed] == 0]
    return influence.tolist() if done == n_nodes else None


def cumulative_shares(scores: Sequence[float]) -> list[float] | None:
    """Each node's cumulative share of the total when sorted by score, largest first.

    Ties keep their input order (a stable sort). Returns None when the scores sum to zero.
    """
    clean = [s if math.isfinite(s) and s > 0.0 else 0.0 for s in scores]
    largest = max(clean, default=0.0)
    if not largest > 0.0:
        return None
    # Shares are scale-free: dividing by the largest score keeps the sum finite for any finite input.
    clean = [s / largest for s in clean]
    total = math.fsum(clean)
    order = sorted(range(len(clean)), key=lambda n: -clean[n])
    shares = [0.0] * len(clean)
    running = 0.0
    for n in order:
        running += clean[n]
        shares[n] = min(1.0, running / total)
    return shares


def influence_shares(
    *,
    n_nodes: int,
    sources: Sequence[int],
    targets: Sequence[int],
    weights: Sequence[float],
    logit_weights: Sequence[float],
    attributions: Sequence[float | None],
    is_logit: Sequence[bool],
) -> InfluenceShares:
    """The ``influence`` field of every node (None for logits, as circuit-tracer writes them).

    Ranks by graph influence when it reaches any node; otherwise (no edges, or a cyclic edge set
    that has no circuit-tracer influence) by |attribution|.
    """
    influence = propagate_influence(n_nodes, sources, targets, weights, logit_weights)
    basis = BASIS_GRAPH
    # Logits are not ranked (their field is None): a logit with out-edges (possible in a hand-made
    # graph) would otherwise take a share, and the ranked nodes' largest share would stay below 1.
    shares = (cumulative_shares([0.0 if is_logit[n] else v for n, v in enumerate(influence)])
              if influence is not None else None)  # fmt: skip
    if shares is None:
        basis = BASIS_ATTRIBUTION
        # a logit's "attribution" is its logit value, not an effect on the logits: not ranked
        shares = cumulative_shares(
            [abs(a) if a is not None and not is_logit[n] else 0.0 for n, a in enumerate(attributions)]
        )
    if shares is None:
        return InfluenceShares(shares=(None,) * n_nodes, basis=basis)
    return InfluenceShares(shares=tuple(None if is_logit[n] else shares[n] for n in range(n_nodes)), basis=basis)


def logit_weights_from_probabilities(probabilities: Sequence[float | None], is_logit: Sequence[bool]) -> list[float]:
    """circuit-tracer's ``w``: each logit's probability; equal weights when no logit has one."""
    weights = [
        float(p) if is_logit[n] and p is not None and math.isfinite(p) and p > 0.0 else 0.0
        for n, p in enumerate(probabilities)
    ]
    if not any(weights):
        weights = [1.0 if flag else 0.0 for flag in is_logit]
    return weights

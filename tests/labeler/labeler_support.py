"""Shared constants and evidence builders of the labeler tests (imported by conftest and tests)."""

from __future__ import annotations

NUM_LAYERS = 4
NEURONS = 8
SECRET_KEY = "sk-test-DO-NOT-LOG-7f3a9c"


def evidence_edges() -> list[tuple[int, int, int, int, int, float]]:
    """Every neuron of layer l drives two neurons of layer l+1 (one excites, one inhibits)."""
    edges = []
    for layer in range(NUM_LAYERS - 1):
        for n in range(NEURONS):
            edges.append((layer, n, layer + 1, n, 5, 0.2 + 0.01 * n))
            edges.append((layer, n, layer + 1, (n + 3) % NEURONS, 3, -0.1))
    return edges


def evidence_units() -> list[tuple[int, int, int]]:
    # Neuron 7 of every layer never appeared: never a candidate with min_appearances=1.
    return [(l, n, 0 if n == 7 else 10 + n) for l in range(NUM_LAYERS) for n in range(NEURONS)]

"""circuits: RelP neuron attribution graphs, their aggregation, labels, clusters and atlas.

``import circuits`` is light: it never imports torch, duckdb or anthropic. The seed-compatible
names backed by the service packages (``RelPAttributor``, ``RelPConfig``,
``cluster_full_model``) are re-exported lazily and import their package on first use.
"""

from __future__ import annotations

from typing import Any

from circuits_core.connectivity import ConnectivitySpec
from circuits_core.errors import CircuitsError
from circuits_core.graphdiff import GraphDiff, diff_graphs
from circuits_core.patching import PatchNeuron, PatchRequest
from circuits_core.schemas import Edge, Graph, GraphMetadata, Unit, UnitLabel

__version__ = "0.1.0"

_LAZY = {
    "RelPAttributor": ("circuits_attribution", "RelPAttributor"),
    "RelPConfig": ("circuits_attribution", "RelPConfig"),
    "cluster_full_model": ("circuits_atlas", "cluster_full_model"),
    "load_model": ("circuits_attribution", "load_model"),
    "compute_connectivity": ("circuits_attribution.connectivity", "compute_connectivity"),
    "Patcher": ("circuits_attribution.patching", "Patcher"),
}

__all__ = [
    "CircuitsError",
    "ConnectivitySpec",
    "GraphDiff",
    "PatchNeuron",
    "PatchRequest",
    "diff_graphs",
    "Edge",
    "Graph",
    "GraphMetadata",
    "Unit",
    "UnitLabel",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from circuits.extras import require

        module_name, attr = _LAZY[name]
        return getattr(require(module_name, what=f"circuits.{name}"), attr)
    raise AttributeError(f"module 'circuits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

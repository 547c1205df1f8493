"""circuits atlas service: Infomap clustering, the DuckDB atlas build and its read-only query API.

``from circuits_atlas import cluster_full_model, CircuitDatabase, build_atlas``; names are imported
on first use so ``import circuits_atlas`` stays light.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "cluster_full_model": "circuits_atlas.clustering",
    "cluster_graph": "circuits_atlas.clustering",
    "FullModelClustering": "circuits_atlas.clustering",
    "GraphClustering": "circuits_atlas.clustering",
    "CircuitDatabase": "circuits_atlas.database",
    "QueryLimits": "circuits_atlas.database",
    "build_atlas": "circuits_atlas.build",
    "BuildReport": "circuits_atlas.build",
    "ClusterSettings": "circuits_atlas.build",
    "write_clusters": "circuits_atlas.build",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'circuits_atlas' has no attribute {name!r}")

"""One analysis: label -> cluster -> paths -> LLM write-up, with the label and cluster sources injected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from circuits.analysis.clusters import ClusterInfo, GraphClusterer, atlas_clusters, cluster_graph, with_clusters
from circuits.analysis.labels import NamedLabelSource, label_graph
from circuits.analysis.llm import LLMAnalysis, llm_analysis
from circuits.analysis.paths import CircuitPath, PathMode, top_paths
from circuits_core.config import LabelingSection
from circuits_core.schemas import Graph


@dataclass(frozen=True, slots=True, kw_only=True)
class AnalysisResult:
    graph: Graph
    label_sources: Mapping[str, str]
    clusters: tuple[ClusterInfo, ...]
    paths: tuple[CircuitPath, ...]
    path_mode: str
    analysis: LLMAnalysis
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AnalysisSettings:
    """What an analysis does besides its injected sources."""

    #: Number of top input -> prediction paths (0: none).
    n_paths: int = 5
    #: Path score: product of each edge's share of its target's input, or sum of |weights|.
    path_mode: PathMode = "product"
    #: Ask the LLM for a write-up (skipped with a reason when off or without a key).
    use_llm: bool = True
    #: LLM backend, model and key for the write-up.
    llm: LabelingSection = field(default_factory=LabelingSection)
    #: Folder relative paths in ``llm`` (api_key_file) resolve against.
    base_dir: str = "."


def analyze_graph(
    graph: Graph,
    *,
    label_sources: Sequence[NamedLabelSource] = (),
    clusterer: GraphClusterer = atlas_clusters,
    settings: AnalysisSettings = AnalysisSettings(),
) -> AnalysisResult:
    """Label, cluster, find paths in and explain one graph (no files written)."""
    warnings: list[str] = []
    labelled, sources = label_graph(graph, label_sources, warn=warnings.append)
    clusters = cluster_graph(labelled, clusterer)
    clustered = with_clusters(labelled, clusters)
    paths = top_paths(clustered, k=settings.n_paths, mode=settings.path_mode) if settings.n_paths > 0 else []
    analysis = llm_analysis(
        clustered, clusters, paths, settings.llm, base_dir=settings.base_dir, enabled=settings.use_llm
    )
    return AnalysisResult(
        graph=clustered, label_sources=sources, clusters=tuple(clusters), paths=tuple(paths),
        path_mode=settings.path_mode, analysis=analysis, warnings=tuple(warnings),
    )

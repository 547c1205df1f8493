"""Circuit analysis of one graph: labels -> clusters -> top paths -> LLM write-up -> report.

Transport-neutral and engine-free: the graph comes from the caller (``circuits analyze`` traces it
through :func:`circuits.backends.open_tracer`), and the label and cluster sources are injected.
Heavy imports (infomap, duckdb, LLM SDKs) happen inside the functions that need them.

* :mod:`~circuits.analysis.labels` — label sources (atlas, label file, neuron database, the
  labeler's output file) and :func:`label_graph`; neurons without a label are marked ``unlabelled``;
* :mod:`~circuits.analysis.clusters` — :func:`cluster_graph` with the atlas's single-graph Infomap
  clustering by default, and the ``qParams.supernodes`` of :func:`with_clusters`;
* :mod:`~circuits.analysis.paths` — :func:`top_paths`, the k best input-token -> prediction paths;
* :mod:`~circuits.analysis.llm` — :func:`llm_analysis`, the LLM write-up (skipped without a key);
* :mod:`~circuits.analysis.pipeline` — :func:`analyze_graph`, the steps above in order;
* :mod:`~circuits.analysis.report` — :func:`write_report`: report.md, report.html, graph.json, summary.json.
"""

from __future__ import annotations

from circuits.analysis.clusters import ClusterInfo, GraphClusterer, atlas_clusters, cluster_graph, with_clusters
from circuits.analysis.labels import (
    UNLABELLED,
    AtlasLabels,
    LabelSource,
    NamedLabelSource,
    configured_label_sources,
    display_unit,
    label_graph,
)
from circuits.analysis.llm import SYSTEM_PROMPT, LLMAnalysis, analysis_prompt, llm_analysis
from circuits.analysis.paths import CircuitPath, PathMode, predicted_logit, top_paths
from circuits.analysis.pipeline import AnalysisResult, AnalysisSettings, analyze_graph
from circuits.analysis.report import report_html_section, report_markdown, summary_dict, write_report

__all__ = [
    "SYSTEM_PROMPT",
    "UNLABELLED",
    "AnalysisResult",
    "AnalysisSettings",
    "AtlasLabels",
    "CircuitPath",
    "ClusterInfo",
    "GraphClusterer",
    "LLMAnalysis",
    "LabelSource",
    "NamedLabelSource",
    "PathMode",
    "analysis_prompt",
    "analyze_graph",
    "atlas_clusters",
    "cluster_graph",
    "configured_label_sources",
    "display_unit",
    "label_graph",
    "llm_analysis",
    "predicted_logit",
    "report_html_section",
    "report_markdown",
    "summary_dict",
    "top_paths",
    "with_clusters",
    "write_report",
]

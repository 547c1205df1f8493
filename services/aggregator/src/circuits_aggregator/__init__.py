"""circuits aggregator service: exactly-once streaming edge and neuron statistics over many graphs.

Domain: :mod:`.store` (DuckDB engine), :mod:`.stream`
(micro-batched ingest), :mod:`.directory` (``circuits aggregate DIR``), :mod:`.merge` (combine
shard exports), :mod:`.compat` (seed API). Graph files are read by
:func:`circuits_core.graphio.read_graph_arrays` (the graph file owner). gRPC: :mod:`.servicer`, :mod:`.server`, ``__main__``.
"""

from __future__ import annotations

from circuits_aggregator.compat import InMemoryAggregator
from circuits_aggregator.directory import DirectoryReport, aggregate_directory
from circuits_aggregator.merge import merge_exports
from circuits_aggregator.store import AggregateStore, StoreSettings

__all__ = [
    "AggregateStore",
    "DirectoryReport",
    "InMemoryAggregator",
    "StoreSettings",
    "aggregate_directory",
    "merge_exports",
]

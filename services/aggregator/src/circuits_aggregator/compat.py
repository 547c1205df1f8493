"""The seed-compatible API: ``InMemoryAggregator(path).process_directory(dir)``, ``get_edges``, ``get_units``.

Backed by :class:`~circuits_aggregator.store.AggregateStore`; "in memory" survives as a name
only - pass a path to keep the state (a ``.duckdb`` file, or a directory that receives
``aggregate.duckdb``), or nothing for a throwaway in-memory database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from circuits_core.aggregator_types import graph_arrays_from_graph
from circuits_core.schemas import Edge, Graph, Unit

from circuits_aggregator.directory import DirectoryReport, aggregate_directory
from circuits_aggregator.store import AggregateStore, StoreSettings


def _state_path(path: str | Path | None) -> str:
    if path is None or str(path) == ":memory:":
        return ":memory:"
    p = Path(path)
    if p.is_dir() or not p.suffix:
        return str(p / "aggregate.duckdb")
    return str(p)


class InMemoryAggregator:
    """Per-edge and per-neuron statistics over many graphs, exactly once and resumable."""

    def __init__(self, path: str | Path | None = None, *, settings: StoreSettings | None = None) -> None:
        self.store = AggregateStore(_state_path(path), settings)

    # -- input ---------------------------------------------------------------------------------
    def process_directory(
        self, directory: str | Path, checkpoint_interval: int = 500, max_graphs: int = 0, *, progress: bool = False
    ) -> DirectoryReport:
        """Count every graph file under ``directory`` not yet counted; corrupt files are skipped and reported."""
        return aggregate_directory(
            self.store, directory, checkpoint_interval=checkpoint_interval, max_graphs=max_graphs, progress=progress
        )

    def add_graph(self, graph: Graph, *, source: str = "") -> bool:
        """Count one graph; False when its graph_id was already counted."""
        return self.store.ingest_batch([graph_arrays_from_graph(graph, source=source)]).new_graphs == 1

    # -- output --------------------------------------------------------------------------------
    @property
    def graphs_processed(self) -> int:
        return self.store.graphs_total

    @property
    def total_edge_observations(self) -> int:
        return self.store.stats().total_edge_observations

    def get_edges(self, min_count: int = 1) -> list[Edge]:
        """Aggregated edges with ``count >= min_count`` (weight = mean weight), most observed first."""
        return self.store.edge_columns(min_count=min_count).to_edges()

    def get_units(self) -> list[Unit]:
        """Neurons with ``appearance_count`` = number of graphs they appear in, by (layer, neuron)."""
        table = self.store.unit_table()
        layers, neurons, graphs = (table.column(c).to_pylist() for c in ("layer", "neuron", "graph_count"))
        return [Unit(layer=l, index=n, appearance_count=g) for l, n, g in zip(layers, neurons, graphs)]

    def export(self, directory: str | Path, *, min_count: int = 1) -> list[Path]:
        """Parquet snapshot (edges/units/ledger.parquet) for the atlas build."""
        return self.store.export(directory, min_count=min_count)

    def stats(self) -> Any:
        return self.store.stats()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> InMemoryAggregator:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

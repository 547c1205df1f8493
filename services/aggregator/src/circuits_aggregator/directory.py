"""Aggregating a directory of graph files (``circuits aggregate DIR``), resumable.

Files are processed in sorted order of their path relative to the directory (that relative path
is the ledger's ``source``). Every ``checkpoint_interval`` readable graphs are committed in one
transaction. On resume, files whose source is already in the ledger are skipped without being
read; anything re-read is still filtered by graph id, so a graph never counts twice. Unreadable,
truncated or malformed files are reported (file name + reason) and skipped; they are never
counted and the run goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from circuits_core.aggregator_types import GraphArrays
from circuits_core.errors import CorruptInput, InvalidArgument
from circuits_core.graphio import is_graph_file, read_graph_arrays

from circuits_aggregator.store import AggregateStore


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectoryReport:
    """What one pass over a directory did."""

    files: int = 0
    #: Graphs newly counted in this run.
    ingested: int = 0
    #: Readable graphs whose id was already in the ledger (or repeated in the directory).
    duplicates: int = 0
    #: Files skipped because their source was already in the ledger (resume).
    resumed_skips: int = 0
    #: Graphs another shard owns.
    rejected: int = 0
    #: (file, reason) of every corrupt or unreadable file.
    corrupt: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    #: Neuron -> neuron link observations of the graphs newly counted.
    edge_observations: int = 0
    seconds: float = 0.0


def list_graph_files(directory: str | Path) -> list[Path]:
    """Graph files under ``directory`` (recursively), sorted by relative path."""
    root = Path(directory)
    if not root.is_dir():
        raise InvalidArgument(f"{root}: not a directory")
    return sorted((p for p in root.rglob("*") if p.is_file() and is_graph_file(p)), key=lambda p: p.relative_to(root).as_posix())


def aggregate_directory(
    store: AggregateStore,
    directory: str | Path,
    *,
    checkpoint_interval: int = 500,
    max_graphs: int = 0,
    progress: bool = True,
    on_corrupt: Callable[[str, str], None] | None = None,
) -> DirectoryReport:
    """Count every graph file of ``directory`` into ``store`` exactly once (see module doc)."""
    import time

    from tqdm import tqdm

    if checkpoint_interval < 1:
        raise InvalidArgument(f"checkpoint interval must be >= 1, got {checkpoint_interval}")
    root = Path(directory)
    files = list_graph_files(root)
    started = time.perf_counter()
    corrupt: list[tuple[str, str]] = []
    counts = {"ingested": 0, "duplicates": 0, "resumed": 0, "rejected": 0, "edges": 0}
    bar = tqdm(total=len(files), unit="graph", desc="aggregate", disable=not progress, dynamic_ncols=True)
    pending: list[GraphArrays] = []

    def commit() -> None:
        if not pending:
            return
        outcome = store.ingest_batch(pending)
        counts["ingested"] += outcome.new_graphs
        counts["edges"] += outcome.new_edge_observations
        counts["duplicates"] += outcome.ack.duplicates
        counts["rejected"] += len(outcome.ack.rejected_graph_ids)
        pending.clear()

    try:
        for start in range(0, len(files), checkpoint_interval):
            chunk = files[start : start + checkpoint_interval]
            sources = [p.relative_to(root).as_posix() for p in chunk]
            done = store.known_sources(sources)
            for path, source in zip(chunk, sources):
                if max_graphs and counts["ingested"] + len(pending) >= max_graphs:
                    break
                if source in done:
                    counts["resumed"] += 1
                    bar.update(1)
                    continue
                try:
                    arrays = read_graph_arrays(path, source=source)
                    store.check_graph(arrays)  # another model or shape: reported and skipped like a corrupt file
                    pending.append(arrays)
                except (CorruptInput, InvalidArgument) as exc:
                    corrupt.append((source, str(exc)))
                    message = f"skipped: {exc}"
                    bar.write(message, file=sys.stderr)
                    if on_corrupt is not None:
                        on_corrupt(source, message)
                bar.update(1)
            commit()
            bar.set_postfix(graphs=store.graphs_total, corrupt=len(corrupt), refresh=False)
            if max_graphs and counts["ingested"] >= max_graphs:
                break
    finally:
        bar.close()
    return DirectoryReport(
        files=len(files),
        ingested=counts["ingested"],
        duplicates=counts["duplicates"],
        resumed_skips=counts["resumed"],
        rejected=counts["rejected"],
        corrupt=tuple(corrupt),
        edge_observations=counts["edges"],
        seconds=time.perf_counter() - started,
    )

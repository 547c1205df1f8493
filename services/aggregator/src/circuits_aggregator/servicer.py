"""AggregatorService: decode -> AggregateStore -> encode. Nothing else lives here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from circuits_core import wire
from circuits_core._proto.circuits.v1 import aggregator_pb2, aggregator_pb2_grpc
from circuits_core.errors import InvalidArgument, echo
from circuits_core.limits import DEFAULT_LIMITS, Limits

from circuits_aggregator.store import AggregateStore
from circuits_aggregator.stream import BatchPolicy, ingest_stream


def _decode(requests: Iterator[Any], store: AggregateStore) -> Iterator[Any]:
    """Graphs of the stream; the first bad one (malformed, other model or shape) ends it with
    InvalidArgument after the graphs before it were committed."""
    for msg in requests:
        if not msg.graph_id:
            raise InvalidArgument("Ingest: graph_id is empty (it is the exactly-once identity; the client sets it)")
        try:
            arrays = wire.graph_arrays_from_proto(msg, source="grpc")
            store.check_graph(arrays)
        except InvalidArgument as exc:
            raise InvalidArgument(f"Ingest: graph {echo(msg.graph_id)}: {exc}") from None
        yield arrays


class AggregatorServicer(aggregator_pb2_grpc.AggregatorServiceServicer):
    def __init__(
        self,
        store: AggregateStore,
        *,
        policy: BatchPolicy | None = None,
        limits: Limits = DEFAULT_LIMITS,
        export_root: str | Path | None = None,
    ) -> None:
        """``export_root``: the only folder Export may write under (default: the folder of the
        store's state file; the working directory for an in-memory store)."""
        self.store = store
        self.policy = policy or BatchPolicy()
        self.limits = limits
        if not export_root:
            export_root = Path.cwd() if store.path == ":memory:" else Path(store.path).parent
        self.export_root = Path(export_root).resolve()

    def _export_directory(self, directory: str) -> Path:
        """``directory`` resolved; InvalidArgument when it lies outside :attr:`export_root`."""
        try:
            resolved = Path(directory).resolve()
        except (ValueError, OSError) as exc:  # NUL byte, a loop of links
            raise InvalidArgument(f"Export: directory {echo(directory, quote=False)} is not a usable path ({exc})") from None
        if not resolved.is_relative_to(self.export_root):
            raise InvalidArgument(f"Export: directory {echo(directory, quote=False)} is outside the export root {self.export_root}")
        return resolved

    def Ingest(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        for ack in ingest_stream(self.store, _decode(request_iterator, self.store), policy=self.policy):
            yield wire.ingest_ack_to_proto(ack)

    def GetEdges(self, request: Any, context: Any) -> Iterator[Any]:
        batch_size = request.batch_size  # 0 = store default; negative is refused by the store
        if batch_size > 0:
            batch_size = self.limits.clamp("max_edges_per_batch", batch_size)
        for cols in self.store.iter_edge_columns(min_count=request.min_count, limit=request.limit, batch_size=batch_size):
            yield wire.edge_columns_to_proto(cols)

    def Stats(self, request: Any, context: Any) -> Any:
        return wire.aggregator_stats_to_proto(self.store.stats())

    def Export(self, request: Any, context: Any) -> Any:
        if not request.directory:
            raise InvalidArgument("Export: directory is required")
        files = self.store.export(self._export_directory(request.directory), min_count=request.min_count)
        return aggregator_pb2.ExportResponse(
            files=[str(f) for f in files], stats=wire.aggregator_stats_to_proto(self.store.stats())
        )

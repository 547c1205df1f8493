"""Wiring of the aggregator gRPC server (no logic: see servicer.py and store.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from circuits_core import wire
from circuits_core._proto.circuits.v1 import aggregator_pb2_grpc
from circuits_core.limits import Limits
from circuits_server.serving import GrpcServer, ServerSettings, build_grpc_server

from circuits_aggregator._kernels import warm
from circuits_aggregator.heap import keep_freed_memory
from circuits_aggregator.servicer import AggregatorServicer
from circuits_aggregator.store import AggregateStore
from circuits_aggregator.stream import BatchPolicy

SERVICE_NAME = "circuits.v1.AggregatorService"


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregatorServerSettings:
    """Everything `circuits serve aggregator` configures."""

    server: ServerSettings = field(default_factory=ServerSettings)
    #: Ingest micro-batching (commit every N graphs or T seconds, whichever first).
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    #: Request limits (GetEdges batch size).
    limits: Limits = field(default_factory=Limits)
    #: The only folder Export may write under; empty = the folder of the store's state file.
    export_root: str = ""


def build_server(settings: AggregatorServerSettings, *, store: AggregateStore) -> GrpcServer:
    """A (not yet started) server for ``store``; stopping the server closes the store."""
    warm()  # compiled kernels ready before the port opens
    keep_freed_memory()  # batch buffers are reused, not faulted in again per batch
    servicer = AggregatorServicer(store, policy=settings.batch, limits=settings.limits, export_root=settings.export_root)
    handle = build_grpc_server(
        settings=settings.server,
        service_names=[SERVICE_NAME],
        add_servicers=lambda server: aggregator_pb2_grpc.add_AggregatorServiceServicer_to_server(servicer, server),
        # Ingest graphs are read straight from their bytes (wire.graph_request_from_bytes)
        request_decoders={f"/{SERVICE_NAME}/Ingest": wire.graph_request_from_bytes},
    )
    handle.on_stop.append(store.close)
    return handle

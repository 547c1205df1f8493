"""Wiring of the atlas gRPC server: settings, the shared plumbing, the servicer.

``build_server(settings, database=CircuitDatabase(path))`` returns a not-yet-started
:class:`circuits_server.serving.GrpcServer`; ``__main__`` picks the real database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from circuits_server.serving import GrpcServer, ServerSettings, build_grpc_server

from circuits_atlas.database import CircuitDatabase, QueryLimits
from circuits_atlas.servicer import AtlasServicer

SERVICE_NAME = "circuits.v1.AtlasService"


@dataclass(frozen=True, slots=True, kw_only=True)
class AtlasSettings:
    """Everything the atlas server needs."""

    #: Atlas DuckDB file, opened read-only.
    duckdb_path: str
    #: Network settings (port 0 picks a free port).
    server: ServerSettings = field(default_factory=ServerSettings)
    #: Result-size and query-time guards.
    limits: QueryLimits = field(default_factory=QueryLimits)
    #: Hold search postings and labels in memory (CircuitDatabase ``preload``).
    preload: bool = True


class _Undecodable:
    """Stands in for a request whose bytes did not parse (e.g. a string field with invalid UTF-8)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class RequestDecodeInterceptor(grpc.ServerInterceptor):
    """Turns undecodable request bytes into INVALID_ARGUMENT instead of grpc's generic INTERNAL."""

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or not handler.unary_unary or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        behavior = handler.unary_unary

        def tolerant_decode(raw: bytes) -> Any:
            try:
                return decode(raw)
            except Exception as exc:  # noqa: BLE001 - any parse failure is the client's fault
                return _Undecodable(str(exc) or type(exc).__name__)

        def run(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                # Outermost interceptor: the error interceptor is inside, so abort here directly.
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request could not be decoded ({request.reason[:200]})")
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(run, tolerant_decode, handler.response_serializer)


def build_server(settings: AtlasSettings, *, database: CircuitDatabase | None = None) -> GrpcServer:
    """A configured, not started server; the database is closed when the server stops."""
    from circuits_core._proto.circuits.v1 import atlas_pb2_grpc

    db = database or CircuitDatabase(settings.duckdb_path, read_only=True, limits=settings.limits, preload=settings.preload)
    servicer = AtlasServicer(db)
    server = build_grpc_server(
        settings=settings.server,
        service_names=(SERVICE_NAME,),
        add_servicers=lambda s: atlas_pb2_grpc.add_AtlasServiceServicer_to_server(servicer, s),
        interceptors=(RequestDecodeInterceptor(),),
    )
    server.on_stop.append(db.close)
    return server

"""Wiring of the atlas gRPC server: settings, the shared plumbing, the servicer.

``build_server(settings, database=CircuitDatabase(path))`` returns a not-yet-started
:class:`circuits_server.serving.GrpcServer`; ``__main__`` picks the real database.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


def build_server(settings: AtlasSettings, *, database: CircuitDatabase | None = None) -> GrpcServer:
    """A configured, not started server; the database is closed when the server stops."""
    from circuits_core._proto.circuits.v1 import atlas_pb2_grpc

    db = database or CircuitDatabase(settings.duckdb_path, read_only=True, limits=settings.limits, preload=settings.preload)
    servicer = AtlasServicer(db)
    server = build_grpc_server(
        settings=settings.server,
        service_names=(SERVICE_NAME,),
        add_servicers=lambda s: atlas_pb2_grpc.add_AtlasServiceServicer_to_server(servicer, s),
    )
    server.on_stop.append(db.close)
    return server

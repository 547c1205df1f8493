"""Build the labeler gRPC server (health, reflection, metrics, shutdown from circuits_server.serving)."""

from __future__ import annotations

from circuits_core._proto.circuits.v1 import labeler_pb2_grpc
from circuits_core.limits import DEFAULT_LIMITS, Limits
from circuits_server.serving import GrpcServer, ServerSettings, build_grpc_server

from circuits_labeler.service import LabelerService
from circuits_labeler.servicer import LabelerServicer

SERVICE_NAME = "circuits.v1.LabelerService"


def build_server(settings: ServerSettings, *, service: LabelerService, limits: Limits = DEFAULT_LIMITS) -> GrpcServer:
    """A created (not started) server exposing ``service``."""
    return build_grpc_server(
        settings=settings,
        service_names=[SERVICE_NAME],
        add_servicers=lambda server: labeler_pb2_grpc.add_LabelerServiceServicer_to_server(
            LabelerServicer(service, limits=limits), server
        ),
    )

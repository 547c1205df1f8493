"""AtlasService: decode the request, call :class:`~circuits_atlas.database.CircuitDatabase`, encode.

Errors are domain exceptions (InvalidArgument, NotFound, DeadlineExceeded); the shared server
interceptor turns them into status codes. The remaining client deadline bounds each query.
"""

from __future__ import annotations

from typing import Any

import grpc

from circuits_core import wire
from circuits_core._proto.circuits.v1 import atlas_pb2_grpc
from circuits_core.errors import NotFound

from circuits_atlas.database import CircuitDatabase


def _time_left(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 0.0)


class AtlasServicer(atlas_pb2_grpc.AtlasServiceServicer):
    """Thin adapter over a read-only CircuitDatabase."""

    def __init__(self, database: CircuitDatabase) -> None:
        self.database = database

    def SearchUnits(self, request: Any, context: grpc.ServicerContext) -> Any:
        hits = self.database.search(request.text, request.limit, min_score=request.min_score, timeout=_time_left(context))
        return wire.search_hits_to_proto(hits)

    def GetUnit(self, request: Any, context: grpc.ServicerContext) -> Any:
        unit = self.database.get_unit(request.layer, request.index, timeout=_time_left(context))
        if unit is None:
            raise NotFound(f"unit L{request.layer}/N{request.index} is not in the atlas")
        return wire.unit_to_proto(unit)

    def GetUnitCard(self, request: Any, context: grpc.ServicerContext) -> Any:
        card = self.database.get_unit_card(request.layer, request.index, timeout=_time_left(context))
        if card is None:
            raise NotFound(f"unit L{request.layer}/N{request.index} is not in the atlas")
        return wire.unit_card_to_proto(card)

    def GetEdgesForUnit(self, request: Any, context: grpc.ServicerContext) -> Any:
        edges = self.database.get_edges_for_unit(
            request.layer,
            request.index,
            direction=wire.edge_direction_from_proto(request.direction),
            limit=request.limit,
            min_count=request.min_count,
            timeout=_time_left(context),
        )
        return wire.edges_response_to_proto(edges)

    def GetCluster(self, request: Any, context: grpc.ServicerContext) -> Any:
        members = self.database.get_cluster(request.cluster, request.limit, timeout=_time_left(context))
        return wire.cluster_members_to_proto(members)

    def Stats(self, request: Any, context: grpc.ServicerContext) -> Any:
        return wire.atlas_stats_to_proto(self.database.stats(timeout=_time_left(context)))

    def GetUnitProjections(self, request: Any, context: grpc.ServicerContext) -> Any:
        proj = self.database.get_unit_projections(request.layer, request.index, timeout=_time_left(context))
        return wire.unit_projections_to_proto(proj)

    def GetWeightEdges(self, request: Any, context: grpc.ServicerContext) -> Any:
        edges = self.database.get_weight_edges(
            request.layer,
            request.index,
            direction=wire.edge_direction_from_proto(request.direction),
            limit=request.limit,
            polarity=request.polarity,
            timeout=_time_left(context),
        )
        return wire.weight_edges_to_proto(edges)

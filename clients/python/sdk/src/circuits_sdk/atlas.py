"""AtlasClient: the Python client of the atlas query service (the gRPC :class:`~circuits_core.capabilities.AtlasQueries`).

``with AtlasClient("localhost:50054") as atlas: atlas.search_units("enzyme")``. Answers are the
domain types (:class:`~circuits_core.schemas.Unit`, :class:`~circuits_core.schemas.Edge`,
:mod:`circuits_core.atlas_types`); failures raise the same :class:`~circuits_core.errors.CircuitsError`
classes the server raised. Every call is read-only, so UNAVAILABLE is retried.
"""

from __future__ import annotations

from typing import Any

from circuits_core import wire
from circuits_core.atlas_types import AtlasStats, ClusterMembers, SearchHit, UnitCard
from circuits_core.errors import NotFound
from circuits_core.connectivity import UnitProjections, WeightEdge
from circuits_sdk._channel import DEFAULT_TIMEOUT, call_unary, open_channel
from circuits_core.schemas import Edge, Unit


class AtlasClient:
    """Client of ``circuits.v1.AtlasService`` at ``target`` (``host:port``)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        token: str = "",
        tls_ca_file: str = "",
        tls_cert_file: str = "",
        tls_key_file: str = "",
    ) -> None:
        """``token`` adds a bearer token; TLS files as for :func:`~circuits_sdk._channel.open_channel`."""
        from circuits_core._proto.circuits.v1 import atlas_pb2, atlas_pb2_grpc

        self._pb = atlas_pb2
        self.target = target
        self.timeout = timeout
        self._channel = open_channel(target, token=token, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file)
        self._stub = atlas_pb2_grpc.AtlasServiceStub(self._channel)

    def __enter__(self) -> AtlasClient:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        return call_unary(method, request, timeout=self.timeout if timeout is None else timeout, idempotent=True)

    def search(self, text: str, limit: int = 0, *, min_score: float = 0.0, timeout: float | None = None) -> list[SearchHit]:
        """Ranked search hits (unit + score) for label text; limit 0 = server default; ``min_score``
        keeps units with a label whose detection score is at least that (0 = no filter)."""
        request = self._pb.SearchUnitsRequest(text=text, limit=limit, min_score=min_score)
        msg = self._call(self._stub.SearchUnits, request, timeout)
        return wire.search_hits_from_proto(msg)

    def search_units(self, text: str, limit: int = 0, *, timeout: float | None = None) -> list[Unit]:
        """The units of :meth:`search`, best first."""
        return [hit.unit for hit in self.search(text, limit, timeout=timeout)]

    def get_unit(self, layer: int, index: int, *, timeout: float | None = None) -> Unit | None:
        """One unit, or None when the atlas does not hold it (as :meth:`CircuitDatabase.get_unit`)."""
        try:
            msg = self._call(self._stub.GetUnit, self._pb.GetUnitRequest(layer=layer, index=index), timeout)
        except NotFound:
            return None
        return wire.unit_from_proto(msg)

    def get_unit_card(self, layer: int, index: int, *, timeout: float | None = None) -> UnitCard | None:
        """A unit with its activation statistics, innermost cluster and edge counts, or None when
        the atlas does not hold it (as :meth:`CircuitDatabase.get_unit_card`)."""
        try:
            msg = self._call(self._stub.GetUnitCard, self._pb.GetUnitRequest(layer=layer, index=index), timeout)
        except NotFound:
            return None
        return wire.unit_card_from_proto(msg)

    def get_edges_for_unit(
        self,
        layer: int,
        index: int,
        direction: str = "both",
        limit: int = 0,
        min_count: int = 0,
        *,
        timeout: float | None = None,
    ) -> list[Edge]:
        """Aggregated edges of a unit (downstream first for ``both``), at most ``limit`` per direction."""
        request = self._pb.GetEdgesForUnitRequest(
            layer=layer, index=index, direction=wire.edge_direction_to_proto(direction), limit=limit, min_count=min_count
        )
        msg = self._call(self._stub.GetEdgesForUnit, request, timeout)
        return [wire.edge_from_proto(e) for e in msg.edges]

    def get_cluster(self, cluster: str | int, limit: int = 0, *, timeout: float | None = None) -> ClusterMembers:
        """A cluster (top id or path like ``"1.5"``) and its member units."""
        msg = self._call(self._stub.GetCluster, self._pb.GetClusterRequest(cluster=str(cluster), limit=limit), timeout)
        return wire.cluster_members_from_proto(msg)

    def stats(self, *, timeout: float | None = None) -> AtlasStats:
        """Table row counts and build metadata."""
        return wire.atlas_stats_from_proto(self._call(self._stub.Stats, self._pb.AtlasStatsRequest(), timeout))

    def get_unit_projections(self, layer: int, index: int, *, timeout: float | None = None) -> UnitProjections:
        """A unit's output / input projections; FailedPrecondition when the atlas has no connectivity
        tables, NotFound when it has no row for the unit."""
        msg = self._call(self._stub.GetUnitProjections, self._pb.GetUnitProjectionsRequest(layer=layer, index=index), timeout)
        return wire.unit_projections_from_proto(msg)

    def get_weight_edges(
        self,
        layer: int,
        index: int,
        direction: str = "upstream",
        limit: int = 0,
        polarity: int = 0,
        *,
        timeout: float | None = None,
    ) -> list[WeightEdge]:
        """Weight-graph edges of a unit (upstream first for ``both``), at most ``limit`` per direction
        and polarity; ``polarity`` 1 / -1 / 0 = excitatory / inhibitory / both."""
        request = self._pb.GetWeightEdgesRequest(
            layer=layer, index=index, direction=wire.edge_direction_to_proto(direction), limit=limit, polarity=polarity
        )
        return wire.weight_edges_from_proto(self._call(self._stub.GetWeightEdges, request, timeout))

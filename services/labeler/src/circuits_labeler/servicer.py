"""gRPC adapter for LabelerService: decode -> domain -> encode, nothing else."""

from __future__ import annotations

from collections.abc import Iterator

from circuits_core import wire
from circuits_core._proto.circuits.v1 import labeler_pb2, labeler_pb2_grpc
from circuits_core.limits import DEFAULT_LIMITS, Limits

from circuits_labeler.service import LabelerService


class LabelerServicer(labeler_pb2_grpc.LabelerServiceServicer):
    def __init__(self, service: LabelerService, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self.service = service
        self.limits = limits

    def LabelUnits(self, request: labeler_pb2.LabelUnitsRequest, context) -> labeler_pb2.LabelUnitsResponse:  # noqa: N802
        self.limits.check("max_units_per_request", len(request.units), "LabelUnits request has", unit="units")
        units, failures = self.service.label_units(
            wire.unit_refs_from_proto(request.units), label_pass=request.label_pass,
            allow_without_evidence=request.allow_without_evidence,
        )
        return labeler_pb2.LabelUnitsResponse(units=wire.units_to_proto(units), failures=failures)

    def RunProgressive(self, request: labeler_pb2.RunProgressiveRequest, context) -> Iterator[labeler_pb2.LabelProgress]:  # noqa: N802
        for progress in self.service.run_progressive(
            passes=list(request.passes), max_units=request.max_units, retry_failed=request.retry_failed
        ):
            yield wire.label_progress_to_proto(progress)

    def Investigate(self, request: labeler_pb2.InvestigateRequest, context) -> Iterator[labeler_pb2.InvestigationEvent]:  # noqa: N802
        for event in self.service.investigate(
            request.unit.layer, request.unit.index, max_steps=request.max_steps, budget_usd=request.budget_usd,
            resume=request.resume, should_stop=lambda: not context.is_active(),
        ):
            yield wire.investigation_event_to_proto(event)

    def GetLabels(self, request: labeler_pb2.GetLabelsRequest, context) -> labeler_pb2.GetLabelsResponse:  # noqa: N802
        self.limits.check("max_units_per_request", len(request.units), "GetLabels request has", unit="units")
        limit = request.limit if request.limit < 0 else self.limits.clamp("max_results", request.limit)
        units = self.service.get_labels(wire.unit_refs_from_proto(request.units), limit=limit)
        return labeler_pb2.GetLabelsResponse(units=wire.units_to_proto(units))

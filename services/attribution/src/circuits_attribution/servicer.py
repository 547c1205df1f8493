"""AttributionService over gRPC: decode -> AttributionRunner -> encode, nothing else.

Errors are domain exceptions; the shared interceptor (circuits_server.serving) maps them to status
codes. A call's ``context.is_active()`` is the runner's stop signal, so a cancelled call or a
passed deadline frees its queue place or engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from circuits_core import wire
from circuits_core._proto.circuits.v1 import attribution_pb2, attribution_pb2_grpc, graph_pb2

from circuits_attribution.service import AttributionRunner


class AttributionServicer(attribution_pb2_grpc.AttributionServiceServicer):
    def __init__(self, runner: AttributionRunner) -> None:
        self.runner = runner

    def Trace(self, request: attribution_pb2.TraceRequest, context: Any) -> graph_pb2.Graph:
        graph = self.runner.trace(wire.trace_request_from_proto(request), should_stop=lambda: not context.is_active())
        return wire.graph_to_proto(graph)

    def TraceBatch(self, request_iterator: Iterator[attribution_pb2.TraceRequest], context: Any) -> Iterator[graph_pb2.Graph]:
        requests = (wire.trace_request_from_proto(request) for request in request_iterator)
        for graph in self.runner.trace_stream(requests, should_stop=lambda: not context.is_active()):
            yield wire.graph_to_proto(graph)

    def GetModelInfo(self, request: attribution_pb2.GetModelInfoRequest, context: Any) -> attribution_pb2.ModelInfo:
        return wire.model_info_to_proto(self.runner.model_info)

    def Intervene(self, request: attribution_pb2.InterveneRequest, context: Any) -> attribution_pb2.InterveneResponse:
        result = self.runner.intervene(
            wire.intervene_request_from_proto(request), should_stop=lambda: not context.is_active()
        )
        return wire.intervention_result_to_proto(result)

    def GetActivations(self, request: attribution_pb2.GetActivationsRequest, context: Any) -> attribution_pb2.GetActivationsResponse:  # noqa: N802
        result = self.runner.activations(
            wire.activation_request_from_proto(request), should_stop=lambda: not context.is_active()
        )
        return wire.activation_result_to_proto(result)

    def Patch(self, request: Any, context: Any) -> Any:
        result = self.runner.patch(wire.patch_request_from_proto(request), should_stop=lambda: not context.is_active())
        return wire.patch_result_to_proto(result)

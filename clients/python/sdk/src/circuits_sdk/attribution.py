"""Client of the attribution service (``circuits serve attribution``).

    with AttributionClient("localhost:50051") as client:
        graph = client.trace("The capital of France is", k=3)
        for graph in client.trace_batch(["a prompt", {"prompt": "another", "corpus_index": 7}]):
            ...

It is the gRPC :class:`~circuits_core.capabilities.Tracer` and
:class:`~circuits_core.capabilities.Intervener` (``RelPAttributor`` is the in-process one).

Failures raise the same :mod:`circuits_core.errors` classes the server raised (InvalidArgument,
ResourceExhausted, Unavailable, ...).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grpc

from circuits_core import wire
from circuits_core._proto.circuits.v1 import attribution_pb2, attribution_pb2_grpc
from circuits_sdk._channel import DEFAULT_TIMEOUT, call_unary, iterate_stream, open_channel, translate
from circuits_core.errors import InvalidArgument, Unavailable
from circuits_core.activations import ActivationRequest, ActivationResult
from circuits_core.interventions import InterventionRequest, InterventionResult
from circuits_core.patching import PatchRequest, PatchResult
from circuits_core.schemas import Graph
from circuits_core.tracing import ModelInfo, TraceRequest

SERVICE_NAME = "circuits.v1.AttributionService"
#: Seconds one trace may take unless the caller says otherwise (large models are slow).
DEFAULT_TRACE_TIMEOUT = 600.0


def as_trace_request(item: str | TraceRequest | Mapping[str, Any], *, where: str = "request") -> TraceRequest:
    """A TraceRequest from a prompt string, a TraceRequest, or a mapping of TraceRequest fields."""
    if isinstance(item, TraceRequest):
        return item
    if isinstance(item, str):
        return TraceRequest(prompt=item)
    if isinstance(item, Mapping):
        return TraceRequest.from_mapping(item, where=where)
    raise InvalidArgument(f"{where}: expected a prompt string, a TraceRequest or a mapping, got {type(item).__name__}")


class AttributionClient:
    """Trace prompts on a remote attribution server."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TRACE_TIMEOUT,
        channel: grpc.Channel | None = None,
        token: str = "",
        tls_ca_file: str = "",
        tls_cert_file: str = "",
        tls_key_file: str = "",
    ) -> None:
        if not target and channel is None:
            raise InvalidArgument("attribution server address is empty (expected HOST:PORT)")
        self.target = target
        self.timeout = timeout
        self._channel = channel or open_channel(target, token=token, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file)
        self._stub = attribution_pb2_grpc.AttributionServiceStub(self._channel)

    def __enter__(self) -> AttributionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # -- calls ------------------------------------------------------------------------------
    def trace(self, prompt: str | TraceRequest, *, timeout: float | None = None, **fields: Any) -> Graph:
        """Trace one prompt; ``fields`` are TraceRequest fields (k, target_tokens, contrastive, tau, ...)."""
        if isinstance(prompt, TraceRequest) and fields:
            raise InvalidArgument("pass either a TraceRequest or keyword fields, not both")
        request = prompt if isinstance(prompt, TraceRequest) else TraceRequest(prompt=prompt, **fields)
        msg = call_unary(self._stub.Trace, wire.trace_request_to_proto(request), timeout=timeout or self.timeout)
        return wire.graph_from_proto(msg)

    def trace_batch(
        self, items: Iterable[str | TraceRequest | Mapping[str, Any]], *, timeout: float | None = None
    ) -> Iterator[Graph]:
        """Trace a stream of prompts over one call; graphs come back in request order.

        ``items`` is consumed lazily (a generator of millions of prompts is fine). ``timeout``
        bounds the whole stream (default: none).
        """

        def requests() -> Iterator[attribution_pb2.TraceRequest]:
            for number, item in enumerate(items):
                yield wire.trace_request_to_proto(as_trace_request(item, where=f"request {number}"))

        call = self._stub.TraceBatch(requests(), timeout=timeout)
        try:
            for msg in iterate_stream(call):
                yield wire.graph_from_proto(msg)
        finally:
            call.cancel()

    def intervene(self, request: InterventionRequest, *, timeout: float | None = None) -> InterventionResult:
        """Run the server's model on ``request.prompt`` with the neurons changed (baseline vs intervened)."""
        msg = call_unary(
            self._stub.Intervene, wire.intervene_request_to_proto(request), timeout=timeout or self.timeout, idempotent=True
        )
        return wire.intervention_result_from_proto(msg, interventions=request.interventions)

    def activations(self, request: ActivationRequest, *, timeout: float | None = None) -> ActivationResult:
        """Per-token activations of ``request.neurons`` on each of ``request.prompts`` (the server's model)."""
        msg = call_unary(
            self._stub.GetActivations, wire.activation_request_to_proto(request), timeout=timeout or self.timeout,
            idempotent=True,
        )
        return wire.activation_result_from_proto(msg, neurons=request.neurons)

    def patch(self, request: PatchRequest, *, timeout: float | None = None) -> PatchResult:
        """Activation patching of ``request.neurons`` (or the clean prompt's top RelP neurons)
        between the clean and the corrupt prompt on the server's model."""
        msg = call_unary(self._stub.Patch, wire.patch_request_to_proto(request), timeout=timeout or self.timeout, idempotent=True)
        return wire.patch_result_from_proto(msg)

    def model_info(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> ModelInfo:
        msg = call_unary(self._stub.GetModelInfo, attribution_pb2.GetModelInfoRequest(), timeout=timeout, idempotent=True)
        return wire.model_info_from_proto(msg)

    def health(self, *, timeout: float = 5.0) -> str:
        """The server's health status name (SERVING, NOT_SERVING, ...) for the attribution service."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
        except grpc.RpcError as exc:
            raise translate(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, *, timeout: float = 120.0, poll: float = 0.2) -> None:
        """Block until the server reports SERVING (model loaded); Unavailable after ``timeout``."""
        deadline = time.monotonic() + timeout
        last = "unreachable"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
                last = str(exc) or type(exc).__name__
            time.sleep(poll)
        raise Unavailable(f"attribution server {self.target} not ready after {timeout:.0f}s ({last})")

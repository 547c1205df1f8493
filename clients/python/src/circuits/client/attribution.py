"""Client of the attribution service (``circuits serve attribution``).

    with AttributionClient("localhost:50051") as client:
        graph = client.trace("The capital of France is", k=3)
        for graph in client.trace_batch(["a prompt", {"prompt": "another", "corpus_index": 7}]):
            ...

Failures raise the same :mod:`circuits.errors` classes the server raised (InvalidArgument,
ResourceExhausted, Unavailable, ...).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grpc

from circuits import wire
from circuits._proto.circuits.v1 import attribution_pb2, attribution_pb2_grpc
from circuits.client._channel import DEFAULT_TIMEOUT, call_unary, iterate_stream, open_channel, translate
from circuits.errors import InvalidArgument, Unavailable
from circuits.schemas import Graph
from circuits.tracing import ModelInfo, TraceSpec

SERVICE_NAME = "circuits.v1.AttributionService"
#: Seconds one trace may take unless the caller says otherwise (large models are slow).
DEFAULT_TRACE_TIMEOUT = 600.0


def as_trace_spec(item: str | TraceSpec | Mapping[str, Any], *, where: str = "request") -> TraceSpec:
    """A TraceSpec from a prompt string, a TraceSpec, or a mapping of TraceSpec fields."""
    if isinstance(item, TraceSpec):
        return item
    if isinstance(item, str):
        return TraceSpec(prompt=item)
    if isinstance(item, Mapping):
        return TraceSpec.from_mapping(item, where=where)
    raise InvalidArgument(f"{where}: expected a prompt string, a TraceSpec or a mapping, got {type(item).__name__}")


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
    def trace(self, prompt: str | TraceSpec, *, timeout: float | None = None, **fields: Any) -> Graph:
        """Trace one prompt; ``fields`` are TraceSpec fields (k, target_tokens, contrastive, tau, ...)."""
        if isinstance(prompt, TraceSpec) and fields:
            raise InvalidArgument("pass either a TraceSpec or keyword fields, not both")
        spec = prompt if isinstance(prompt, TraceSpec) else TraceSpec(prompt=prompt, **fields)
        msg = call_unary(self._stub.Trace, wire.trace_spec_to_proto(spec), timeout=timeout or self.timeout)
        return wire.graph_from_proto(msg)

    def trace_batch(
        self, items: Iterable[str | TraceSpec | Mapping[str, Any]], *, timeout: float | None = None
    ) -> Iterator[Graph]:
        """Trace a stream of prompts over one call; graphs come back in request order.

        ``items`` is consumed lazily (a generator of millions of prompts is fine). ``timeout``
        bounds the whole stream (default: none).
        """

        def requests() -> Iterator[attribution_pb2.TraceRequest]:
            for number, item in enumerate(items):
                yield wire.trace_spec_to_proto(as_trace_spec(item, where=f"request {number}"))

        call = self._stub.TraceBatch(requests(), timeout=timeout)
        try:
            for msg in iterate_stream(call):
                yield wire.graph_from_proto(msg)
        finally:
            call.cancel()

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


# -- `circuits graph --remote HOST:PORT` -----------------------------------------------------------
def trace_spec_from_args(args: argparse.Namespace) -> TraceSpec:
    """The TraceSpec the `circuits graph` flags ask for (names as in cli/graph.py)."""

    def arg(*names: str, default: Any = None) -> Any:
        for name in names:
            value = getattr(args, name, None)
            if value is not None:
                return value
        return default

    target_tokens = arg("target_tokens", "targets", default=()) or ()
    if isinstance(target_tokens, str):
        target_tokens = (target_tokens,)
    contrastive = arg("contrastive")
    return TraceSpec(
        prompt=arg("prompt", default=""),
        k=int(arg("k", "top_k", default=0) or 0),
        target_tokens=tuple(target_tokens),
        contrastive=tuple(contrastive) if contrastive else None,
        raw=bool(arg("raw", default=False)),
        answer_prefix=arg("answer_prefix", default="") or "",
        target_position=arg("target_position"),
        tau=arg("tau", "node_threshold"),
        max_nodes=arg("max_nodes"),
        slug=arg("slug", default="") or "",
    )


def trace_remote(args: argparse.Namespace) -> Graph:
    """Trace ``args.prompt`` on the server at ``args.remote`` with the `circuits graph` flags.

    The returned graph is what the in-process engine would produce for the same flags (only
    ``metadata.create_time_ms`` differs), so `circuits graph` writes it the same way.
    """
    import dataclasses

    from circuits.schemas import slugify

    target = getattr(args, "remote", "") or ""
    if not target:
        raise InvalidArgument("--remote needs HOST:PORT of an attribution server")
    if getattr(args, "mlp_rule", "relp") not in (None, "relp"):
        raise InvalidArgument("--mlp-rule cannot be changed with --remote (the server traces with its own rule)")
    spec = trace_spec_from_args(args)
    # Same slug as the in-process path of `circuits graph`.
    spec = dataclasses.replace(spec, slug="relp-" + slugify(spec.slug or spec.prompt))
    from circuits.cli._remote import remote_auth

    with AttributionClient(target, **remote_auth(args)) as client:
        try:
            return client.trace(spec, timeout=getattr(args, "timeout", None) or DEFAULT_TRACE_TIMEOUT)
        except Unavailable as exc:
            raise Unavailable(f"attribution server {target} is unavailable: {exc}") from None

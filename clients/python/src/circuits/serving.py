"""Shared gRPC server plumbing for every circuits service.

``build_grpc_server`` wires one server the same way for all four services: the standard
``grpc.health.v1`` health service (NOT_SERVING until :meth:`GrpcServer.set_serving`), server
reflection, an interceptor that maps :class:`circuits.errors.CircuitsError` to status codes (and
anything else to INTERNAL without a stack trace), per-RPC Prometheus metrics on an optional HTTP
port, and graceful shutdown (NOT_SERVING, drain in-flight calls for ``grace`` seconds, stop).

Service packages supply only a function that adds their servicer to the server.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from circuits.errors import CircuitsError

log = logging.getLogger("circuits.serving")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """Network settings shared by every service."""

    host: str = "127.0.0.1"
    #: gRPC port; 0 picks a free port (tests).
    port: int = 0
    #: Prometheus /metrics HTTP port; None disables it, 0 picks a free port.
    metrics_port: int | None = None
    #: Worker threads handling RPCs.
    max_workers: int = 16
    #: Largest request/response message in bytes.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Seconds in-flight calls get to finish on shutdown.
    grace_seconds: float = 10.0


class Metrics:
    """Per-server Prometheus registry with standard RPC metrics; services add their own."""

    def __init__(self, service: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.service = service
        self.requests = Counter(
            "circuits_rpc_requests", "RPCs handled", ["service", "method", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "circuits_rpc_latency_seconds",
            "RPC latency",
            ["service", "method"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self._http: Any = None
        self.port: int | None = None

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; return its port."""
        from prometheus_client import start_http_server

        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._http.server_port
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _abort_for(exc: BaseException, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(exc, CircuitsError):
        code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
        context.abort(code, str(exc) or exc.__class__.__name__)
    log.exception("unexpected error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.rsplit('/', 1)[-1]}")


class ErrorAndMetricsInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to status codes and records per-RPC metrics."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics

    def _record(self, method: str, code: str, started: float) -> None:
        if self.metrics is None:
            return
        name = method.rsplit("/", 1)[-1]
        self.metrics.requests.labels(self.metrics.service, name, code).inc()
        self.metrics.latency.labels(self.metrics.service, name).observe(time.perf_counter() - started)

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler

        def code_of(context: grpc.ServicerContext) -> str:
            code = context.code() if hasattr(context, "code") else None
            return code.name if isinstance(code, grpc.StatusCode) else "OK"

        def wrap_unary(behavior: Callable) -> Callable:
            def run(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    result = behavior(request_or_iterator, context)
                    self._record(method, code_of(context), started)
                    return result
                except Exception as exc:  # noqa: BLE001 - mapped to a status code
                    if isinstance(exc, CircuitsError):
                        self._record(method, exc.grpc_code, started)
                    elif not _is_abort(exc):
                        self._record(method, "INTERNAL", started)
                    else:
                        self._record(method, code_of(context), started)
                        raise
                    _abort_for(exc, context, method)

            return run

        def wrap_stream(behavior: Callable) -> Callable:
            def run(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    yield from behavior(request_or_iterator, context)
                    self._record(method, code_of(context), started)
                except Exception as exc:  # noqa: BLE001
                    if isinstance(exc, CircuitsError):
                        self._record(method, exc.grpc_code, started)
                    elif not _is_abort(exc):
                        self._record(method, "INTERNAL", started)
                    else:
                        self._record(method, code_of(context), started)
                        raise
                    _abort_for(exc, context, method)

            return run

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )


def _is_abort(exc: BaseException) -> bool:
    # context.abort raises a bare Exception subclass from grpc's internals.
    return type(exc).__module__.startswith("grpc")


@dataclass
class GrpcServer:
    """A started-or-startable gRPC server with health, reflection, metrics and shutdown."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]
    metrics: Metrics
    settings: ServerSettings
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def start(self) -> GrpcServer:
        self.server.start()
        if self.settings.metrics_port is not None:
            self.metrics.serve_http(self.settings.host, self.settings.metrics_port)
        return self

    def set_serving(self, serving: bool = True) -> None:
        """Flip the health status of the overall server and of every service."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, let in-flight calls finish for ``grace`` seconds, stop, run on_stop hooks."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.set_serving(False)
        self.server.stop(self.settings.grace_seconds if grace is None else grace).wait()
        for hook in self.on_stop:
            try:
                hook()
            except Exception:  # noqa: BLE001 - shutdown must finish
                log.exception("shutdown hook failed")
        self.metrics.close()

    def wait(self) -> None:
        """Block until the server stops; SIGTERM/SIGINT trigger a graceful stop."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: threading.Thread(target=self.stop, daemon=True).start())
        self.server.wait_for_termination()
        self._stopped.wait()


def build_grpc_server(
    *,
    settings: ServerSettings,
    service_names: Sequence[str],
    add_servicers: Callable[[grpc.Server], None],
    metrics: Metrics | None = None,
    interceptors: Iterable[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> GrpcServer:
    """Create (not start) a server with the shared plumbing; ``service_names`` are full names
    such as ``circuits.v1.AtlasService`` (used by health and reflection)."""
    metrics = metrics or Metrics(service_names[0].rsplit(".", 1)[-1] if service_names else "circuits")
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
        interceptors=[*interceptors, ErrorAndMetricsInterceptor(metrics)],
        options=options,
    )
    add_servicers(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    handle = GrpcServer(
        server=server,
        port=port,
        health=health_servicer,
        service_names=tuple(service_names),
        metrics=metrics,
        settings=settings,
    )
    handle.set_serving(False)
    return handle

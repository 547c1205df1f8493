"""Shared gRPC server plumbing for every circuits service.

``build_grpc_server`` wires one server the same way for all four services: the standard
``grpc.health.v1`` health service (NOT_SERVING until :meth:`GrpcServer.set_serving`), server
reflection, an interceptor that maps :class:`circuits_core.errors.CircuitsError` to status codes (and
anything else to INTERNAL without a stack trace), per-RPC Prometheus metrics on an optional HTTP
port, and graceful shutdown (NOT_SERVING, drain in-flight calls for ``grace`` seconds, stop).

Service packages supply only a function that adds their servicer to the server.
"""

from __future__ import annotations

import argparse
import hmac
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

from circuits_core.errors import CircuitsError, InvalidArgument, ResourceExhausted
from circuits_core.limits import DEFAULT_MAX_MESSAGE_BYTES

log = logging.getLogger("circuits_server.serving")

DEFAULT_MAX_NODES_PER_GRAPH = 200_000
DEFAULT_MAX_EDGES_PER_GRAPH = 5_000_000


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
    #: PEM certificate chain and private key: serve TLS when both are set.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: PEM CA bundle of accepted client certificates: mutual TLS when set.
    tls_client_ca_file: str = ""
    #: File of bearer tokens, one per line: `TOKEN SCOPE[,SCOPE...]` (scopes: read, write, admin).
    #: Empty: no authentication.
    auth_tokens_file: str = ""
    #: Most messages in one request stream (graphs in Ingest, requests in TraceBatch); 0 = unlimited.
    max_stream_messages: int = 0
    #: Most units / edges in one circuits.v1.Graph request message (Ingest); 0 = unlimited.
    max_nodes_per_graph: int = DEFAULT_MAX_NODES_PER_GRAPH
    max_edges_per_graph: int = DEFAULT_MAX_EDGES_PER_GRAPH

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from the files, or None for plaintext."""
        if not (self.tls_cert_file or self.tls_key_file):
            return None
        if not (self.tls_cert_file and self.tls_key_file):
            raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
        ca = _read_file(self.tls_client_ca_file, "TLS client CA") if self.tls_client_ca_file else None
        return grpc.ssl_server_credentials(
            [(_read_file(self.tls_key_file, "TLS key"), _read_file(self.tls_cert_file, "TLS certificate"))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} file {path}: {exc.strerror}") from None


# -- authentication ---------------------------------------------------------------------------
SCOPES = ("read", "write", "admin")

#: Scope each method needs when authentication is on, per service (methods not listed: ``read``).
#: ``build_grpc_server`` applies the entries of its services unless ``method_scopes`` overrides
#: them. Writes need ``write``; Export writes files on the server's filesystem and needs ``admin``.
DEFAULT_METHOD_SCOPES: dict[str, dict[str, str]] = {
    "circuits.v1.AggregatorService": {"Ingest": "write", "Export": "admin"},
    "circuits.v1.AttributionService": {"Trace": "write", "TraceBatch": "write", "Intervene": "write", "Patch": "write"},
    "circuits.v1.LabelerService": {"LabelUnits": "write", "RunProgressive": "write"},
    "circuits.v1.AtlasService": {},
}


def load_tokens(path: str) -> dict[str, frozenset[str]]:
    """Parse a tokens file (`TOKEN SCOPE[,SCOPE]` per line, `#` comments); errors never echo tokens."""
    tokens: dict[str, frozenset[str]] = {}
    text = _read_file(path, "auth tokens").decode("utf-8", errors="replace")
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        scopes = frozenset(parts[1].split(",")) if len(parts) > 1 else frozenset({"read"})
        if len(parts) > 2 or not scopes <= set(SCOPES) or len(parts[0]) < 16:
            raise InvalidArgument(
                f"{path}:{line_no}: expected `TOKEN SCOPE[,SCOPE]` with a token of >= 16 characters "
                f"and scopes from {', '.join(SCOPES)}"
            )
        tokens[parts[0]] = scopes
    if not tokens:
        raise InvalidArgument(f"{path}: no tokens")
    return tokens


class AuthInterceptor(grpc.ServerInterceptor):
    """Bearer-token authentication with scopes; health and reflection stay open for probes.

    ``method_scopes`` maps a method name (``Ingest``) to the scope it needs; methods not listed
    need ``read``. ``admin`` grants every scope. Tokens are compared in constant time and failures
    say nothing about which part was wrong.
    """

    _OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, tokens: dict[str, frozenset[str]], method_scopes: dict[str, str] | None = None) -> None:
        self._tokens = [(t.encode(), scopes) for t, scopes in tokens.items()]
        self._method_scopes = dict(method_scopes or {})

    def _scopes_for(self, presented: bytes) -> frozenset[str] | None:
        found = None
        for token, scopes in self._tokens:  # no early exit: time does not depend on which matched
            if hmac.compare_digest(token, presented):
                found = scopes
        return found

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if method.startswith(self._OPEN):
            return continuation(handler_call_details)
        header = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
        presented = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        scopes = self._scopes_for(presented) if presented else None
        if scopes is None:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        needed = self._method_scopes.get(method.rsplit("/", 1)[-1], "read")
        if needed not in scopes and "admin" not in scopes:
            return _deny(grpc.StatusCode.PERMISSION_DENIED, f"this token lacks the '{needed}' scope")
        return continuation(handler_call_details)


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def abort(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    # A stream-stream handler works for every call shape: the request is never read.
    return grpc.stream_stream_rpc_method_handler(lambda it, ctx: abort(it, ctx))


# -- secrets never reach logs -------------------------------------------------------------------
class RedactSecrets(logging.Filter):
    """Replaces any registered secret value in log records with ***."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def add(self, *values: str) -> None:
        self.secrets.update(v for v in values if v and len(v) >= 6)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string is the handler's problem, not ours
                return True
            redacted = message
            for secret in self.secrets:
                redacted = redacted.replace(secret, "***")
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


REDACTOR = RedactSecrets()


_redacting_factory_installed = False
_factory_lock = threading.Lock()


def _install_redacting_record_factory() -> None:
    """Redact every log record when it is created, so handlers and loggers added later (a
    ``basicConfig`` after startup, a library's own handler) never see a secret either."""
    global _redacting_factory_installed
    with _factory_lock:
        if _redacting_factory_installed:
            return
        previous = logging.getLogRecordFactory()

        def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            REDACTOR.filter(record)
            return record

        logging.setLogRecordFactory(redacting_factory)
        _redacting_factory_installed = True


def register_secret(*values: str) -> None:
    """Register secret values (API keys, tokens, passwords) so logging never prints them."""
    REDACTOR.add(*values)
    _install_redacting_record_factory()
    root = logging.getLogger()
    if REDACTOR not in root.filters:
        root.addFilter(REDACTOR)
    for handler in root.handlers:
        if REDACTOR not in handler.filters:
            handler.addFilter(REDACTOR)


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


class _Undecodable:
    """Stands in for request bytes that did not parse (truncated, wrong wire type, bad UTF-8)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class RequestGuardInterceptor(grpc.ServerInterceptor):
    """Request guard: undecodable bytes become INVALID_ARGUMENT (not grpc's generic INTERNAL),
    and request streams and graphs over the limits become RESOURCE_EXHAUSTED naming the limit.

    Installed innermost by :func:`build_grpc_server` for every call shape: a unary request that
    does not parse (or is too large a graph) is refused before the servicer runs; in a request
    stream the servicer sees the error raised by the request iterator at the bad message
    (messages before it were delivered normally). Limits come from :class:`ServerSettings`
    (``max_stream_messages``, ``max_nodes_per_graph``, ``max_edges_per_graph``; 0 = unlimited).
    """

    def __init__(self, settings: ServerSettings | None = None) -> None:
        settings = settings or ServerSettings()
        self.max_stream_messages = settings.max_stream_messages
        self.max_nodes_per_graph = settings.max_nodes_per_graph
        self.max_edges_per_graph = settings.max_edges_per_graph

    def _check_graph(self, request: Any, where: str) -> None:
        descriptor = getattr(request, "DESCRIPTOR", None)
        if descriptor is None or descriptor.full_name != "circuits.v1.Graph":
            return
        for count, limit, name, what in (
            (len(request.units), self.max_nodes_per_graph, "max_nodes_per_graph", "units"),
            (len(request.edges.src), self.max_edges_per_graph, "max_edges_per_graph", "edges"),
        ):
            if limit and count > limit:
                raise ResourceExhausted(f"{where}: graph {request.graph_id[:80]!r} has {count} {what}, "
                                        f"over the limit {name}={limit} (--{name.replace('_', '-')})")  # fmt: skip

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def tolerant_decode(raw: bytes) -> Any:
            try:
                return decode(raw)
            except Exception as exc:  # noqa: BLE001 - any parse failure is the client's fault
                return _Undecodable(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)

        def refuse(reason: str, number: int | None = None) -> InvalidArgument:
            where = f"{method} request" + (f" message {number}" if number is not None else "")
            return InvalidArgument(f"{where} could not be decoded as protobuf ({reason})")

        def unary(behavior: Callable) -> Callable:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    raise refuse(request.reason)
                self._check_graph(request, f"{method} request")
                return behavior(request, context)

            return run

        def checked(requests: Any) -> Any:
            for number, request in enumerate(requests):
                if isinstance(request, _Undecodable):
                    raise refuse(request.reason, number)
                if self.max_stream_messages and number >= self.max_stream_messages:
                    raise ResourceExhausted(
                        f"{method} stream has more than {self.max_stream_messages} messages, over the limit "
                        f"max_stream_messages={self.max_stream_messages} (--max-stream-messages); open a new stream"
                    )
                self._check_graph(request, f"{method} request message {number}")
                yield request

        def streaming(behavior: Callable) -> Callable:
            def run(request_iterator: Any, context: grpc.ServicerContext) -> Any:
                return behavior(checked(request_iterator), context)

            return run

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                unary(handler.unary_unary), tolerant_decode, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                unary(handler.unary_stream), tolerant_decode, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                streaming(handler.stream_unary), tolerant_decode, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            streaming(handler.stream_stream), tolerant_decode, handler.response_serializer
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
    _done: threading.Event = field(default_factory=threading.Event)

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
        try:
            for hook in self.on_stop:
                try:
                    hook()
                except Exception:  # noqa: BLE001 - shutdown must finish
                    log.exception("shutdown hook failed")
            self.metrics.close()
        finally:
            self._done.set()

    def wait(self) -> None:
        """Block until the server stops; SIGTERM/SIGINT trigger a graceful stop."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: threading.Thread(target=self.stop, daemon=True).start())
        self.server.wait_for_termination()
        # stop() marks the server stopped first and runs its hooks (closing stores) after:
        # return only once those finished, so the process never exits mid-close.
        self._stopped.wait()
        self._done.wait()


def build_grpc_server(
    *,
    settings: ServerSettings,
    service_names: Sequence[str],
    add_servicers: Callable[[grpc.Server], None],
    metrics: Metrics | None = None,
    interceptors: Iterable[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    method_scopes: dict[str, str] | None = None,
) -> GrpcServer:
    """Create (not start) a server with the shared plumbing; ``service_names`` are full names
    such as ``circuits.v1.AtlasService`` (used by health and reflection). ``method_scopes`` maps
    method names to the token scope they need when authentication is on; it extends and overrides
    :data:`DEFAULT_METHOD_SCOPES` of those services (unlisted methods need ``read``). Request bytes
    that do not decode are refused with INVALID_ARGUMENT (:class:`RequestGuardInterceptor`)."""
    metrics = metrics or Metrics(service_names[0].rsplit(".", 1)[-1] if service_names else "circuits")
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    credentials = credentials or settings.credentials()
    auth: list[grpc.ServerInterceptor] = []
    if settings.auth_tokens_file:
        tokens = load_tokens(settings.auth_tokens_file)
        register_secret(*tokens)
        scopes: dict[str, str] = {}
        for name in service_names:
            scopes.update(DEFAULT_METHOD_SCOPES.get(name, {}))
        scopes.update(method_scopes or {})
        auth.append(AuthInterceptor(tokens, scopes))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
        interceptors=[*auth, *interceptors, ErrorAndMetricsInterceptor(metrics), RequestGuardInterceptor(settings)],
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


# -- command-line flags shared by every service -------------------------------------------------
def add_server_arguments(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    """The network/security flags every `circuits serve <service>` accepts."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    g.add_argument("--port", type=int, default=default_port, help="gRPC port (0 = any free port)")
    g.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics HTTP port")
    g.add_argument("--max-workers", type=int, default=16, help="RPC worker threads")
    g.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    g.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on shutdown")
    g.add_argument("--tls-cert", default="", help="PEM certificate chain (TLS)")
    g.add_argument("--tls-key", default="", help="PEM private key (TLS)")
    g.add_argument("--tls-client-ca", default="", help="PEM CA of client certificates (mutual TLS)")
    g.add_argument("--insecure", action="store_true", help="serve plaintext (local development only)")
    g.add_argument("--auth-tokens-file", default="", help="bearer tokens file: `TOKEN SCOPE[,SCOPE]` per line")
    g.add_argument("--port-file", default="", help="write the bound port to this file once listening")
    g.add_argument("--max-stream-messages", type=int, default=0,
                   help="most messages in one request stream; 0 = unlimited (default 0)")
    g.add_argument("--max-nodes-per-graph", type=int, default=DEFAULT_MAX_NODES_PER_GRAPH,
                   help="most units in one graph message (default %(default)s)")
    g.add_argument("--max-edges-per-graph", type=int, default=DEFAULT_MAX_EDGES_PER_GRAPH,
                   help="most edges in one graph message (default %(default)s)")


def server_settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """ServerSettings from add_server_arguments flags; plaintext needs an explicit --insecure."""
    if not (args.tls_cert or args.tls_key) and not args.insecure:
        raise InvalidArgument("refusing to serve plaintext: pass --tls-cert/--tls-key, or --insecure for local use")
    return ServerSettings(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        max_workers=args.max_workers,
        max_message_bytes=args.max_message_bytes,
        grace_seconds=args.grace,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        auth_tokens_file=args.auth_tokens_file,
        max_stream_messages=args.max_stream_messages,
        max_nodes_per_graph=args.max_nodes_per_graph,
        max_edges_per_graph=args.max_edges_per_graph,
    )


def announce(server: GrpcServer, args: argparse.Namespace, *, name: str = "") -> None:
    """Print the bound address (and write --port-file atomically) once the server listens."""
    metrics = f", metrics on :{server.metrics.port}" if server.metrics.port else ""
    print(f"{name + ' ' if name else ''}listening on {server.address}{metrics}", flush=True)
    write_port_file(server, getattr(args, "port_file", ""))


def write_port_file(server: GrpcServer, path: str) -> None:
    """Write the bound port to ``path`` atomically (no-op when path is empty)."""
    import os

    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(str(server.port))
    os.replace(tmp, path)

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from circuits_core import wire
from circuits_core.errors import CircuitsError, FailedPrecondition, InvalidArgument, ResourceExhausted, clip_message, echo
from circuits_core.limits import DEFAULT_LIMITS, DEFAULT_MAX_MESSAGE_BYTES, Limits, add_limit_arguments, flag

from circuits_server.ports import ensure_port_free

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
    #: Concurrent streaming calls (own thread pool); per method; per client address; health
    #: Watch and reflection streams each (they need no token). Over a bound: RESOURCE_EXHAUSTED.
    max_streams: int = DEFAULT_LIMITS.max_streams
    max_streams_per_method: int = DEFAULT_LIMITS.max_streams_per_method
    max_streams_per_peer: int = DEFAULT_LIMITS.max_streams_per_peer
    max_open_streams: int = DEFAULT_LIMITS.max_open_streams
    #: Seconds a stream may wait for the client (next message, or reading a reply) before it is cancelled.
    stream_idle_timeout_s: float = DEFAULT_LIMITS.stream_idle_timeout_s
    #: Longest name / path / other text string in a request (check_request_strings).
    max_name_chars: int = DEFAULT_LIMITS.max_name_chars
    max_path_chars: int = DEFAULT_LIMITS.max_path_chars
    max_text_chars: int = DEFAULT_LIMITS.max_text_chars
    #: Bind the port with SO_REUSEPORT so that several processes serve one port (read-only
    #: services started with ``--processes N``); off by default, so a second server on a taken
    #: port fails instead of sharing it by accident.
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if self.max_workers < 1:
            raise InvalidArgument(f"--max-workers must be >= 1, got {self.max_workers}")
        for name in ("max_streams", "max_streams_per_method", "max_streams_per_peer", "max_open_streams"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.stream_idle_timeout_s > 0:
            raise InvalidArgument(f"--stream-idle-timeout must be > 0 seconds, got {self.stream_idle_timeout_s}")

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from the files, or None for plaintext. The files are checked first
        (:func:`check_tls_files`): a key that does not match its certificate, an expired
        certificate or an unreadable CA bundle is refused with one InvalidArgument line."""
        if not (self.tls_cert_file or self.tls_key_file):
            if self.tls_client_ca_file:
                raise InvalidArgument("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
            return None
        if not (self.tls_cert_file and self.tls_key_file):
            raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
        check_tls_files(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)
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
        raise InvalidArgument(f"cannot read {what} file {echo(path, quote=False)}: {exc.strerror}") from None


#: A certificate this close to its end gets a warning at start.
CERT_EXPIRY_WARNING_DAYS = 14


def _certificate_validity(path: str) -> tuple[float, float] | None:
    """(notBefore, notAfter) of the first certificate in a PEM file as epoch seconds, or None
    when the file cannot be decoded (the TLS library reports that itself)."""
    import ssl

    try:
        decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]  # stdlib, no extra package
        return ssl.cert_time_to_seconds(decoded["notBefore"]), ssl.cert_time_to_seconds(decoded["notAfter"])
    except Exception:  # noqa: BLE001 - validity is checked when it can be read
        return None


def check_tls_files(cert_file: str, key_file: str, client_ca_file: str = "", *, now: float | None = None) -> None:
    """Refuse (InvalidArgument, one line) TLS files a server could not serve with: unreadable,
    a key that is not the certificate's, an encrypted key, an expired certificate, a client CA
    bundle without certificates. Warn about a certificate not yet valid or expiring within
    :data:`CERT_EXPIRY_WARNING_DAYS` days."""
    import ssl

    for path, what in ((cert_file, "TLS certificate"), (key_file, "TLS key"), (client_ca_file, "TLS client CA")):
        if path:
            _read_file(path, what)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The password callback keeps OpenSSL from prompting on the terminal for an encrypted key.
        context.load_cert_chain(cert_file, key_file, password=lambda: b"")
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(reason).upper():
            raise InvalidArgument(f"TLS key {echo(key_file, quote=False)} does not belong to certificate "
                                  f"{echo(cert_file, quote=False)} (--tls-key / --tls-cert)") from None  # fmt: skip
        raise InvalidArgument(f"cannot use TLS certificate {echo(cert_file, quote=False)} with key "
                              f"{echo(key_file, quote=False)}: {reason} (PEM files, unencrypted key expected)") from None  # fmt: skip
    if client_ca_file:
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except (ssl.SSLError, ValueError) as exc:
            raise InvalidArgument(f"TLS client CA {echo(client_ca_file, quote=False)} holds no usable certificate "
                                  f"({getattr(exc, 'reason', None) or exc})") from None  # fmt: skip
    validity = _certificate_validity(cert_file)
    if validity is None:
        log.warning("could not read the validity dates of TLS certificate %s", cert_file)
        return
    not_before, not_after = validity
    now = time.time() if now is None else now
    ends = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after))
    if not_after <= now:
        raise InvalidArgument(f"TLS certificate {echo(cert_file, quote=False)} expired on {ends}; clients would refuse it")
    if not_before > now:
        log.warning("TLS certificate %s is not valid before %s (clock skew?)", cert_file,
                    time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_before)))  # fmt: skip
    elif not_after - now < CERT_EXPIRY_WARNING_DAYS * 86400:
        log.warning("TLS certificate %s expires on %s (in %.1f days)", cert_file, ends, (not_after - now) / 86400)


# -- authentication ---------------------------------------------------------------------------
SCOPES = ("read", "write", "admin")

#: Scope each method needs when authentication is on, per service (methods not listed: ``read``).
#: ``build_grpc_server`` applies the entries of its services unless ``method_scopes`` overrides
#: them. Writes need ``write``; Export writes files on the server's filesystem and needs ``admin``.
DEFAULT_METHOD_SCOPES: dict[str, dict[str, str]] = {
    "circuits.v1.AggregatorService": {"Ingest": "write", "Export": "admin"},
    "circuits.v1.AttributionService": {"Trace": "write", "TraceBatch": "write", "Intervene": "write", "Patch": "write",
                                       "GetActivations": "write"},
    "circuits.v1.LabelerService": {"LabelUnits": "write", "RunProgressive": "write", "Investigate": "write"},
    "circuits.v1.AtlasService": {},
}


def load_tokens(path: str) -> dict[str, frozenset[str]]:
    """Parse a tokens file; errors never echo tokens.

    One ``TOKEN [SCOPE[,SCOPE...]]`` per line (scope default ``read``); lines starting with ``#``
    are comments, and so is everything after a whitespace-separated ``#`` (a ``#`` inside a token
    belongs to the token). Tokens are printable ASCII without spaces, at least 16 characters. A
    UTF-8 byte-order mark is ignored. Refused: invalid UTF-8, a token listed twice, unknown
    scopes. A file that users other than its owner can read or write gets a warning."""
    raw = _read_file(path, "auth tokens")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{echo(path, quote=False)}: not UTF-8 text (byte {exc.start})") from None
    tokens: dict[str, frozenset[str]] = {}
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        for i, part in enumerate(parts):
            if part.startswith("#"):
                parts = parts[:i]
                break
        if not parts:
            continue
        where = f"{echo(path, quote=False)}:{line_no}"
        token = parts[0]
        scopes = frozenset(parts[1].split(",")) if len(parts) > 1 else frozenset({"read"})
        if len(parts) > 2 or not scopes <= set(SCOPES) or len(token) < 16:
            raise InvalidArgument(
                f"{where}: expected `TOKEN SCOPE[,SCOPE]` with a token of >= 16 characters "
                f"and scopes from {', '.join(SCOPES)}"
            )
        if not all("!" <= ch <= "~" for ch in token):
            raise InvalidArgument(f"{where}: a token may hold printable ASCII characters only (no spaces or control characters)")
        if token in tokens:
            raise InvalidArgument(f"{where}: this token is already listed on line {first_line[token]}; list each token once")
        tokens[token] = scopes
        first_line[token] = line_no
    if not tokens:
        raise InvalidArgument(f"{echo(path, quote=False)}: no tokens")
    _warn_if_exposed(path, "auth tokens file")
    return tokens


def _warn_if_exposed(path: str, what: str) -> None:
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        log.warning("%s %s is readable or writable by other users (mode %s); chmod 600 (or 0440 in a Kubernetes "
                    "Secret volume)", what, path, oct(stat.S_IMODE(mode)))  # fmt: skip


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
        headers = [value if isinstance(value, str) else value.decode("latin-1")
                   for key, value in handler_call_details.invocation_metadata or () if key == "authorization"]  # fmt: skip
        if len(headers) > 1:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "more than one authorization header")
        header = headers[0] if headers else ""
        presented = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        scopes = self._scopes_for(presented) if presented else None
        if scopes is None:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        needed = self._method_scopes.get(method.rsplit("/", 1)[-1], "read")
        if needed not in scopes and "admin" not in scopes:
            return _deny(grpc.StatusCode.PERMISSION_DENIED, f"this token lacks the '{needed}' scope")
        return continuation(handler_call_details)


#: Refusals (auth failures, stream bounds) run here, never on the workers of admitted calls.
_REFUSAL_POOL = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="rpc-refuse")


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def abort(_requests: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    abort.experimental_thread_pool = _REFUSAL_POOL  # type: ignore[attr-defined]
    # A stream-stream handler works for every call shape: the request is never read.
    return grpc.stream_stream_rpc_method_handler(abort)


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
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.streams_active = Gauge(
            "circuits_rpc_streams_active", "Streaming calls in progress", ["service", "method"], registry=self.registry
        )
        self.streams_refused = Counter(
            "circuits_rpc_streams_refused", "Streaming calls refused by a stream bound", ["service", "limit"],
            registry=self.registry,
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


class _WrappedHandlers:
    """Wrapped method handlers an interceptor built, per (method, inner handler).

    grpc asks every interceptor for a handler on every call, on the server's one polling thread;
    the handlers the pass-through interceptors build depend only on the method and on the inner
    handler (which, for a registered method, is the same object every call), so they are built
    once per method and reused. The inner handler is kept and compared by identity, so an inner
    interceptor that builds a new handler per call simply gets a new wrapper; at most ``size``
    entries are kept (beyond that, wrappers are built per call as before).
    """

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int = 256) -> None:
        self._entries: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._size = size

    def get(self, method: str, inner: Any, build: Callable[[str, Any], Any]) -> Any:
        key = (method, id(inner))
        entry = self._entries.get(key)
        if entry is not None and entry[0] is inner:
            return entry[1]
        wrapped = build(method, inner)
        if len(self._entries) < self._size:
            self._entries[key] = (inner, wrapped)  # a race builds twice; either result is right
        return wrapped


def _abort_for(exc: BaseException, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(exc, CircuitsError):
        code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
        # One line, bounded: status details travel in HTTP/2 headers (a long one would turn the
        # error into RESOURCE_EXHAUSTED on the client).
        message = " ".join((str(exc) or exc.__class__.__name__).split("\n"))
        context.abort(code, clip_message(message))
    log.exception("unexpected error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.rsplit('/', 1)[-1]}")


class ErrorAndMetricsInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to status codes and records per-RPC metrics."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self._handlers = _WrappedHandlers()
        #: (method, code) -> (request counter, latency histogram) children: prometheus'
        #: ``labels()`` takes a lock and builds a key on every call.
        self._series: dict[tuple[str, str], tuple[Any, Any]] = {}

    def _record(self, method: str, code: str, started: float) -> None:
        if self.metrics is None:
            return
        series = self._series.get((method, code))
        if series is None:
            name = method.rsplit("/", 1)[-1]
            series = (self.metrics.requests.labels(self.metrics.service, name, code),
                      self.metrics.latency.labels(self.metrics.service, name))  # fmt: skip
            if len(self._series) < 4096:  # methods x codes; unknown methods never get here
                self._series[(method, code)] = series
        series[0].inc()
        series[1].observe(time.perf_counter() - started)

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        return self._handlers.get(method, handler, self._wrap)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
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


# -- streams: bounded, on their own pool, cancelled when idle ----------------------------------
_OPEN_STREAM_METHODS = ("/grpc.health.v1.Health/Watch", "/grpc.reflection.")


class IdleWatchdog:
    """One daemon thread that cancels calls whose armed deadline passes (cheaper than a timer per
    wait). ``arm(context, seconds)`` before a wait on the client, ``disarm(token)`` after it."""

    def __init__(self, name: str = "rpc-idle-watchdog") -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Any, str]] = {}
        self._next = 0
        self._name = name
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wake_at = float("inf")  # when the watchdog thread wakes next
        #: How many calls were cancelled for idling (tests and metrics read it).
        self.cancelled = 0

    def arm(self, context: Any, seconds: float, what: str = "") -> int:
        with self._cond:
            self._next += 1
            deadline = time.monotonic() + seconds
            self._armed[self._next] = (deadline, context, what)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            if deadline < self._wake_at:  # wake the thread only when it would sleep past this deadline
                self._cond.notify()
            return self._next

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._armed.clear()
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for token in [t for t, (deadline, _c, _w) in self._armed.items() if deadline <= now]:
                    _deadline, context, what = self._armed.pop(token)
                    self.cancelled += 1
                    log.info("cancelling idle stream %s (no progress from the client)", what)
                    try:
                        context.cancel()
                    except Exception:  # noqa: BLE001 - an ended call needs no cancel
                        pass
                wait = max(min((d for d, _c, _w in self._armed.values()), default=now + 60) - now, 0.005)
                self._wake_at = now + wait
                self._cond.wait(wait)
                self._wake_at = float("inf")


def _peer_address(context: Any) -> str:
    """``ipv4:10.0.0.7:53122`` -> ``ipv4:10.0.0.7`` (streams are bounded per address, not per port)."""
    peer = context.peer() if hasattr(context, "peer") else ""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer or "unknown"


class StreamGuardInterceptor(grpc.ServerInterceptor):
    """Keeps a server answering however many idle or slow streams clients hold.

    Every streaming call (request or response stream) runs on a pool of its own
    (``max_streams`` threads), so unary calls keep every RPC worker; health ``Check`` has a
    small pool of its own as well, so probes are answered even while all workers are busy.
    Admission is decided before a call gets a thread: over ``max_streams`` in all, over
    ``max_streams_per_method`` for its method, or over ``max_open_streams`` for health
    ``Watch`` / reflection (they need no token) the call is refused at once with
    RESOURCE_EXHAUSTED; over ``max_streams_per_peer`` from one client address it is refused
    as soon as it starts. (Authentication runs before this interceptor, so an unauthenticated
    stream is refused without ever being counted.) A stream whose client sends nothing, or reads
    nothing, for ``stream_idle_timeout_s`` seconds is cancelled.

    Unary-request streaming handlers are served as request streams whose single message this
    guard reads itself, so its bookkeeping always runs, whatever the client does.
    """

    def __init__(self, settings: ServerSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pool = futures.ThreadPoolExecutor(max_workers=settings.max_streams, thread_name_prefix="rpc-stream")
        self.health_pool = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="rpc-health")
        self.watchdog = IdleWatchdog()
        self._lock = threading.Lock()
        self._total = 0
        self._per_method: dict[str, int] = {}
        self._per_peer: dict[str, int] = {}
        self.refused = 0

    def close(self) -> None:
        self.watchdog.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.health_pool.shutdown(wait=False, cancel_futures=True)

    # -- bookkeeping ----------------------------------------------------------------------------
    def active(self) -> dict[str, int]:
        """Admitted streams per method (and ``total``)."""
        with self._lock:
            return {**self._per_method, "total": self._total}

    def _refuse(self, reason: str) -> grpc.RpcMethodHandler:
        self.refused += 1
        if self.metrics is not None:
            self.metrics.streams_refused.labels(self.metrics.service, reason.split("=", 1)[0]).inc()
        return _deny(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many concurrent streams ({reason}); retry later")

    def _admit(self, method: str) -> str:
        """'' when admitted (counted), else the refusal reason."""
        s = self.settings
        name = method.rsplit("/", 1)[-1]
        per_method = s.max_open_streams if method.startswith(_OPEN_STREAM_METHODS) else s.max_streams_per_method
        flag = "--max-open-streams" if method.startswith(_OPEN_STREAM_METHODS) else "--max-streams-per-method"
        with self._lock:
            if self._total >= s.max_streams:
                return f"max_streams={s.max_streams} (--max-streams)"
            if self._per_method.get(method, 0) >= per_method:
                return f"{flag[2:].replace('-', '_')}={per_method} for {name} ({flag})"
            self._total += 1
            self._per_method[method] = self._per_method.get(method, 0) + 1
        self._gauge(method)
        return ""

    def _release(self, method: str) -> None:
        with self._lock:
            self._total -= 1
            left = self._per_method.get(method, 1) - 1
            if left:
                self._per_method[method] = left
            else:
                self._per_method.pop(method, None)
        self._gauge(method)

    def _gauge(self, method: str) -> None:
        if self.metrics is not None:
            with self._lock:
                value = self._per_method.get(method, 0)
            self.metrics.streams_active.labels(self.metrics.service, method.rsplit("/", 1)[-1]).set(value)

    def _enter_peer(self, peer: str) -> bool:
        with self._lock:
            if self._per_peer.get(peer, 0) >= self.settings.max_streams_per_peer:
                return False
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            return True

    def _leave_peer(self, peer: str) -> None:
        with self._lock:
            left = self._per_peer.get(peer, 1) - 1
            if left:
                self._per_peer[peer] = left
            else:
                self._per_peer.pop(peer, None)

    # -- idle-timed iteration -----------------------------------------------------------------
    def _timed_requests(self, requests: Any, context: Any, what: str) -> Any:
        idle = self.settings.stream_idle_timeout_s
        while True:
            token = self.watchdog.arm(context, idle, what)
            try:
                message = next(requests)
            except StopIteration:
                return
            finally:
                self.watchdog.disarm(token)
            yield message

    def _timed_responses(self, responses: Any, context: Any, what: str) -> Any:
        idle = self.settings.stream_idle_timeout_s
        for message in responses:
            # While suspended here grpc sends the message; a client that reads nothing blocks it.
            token = self.watchdog.arm(context, idle, what)
            try:
                yield message
            finally:
                self.watchdog.disarm(token)

    # -- the interceptor ----------------------------------------------------------------------
    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if not (handler.request_streaming or handler.response_streaming):
            if method == "/grpc.health.v1.Health/Check":
                return self._on_pool(handler, self.health_pool)
            return handler
        reason = self._admit(method)
        if reason:
            return self._refuse(reason)
        return self._guarded(handler, method)

    @staticmethod
    def _on_pool(handler: grpc.RpcMethodHandler, pool: futures.ThreadPoolExecutor) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary

        def run(request: Any, context: grpc.ServicerContext) -> Any:
            return behavior(request, context)

        run.experimental_thread_pool = pool  # type: ignore[attr-defined]
        return grpc.unary_unary_rpc_method_handler(run, handler.request_deserializer, handler.response_serializer)

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        name = method.rsplit("/", 1)[-1]
        released = threading.Event()
        release_lock = threading.Lock()

        def release() -> None:
            with release_lock:
                if released.is_set():
                    return
                released.set()
            self._release(method)

        def start(context: grpc.ServicerContext) -> str:
            """Per-peer admission; '' when refused (the call is aborted)."""
            if not context.add_callback(release):  # the call already ended
                release()
                return ""
            peer = _peer_address(context)
            if not self._enter_peer(peer):
                self.refused += 1
                if self.metrics is not None:
                    self.metrics.streams_refused.labels(self.metrics.service, "max_streams_per_peer").inc()
                release()
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"too many concurrent streams from {peer} (max_streams_per_peer="
                              f"{self.settings.max_streams_per_peer}, --max-streams-per-peer); retry later")  # fmt: skip
            if not context.add_callback(lambda: self._leave_peer(peer)):  # ended meanwhile
                self._leave_peer(peer)
                release()
                return ""
            return peer

        def first_request(requests: Any, context: grpc.ServicerContext) -> Any:
            for message in self._timed_requests(requests, context, name):
                return message
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} expects one request message")

        if handler.response_streaming:
            inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

            def run_streaming(requests: Any, context: grpc.ServicerContext) -> Any:
                try:
                    peer = start(context)
                    if not peer:
                        return
                    what = f"{name} from {peer}"
                    if handler.request_streaming:
                        argument = self._timed_requests(requests, context, what)
                    else:
                        argument = first_request(requests, context)
                    yield from self._timed_responses(inner(argument, context), context, what)
                finally:
                    release()

            run_streaming.experimental_thread_pool = self.pool  # type: ignore[attr-defined]
            return grpc.stream_stream_rpc_method_handler(
                run_streaming, handler.request_deserializer, handler.response_serializer
            )

        inner_unary = handler.stream_unary

        def run_unary(requests: Any, context: grpc.ServicerContext) -> Any:
            try:
                peer = start(context)
                if not peer:
                    return None
                return inner_unary(self._timed_requests(requests, context, f"{name} from {peer}"), context)
            finally:
                release()

        run_unary.experimental_thread_pool = self.pool  # type: ignore[attr-defined]
        return grpc.stream_unary_rpc_method_handler(run_unary, handler.request_deserializer, handler.response_serializer)


# -- strings at the edge -------------------------------------------------------------------------
#: Identifier-like request fields: at most max_name_chars, no control characters.
NAME_FIELDS = frozenset({
    "graph_id", "model", "slug", "scan", "generator", "generator_version", "cluster", "label_pass", "passes",
})  # fmt: skip
#: Path fields: at most max_path_chars, no control characters.
PATH_FIELDS = frozenset({"directory"})
#: Prompt fields: at most max_prompt_chars (newlines and tabs are text).
PROMPT_FIELDS = frozenset({"prompt", "prompts", "answer_prefix"})
#: Bulk data inside Ingest graphs, not checked field by field (bounded by the message size).
_UNCHECKED = frozenset({("circuits.v1.Graph", "units"), ("circuits.v1.Graph", "prompt_tokens"),
                        ("circuits.v1.Graph", "edges")})  # fmt: skip
_CONTROL = frozenset(chr(c) for c in (*range(0x20), 0x7F))


#: message descriptor -> whether check_request_strings has anything to look at in it.
_STRING_BEARING: dict[Any, bool] = {}


def _bears_strings(descriptor: Any) -> bool:
    """Whether a message type has a string field, or a message field (checked recursively)."""
    from google.protobuf.descriptor import FieldDescriptor

    return any(f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP)
               for f in descriptor.fields)  # fmt: skip


def check_request_strings(message: Any, limits: Limits, where: str) -> None:
    """Refuse (InvalidArgument naming field and limit, never echoing the value in full) string
    fields of a request that are too long for their kind or hold NUL / control characters:
    names (:data:`NAME_FIELDS`) and paths (:data:`PATH_FIELDS`) no control character at all,
    prompts and other text no NUL."""
    descriptor = message.DESCRIPTOR
    checked = _STRING_BEARING.get(descriptor)
    if checked is None:
        checked = _STRING_BEARING[descriptor] = _bears_strings(descriptor)
    if not checked:  # only numbers and enums (GetEdgesForUnitRequest, GetUnitRequest, ...)
        return
    from google.protobuf.descriptor import FieldDescriptor

    owner = descriptor.full_name
    for field, value in message.ListFields():
        if (owner, field.name) in _UNCHECKED:
            continue
        values = value if field.is_repeated else (value,)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in values:
                check_request_strings(item, limits, where)
            continue
        if field.type != FieldDescriptor.TYPE_STRING:
            continue
        if field.name in NAME_FIELDS:
            limit, strict = "max_name_chars", True
        elif field.name in PATH_FIELDS:
            limit, strict = "max_path_chars", True
        elif field.name in PROMPT_FIELDS:
            limit, strict = "max_prompt_chars", False
        else:
            limit, strict = "max_text_chars", False
        most = int(getattr(limits, limit))
        for text in values:
            if most and len(text) > most:
                raise InvalidArgument(f"{where}: {field.name} is {len(text)} characters, over the limit "
                                      f"{limit}={most} ({flag(limit)})")  # fmt: skip
            if "\x00" in text or (strict and not _CONTROL.isdisjoint(text)):
                what = "control characters" if strict else "a NUL character"
                raise InvalidArgument(f"{where}: {field.name} {echo(text, 60)} must not contain {what}")


class _Undecodable:
    """Stands in for request bytes that did not parse (truncated, wrong wire type, bad UTF-8)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class RequestGuardInterceptor(grpc.ServerInterceptor):
    """Request guard: undecodable bytes become INVALID_ARGUMENT (not grpc's generic INTERNAL),
    and request streams and graphs over the limits become RESOURCE_EXHAUSTED naming the limit.

    Installed innermost by :func:`build_grpc_server` for every call shape: a unary request that
    does not parse (or is too large a graph, or has a string field over its limit or with
    forbidden characters, :func:`check_request_strings`) is refused before the servicer runs; in a request
    stream the servicer sees the error raised by the request iterator at the bad message
    (messages before it were delivered normally). Limits come from :class:`ServerSettings`
    (``max_stream_messages``, ``max_nodes_per_graph``, ``max_edges_per_graph``; 0 = unlimited).

    ``decoders`` maps full method names (``/circuits.v1.AggregatorService/Ingest``) to the function
    that decodes their request bytes instead of the generated ``FromString`` (e.g.
    :func:`circuits_core.wire.graph_request_from_bytes`); the checks above apply to what it returns.
    """

    def __init__(self, settings: ServerSettings | None = None, decoders: Mapping[str, Callable[[bytes], Any]] | None = None) -> None:
        import dataclasses

        self.decoders = dict(decoders or {})
        settings = settings or ServerSettings()
        self.max_stream_messages = settings.max_stream_messages
        self.max_nodes_per_graph = settings.max_nodes_per_graph
        self.max_edges_per_graph = settings.max_edges_per_graph
        self.limits = dataclasses.replace(DEFAULT_LIMITS, max_name_chars=settings.max_name_chars,
                                          max_path_chars=settings.max_path_chars,
                                          max_text_chars=settings.max_text_chars)  # fmt: skip
        self._handlers = _WrappedHandlers()

    def _check_graph(self, request: Any, where: str) -> None:
        sizes = wire.graph_sizes(request)
        if sizes is None:
            return
        for count, limit, name, what in (
            (sizes[0], self.max_nodes_per_graph, "max_nodes_per_graph", "units"),
            (sizes[1], self.max_edges_per_graph, "max_edges_per_graph", "edges"),
        ):
            if limit and count > limit:
                graph_id = wire.request_fields(request).graph_id
                raise ResourceExhausted(f"{where}: graph {graph_id[:80]!r} has {count} {what}, "
                                        f"over the limit {name}={limit} (--{name.replace('_', '-')})")  # fmt: skip

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return self._handlers.get(handler_call_details.method, handler, self._wrap)

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        decode = self.decoders.get(full_method, handler.request_deserializer)
        method = full_method.rsplit("/", 1)[-1]
        request_where = f"{method} request"

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
                self._check_graph(request, request_where)
                check_request_strings(wire.request_fields(request), self.limits, request_where)
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
                check_request_strings(wire.request_fields(request), self.limits, f"{method} request message {number}")
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
    stream_guard: StreamGuardInterceptor | None = None
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def start(self) -> GrpcServer:
        """Start serving (and the /metrics endpoint); a busy metrics port raises FailedPrecondition."""
        metrics_port = self.settings.metrics_port
        if metrics_port is not None:
            ensure_port_free(self.settings.host, metrics_port, what="metrics port", flag="--metrics-port")
        self.server.start()
        if metrics_port is not None:
            try:
                self.metrics.serve_http(self.settings.host, metrics_port)
            except OSError as exc:
                self.server.stop(0)
                raise FailedPrecondition(
                    f"cannot serve /metrics on {self.settings.host}:{metrics_port}: {exc.strerror or exc}"
                ) from None
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
        if self.stream_guard is not None:
            self.stream_guard.close()
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
    request_decoders: Mapping[str, Callable[[bytes], Any]] | None = None,
) -> GrpcServer:
    """Create (not start) a server with the shared plumbing; ``service_names`` are full names
    such as ``circuits.v1.AtlasService`` (used by health and reflection). ``method_scopes`` maps
    method names to the token scope they need when authentication is on; it extends and overrides
    :data:`DEFAULT_METHOD_SCOPES` of those services (unlisted methods need ``read``). Request bytes
    that do not decode are refused with INVALID_ARGUMENT (:class:`RequestGuardInterceptor`, which
    decodes the methods named in ``request_decoders`` with the given functions)."""
    metrics = metrics or Metrics(service_names[0].rsplit(".", 1)[-1] if service_names else "circuits")
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
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
    # Order: authentication first (refused calls are never counted), then the stream bounds,
    # the service's own interceptors, error mapping/metrics, and the request guard innermost.
    stream_guard = StreamGuardInterceptor(settings, metrics)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
        interceptors=[*auth, stream_guard, *interceptors, ErrorAndMetricsInterceptor(metrics),
                      RequestGuardInterceptor(settings, request_decoders)],
        options=options,
    )  # fmt: skip
    add_servicers(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    # Checked first: grpc's own bind failure also logs a C-core line to stderr.
    ensure_port_free(settings.host, settings.port, reuse_port=settings.reuse_port)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise FailedPrecondition(f"cannot bind the gRPC server to {address} (is the host an address of this machine?)")
    handle = GrpcServer(
        server=server,
        port=port,
        health=health_servicer,
        service_names=tuple(service_names),
        metrics=metrics,
        settings=settings,
        stream_guard=stream_guard,
    )
    handle.set_serving(False)
    return handle


# -- command-line flags shared by every service -------------------------------------------------
def add_server_arguments(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    """The network/security flags every `circuits serve <service>` accepts."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    g.add_argument("--port", type=int, default=default_port, help="gRPC port (default: %(default)s; 0 = any free port)")
    g.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics HTTP port (default: none)")
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
    g.add_argument("--max-streams", type=int, default=DEFAULT_LIMITS.max_streams,
                   help="concurrent streaming calls, on a thread pool of their own (default %(default)s)")
    g.add_argument("--max-streams-per-method", type=int, default=DEFAULT_LIMITS.max_streams_per_method,
                   help="concurrent streaming calls of one method (default %(default)s)")
    g.add_argument("--max-streams-per-peer", type=int, default=DEFAULT_LIMITS.max_streams_per_peer,
                   help="concurrent streaming calls from one client address (default %(default)s)")
    g.add_argument("--max-open-streams", type=int, default=DEFAULT_LIMITS.max_open_streams,
                   help="concurrent health Watch / reflection streams each; they need no token (default %(default)s)")
    g.add_argument("--stream-idle-timeout", type=float, default=DEFAULT_LIMITS.stream_idle_timeout_s,
                   help="seconds a stream may wait for its client before it is cancelled (default %(default)s)")
    add_limit_arguments(parser, ("max_name_chars", "max_path_chars", "max_text_chars"))


def server_settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """ServerSettings from add_server_arguments flags; plaintext needs an explicit --insecure.

    Contradictions are refused rather than resolved silently: ``--insecure`` together with TLS
    files, ``--tls-client-ca`` without a certificate. Plaintext with bearer tokens, or on an
    address other than loopback, gets a warning."""
    tls = [flag for flag, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                                    ("--tls-client-ca", args.tls_client_ca)) if value]  # fmt: skip
    if args.insecure and tls:
        raise InvalidArgument(f"--insecure contradicts {', '.join(tls)}: serve TLS (drop --insecure) or plaintext "
                              "(drop the TLS flags), not both")  # fmt: skip
    if not (args.tls_cert or args.tls_key) and not args.insecure:
        if args.tls_client_ca:
            raise InvalidArgument("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        raise InvalidArgument("refusing to serve plaintext: pass --tls-cert/--tls-key, or --insecure for local use")
    if args.insecure:
        if args.auth_tokens_file:
            log.warning("serving plaintext (--insecure) with bearer tokens: tokens cross the network unencrypted; "
                        "use TLS outside a trusted network")  # fmt: skip
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("serving plaintext (--insecure) on %s, not only on loopback", args.host)
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
        max_streams=args.max_streams,
        max_streams_per_method=args.max_streams_per_method,
        max_streams_per_peer=args.max_streams_per_peer,
        max_open_streams=args.max_open_streams,
        stream_idle_timeout_s=args.stream_idle_timeout,
        max_name_chars=args.limit_max_name_chars,
        max_path_chars=args.limit_max_path_chars,
        max_text_chars=args.limit_max_text_chars,
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

"""Channel creation and error mapping shared by every circuits client."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from circuits_core.errors import CircuitsError, InvalidArgument, error_for_code
from circuits_core.limits import DEFAULT_MAX_MESSAGE_BYTES

T = TypeVar("T")

#: Seconds a unary call may take unless the caller says otherwise.
DEFAULT_TIMEOUT = 60.0
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:  # never show the token
        return "_BearerToken(***)"

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


from collections import namedtuple  # noqa: E402

_CallDetails = namedtuple(  # type: ignore[misc]
    "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
)


class _ClientCallDetails(_CallDetails, grpc.ClientCallDetails):
    pass


def open_channel(
    target: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls_ca_file: str = "",
    tls_cert_file: str = "",
    tls_key_file: str = "",
    token: str = "",
    tls: bool | None = None,
) -> grpc.Channel:
    """A channel to ``host:port`` with keepalive and large-message options.

    TLS when ``tls`` is true or any TLS file is given (``tls_ca_file`` verifies the server; the
    cert/key pair is the client certificate for mutual TLS); ``token`` adds a bearer token.
    """
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        # Each client keeps its own connection (gRPC would otherwise share one per target across
        # a process), so clients spread over the processes / pods that serve one address.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    use_tls = bool(tls) or bool(tls_ca_file or tls_cert_file or tls_key_file)
    if use_tls:
        def read(path: str) -> bytes | None:
            if not path:
                return None
            try:
                with open(path, "rb") as fh:
                    return fh.read()
            except OSError as exc:
                raise InvalidArgument(f"cannot read TLS file {path}: {exc.strerror}") from None

        creds = grpc.ssl_channel_credentials(
            root_certificates=read(tls_ca_file),
            private_key=read(tls_key_file),
            certificate_chain=read(tls_cert_file),
        )
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if token:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel


def translate(exc: grpc.RpcError) -> CircuitsError:
    """The CircuitsError for a failed call (same classes the servers raise)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return error_for_code(name, details or name)


def call_unary(
    fn: Callable[..., T],
    request: Any,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    idempotent: bool = False,
    attempts: int = 4,
    metadata: Any = None,
) -> T:
    """Call a unary RPC; retry UNAVAILABLE/DEADLINE_EXCEEDED with jittered backoff when idempotent."""
    delay = 0.1
    for attempt in range(attempts if idempotent else 1):
        try:
            return fn(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            if not idempotent or exc.code() not in _RETRYABLE or attempt == attempts - 1:
                raise translate(exc) from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


def iterate_stream(stream: Iterator[T]) -> Iterator[T]:
    """Iterate a server stream, translating failures to CircuitsError."""
    try:
        yield from stream
    except grpc.RpcError as exc:
        raise translate(exc) from None

